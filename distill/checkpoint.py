"""Resumable training state, written whole or not at all.

Layout inside a run directory::

    checkpoints/step_00000120/   accelerate's save_state (model, optimizer, scheduler, RNG,
                                 grad scaler) + progress.json (epoch, batch, step)
    checkpoints/last             name of the last complete checkpoint (moved only after the
                                 checkpoint folder is whole)

A checkpoint is first written to ``step_N.tmp`` and renamed when every process has finished
writing, so a crash mid-write leaves the previous checkpoint and pointer untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the path."""


@dataclass
class Progress:
    epoch: int = 0  # epoch being trained (0-based)
    batch: int = 0  # batches of ``epoch`` already consumed (per process)
    step: int = 0  # optimizer steps done
    nonfinite_total: int = 0  # skipped steps with a non-finite loss, whole run


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, progress: Progress, keep: int = 2
) -> Path:
    """Every process calls this; returns the checkpoint folder."""
    root = run_dir / "checkpoints"
    final = root / f"step_{progress.step:08d}"
    tmp = root / f"step_{progress.step:08d}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(tmp / "progress.json", json.dumps(asdict(progress)))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_text_atomic(root / "last", final.name)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path:
    """The last complete checkpoint of ``run_dir``, or an error naming what is missing."""
    pointer = run_dir / "checkpoints" / "last"
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: run directory {run_dir} does not exist")
    if not pointer.is_file():
        raise CheckpointError(
            f"cannot resume: {pointer} not found (no complete checkpoint in {run_dir})"
        )
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "progress.json").is_file():
        raise CheckpointError(f"cannot resume: checkpoint {path} is incomplete or missing")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> Progress:
    """Restore model, optimizer, scheduler and RNG state; returns where training stopped."""
    try:
        progress = Progress(**json.loads((path / "progress.json").read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"cannot resume: {path / 'progress.json'} is unreadable: {err}"
        ) from None
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # truncated or corrupt files surface as many exception types
        raise CheckpointError(f"cannot resume: checkpoint {path} is corrupt: {err}") from err
    return progress
