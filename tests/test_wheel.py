"""The package as a user without a clone gets it: a wheel built from the source tree, installed
into a fresh virtual environment and run from another folder. Its configs come from the
installed package (setup.py ships configs/ and results/bench_kd.json inside it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

# What the build reads (pyproject.toml and setup.py name the rest of the tree out).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "distill", "teachers", "students")
SHIPPED = ("configs", "results")
# Run by the installed package: where it is, its configs (the demo's inherit from ../shapes/),
# the benchmark it quotes; then a tiny dataset (here, not by `distill data shapes`: each
# interpreter start costs seconds of imports)
CHECK = """
from pathlib import Path
import distill
from distill.data.shapes import generate_shapes
from distill.experiments.demo import BENCH_KD, CONFIGS, demo_configs

configs = demo_configs(Path("out"), Path("data"), Path("t.pt"))
print(distill.__file__, CONFIGS, BENCH_KD.is_file(), configs["teacher"].train.max_steps, sep="\\n")
generate_shapes(Path("data"), num_train=8, num_val=4, size=64)
"""


def _run(args: list[str | Path], cwd: Path, timeout: float = 120) -> str:
    """stdout of ``args`` run in ``cwd``; the test fails with its output if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _site_packages() -> list[str]:
    """The folders this interpreter imports installed distributions from (torch, ...)."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_runs_with_its_own_configs(tmp_path: Path) -> None:
    # build from a copy: an in-tree build would write build/ and *.egg-info into the clone
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pt")
    for name in (*BUILD_INPUTS, *SHIPPED):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "-w", wheels, src], cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("distill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        p.relative_to(REPO).as_posix()
        for package in ("distill", "teachers", "students")
        for p in (REPO / package).rglob("*.py")
    }
    assert modules <= names, sorted(modules - names)  # every module, none left behind
    for config in (REPO / "configs").rglob("*.yaml"):
        assert f"distill/{config.relative_to(REPO).as_posix()}" in names, config
    assert "distill/results/bench_kd.json" in names

    # a fresh environment that sees the dependencies already installed here (no download) but
    # not this source tree, and the wheel installed into it
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp_path).strip())  # fmt: skip
    (site / "deps.pth").write_text("\n".join(_site_packages()) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", wheel], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the installed package is the one imported, not this source tree
    where = _run([python, "-c", CHECK], cwd=elsewhere).splitlines()
    package = (site / "distill").resolve()
    assert Path(where[0]).resolve().is_relative_to(package), where
    assert Path(where[1]).resolve() == package / "configs" / "demo", where
    assert where[2:4] == ["True", "500"], where

    distill = env_dir / "bin" / "distill"
    assert "--minutes" in _run([distill, "demo", "--help"], cwd=elsewhere)
    smoke = package / "configs" / "shapes" / "smoke.yaml"
    settings = ("data.root=data", "output.dir=run", "train.max_steps=2", "train.epochs=1")
    _run([distill, "run", smoke, *(a for s in settings for a in ("--set", s))],
         cwd=elsewhere, timeout=300)  # fmt: skip
    assert (elsewhere / "run" / "student.pt").is_file()
    assert (elsewhere / "run" / "metrics.json").is_file()
