"""Writing a file whole or not at all; importing a script."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any

# Read once (os.umask can only be read by setting it): the mode a plainly created file gets.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A fresh, unique, empty file ``.NAME.XXXX.tmp`` in ``path``'s folder (created with it),
    removed on leaving unless it was moved away (``replace_durably``): on any failure, a stop
    included, nothing is left behind and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_UMASK)  # mkstemp makes it private; the final file is not
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries to disk: a rename into it is durable only then (where the
    system allows opening a directory; elsewhere a no-op)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the whole file ``tmp`` over ``path`` (atomic within a folder) and flush the
    folder."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(f)`` on a binary file under a unique temporary name in ``path``'s folder,
    fsync it, then rename it over ``path`` and fsync the folder: a crash leaves the previous
    file or the new one, never half of it, and a failure leaves no temporary file."""
    with temporary_beside(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_atomic`` of ``text`` in UTF-8."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


class FileFormatError(ValueError):
    """A file that should hold something else (broken JSON, say); the message names it."""


def read_json(path: Path) -> Any:
    """The JSON in ``path``; FileFormatError (one line, naming the file) if it is unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FileFormatError(f"{path} is not readable JSON: {err}") from None


def import_script(path: Path) -> ModuleType:
    """Import the Python file ``path`` (e.g. ``scripts/bench_kd.py``: scripts/ is no package) as
    the module named by its stem, registered in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def write_json(payload: Any, path: Path) -> None:
    """Atomic JSON write (``write_text_atomic``), indented, with a final newline."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
