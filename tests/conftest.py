from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from distill.fileio import import_script

# Two cores are shared by the test process and its data-loader workers: keep torch to one thread
# per process so that multi-process tests do not oversubscribe the machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import ``scripts/NAME.py`` (scripts/ is not a package) as module ``name``."""
    return import_script(REPO / "scripts" / f"{name}.py")


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes dataset (64 px), shared by the end-to-end tests."""
    from distill.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes") / "data"
    generate_shapes(root, num_train=16, num_val=6, size=64, seed=0, difficulty="medium")
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on 2 shared cores a second thread of a tiny model spins more than it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smoke_overrides(root: Path, out: Path) -> list[str]:
    """configs/shapes/smoke.yaml pointed at a test dataset and run directory."""
    return [f"data.root={root}", f"output.dir={out}"]
