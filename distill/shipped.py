"""Files that ship with the package: the recipes in ``configs/`` and ``results/bench_kd.json``.

They live at the top of the repository (``distill run configs/shapes/distill.yaml`` from a
clone; the configs' ``_base_`` paths are relative to each other) and travel inside the package
as ``distill/configs`` and ``distill/results`` (setup.py maps them there). A wheel or
``pip install .`` has them there; a clone, with or without ``pip install -e .``, has them beside
the package. Either way the folders are whole, so ``_base_: ../shapes/distill.yaml`` resolves.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SHIPPED = ("configs", "results")


def shipped_path(folder: str, *parts: str) -> Path:
    """The path of ``folder/parts...`` (``folder``: one of ``SHIPPED``) where this copy of the
    package has it: inside the installed package, else in the source tree the package was
    imported from. The file may not exist (``results/bench_kd.json`` in a fresh clone)."""
    if folder not in SHIPPED:
        raise ValueError(f"{folder!r}: the package ships {', '.join(SHIPPED)}")
    package = Path(str(files("distill")))  # a folder on disk: pip installs packages unzipped
    root = package if (package / folder).is_dir() else package.parent  # installed, or a clone
    return root.joinpath(folder, *parts)
