"""``distill.engine.signals.StopFlag``: the first SIGTERM / SIGINT asks the loop to stop after its
step, a second one stops at once. (The first signal's checkpoint and exit 3 under a real run are
tested in tests/test_reliability.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from types import FrameType

from distill.engine.signals import StopFlag


def test_second_signal_falls_back_to_the_previous_handler_at_once() -> None:
    received: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    before = signal.signal(signal.SIGINT, previous)
    try:
        flag = StopFlag.install()
        signal.raise_signal(signal.SIGINT)
        assert flag.requested and flag.reason == "received SIGINT"
        assert received == []  # the first one only sets the flag
        signal.raise_signal(signal.SIGINT)
        assert received == [signal.SIGINT]  # the second one went to the previous handler
        flag.uninstall()
        assert signal.getsignal(signal.SIGINT) is previous
    finally:
        signal.signal(signal.SIGINT, before)


def test_second_sigterm_ends_the_process_without_waiting() -> None:
    """With SIGTERM's default action behind it, the second SIGTERM ends the process: the code
    after it never runs (the first returns to it)."""
    code = textwrap.dedent(
        """
        import os, signal, time
        from distill.engine.signals import StopFlag
        flag = StopFlag.install()
        os.kill(os.getpid(), signal.SIGTERM)
        print("after the first:", flag.requested, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("after the second", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout == "after the first: True\n"
