"""Writing a text file whole or not at all; importing a script."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``: a crash
    leaves either the previous file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def import_script(path: Path) -> ModuleType:
    """Import the Python file ``path`` (e.g. ``scripts/bench_kd.py``: scripts/ is no package) as
    the module named by its stem, registered in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
