"""Stopping a run cleanly on SIGTERM / SIGINT."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves and exits. A second
    signal of the same kind falls back to the default behaviour (immediate exit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> StopFlag:
        flag = cls()
        try:
            for sig in cls.SIGNALS:
                flag._previous[sig] = signal.signal(sig, flag._handle)
        except ValueError:  # not the main thread: no signal handling, as for any library call
            pass
        return flag

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:  # second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = True
        self.reason = f"received {name}"
        log.warning("%s: finishing the current step, saving a checkpoint, then exiting", name)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
