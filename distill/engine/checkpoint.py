"""Resumable training state, written whole or not at all.

Layout inside a run directory::

    checkpoints/step_00000120/   accelerate's save_state (models, optimizers, schedulers, RNG,
                                 grad scaler) + progress.json (epoch, batch, step, counters)
    checkpoints/last             name of the last complete checkpoint (moved only after the
                                 checkpoint folder is whole)

A checkpoint is first written to ``step_N.tmp`` and renamed when every process has finished
writing, so a crash mid-write leaves the previous checkpoint and the pointer untouched. When
step N is saved a second time (a step checkpoint that ends an epoch), the first ``step_N`` is
moved aside to ``step_N.old`` before the new one takes its name, and removed only after that:
a kill between the two renames leaves the pointer naming a missing folder, and ``find_checkpoint``
then takes the interrupted save's whole ``step_N.tmp`` (else ``step_N.old``); the next save
puts it back in place first (``_finish_interrupted``). Loading
goes through Accelerate's ``load_state``, which reads every file with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import load
from torch import nn

from distill.fileio import write_text_atomic


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the path."""


class RunExistsError(CheckpointError):
    """A fresh start would overwrite a run that is already there."""


class MismatchError(CheckpointError):
    """The checkpoint is whole but belongs to other training: no fallback applies."""


class TeacherMismatchError(MismatchError):
    """The checkpoint was trained against another frozen teacher than the one configured."""


class ModelsMismatchError(MismatchError):
    """The checkpoint holds another set of models (another run, sweep or grid)."""


@dataclass
class Progress:
    epoch: int = 0  # epoch being trained (0-based)
    batch: int = 0  # batches of ``epoch`` already consumed (per process)
    step: int = 0  # optimizer steps taken or skipped
    nonfinite: dict[str, int] = field(default_factory=dict)  # per run dir: skipped, non-finite
    scaler_skipped: dict[str, int] = field(default_factory=dict)  # per run dir: fp16 overflow
    seconds: float = 0.0  # wall time of the training loop (evaluations included), all sessions
    # state_digest of the frozen teacher ("" for none); None: a checkpoint older than this field
    teacher_digest: str | None = None
    # the models trained together: their run dirs relative to the checkpointing dir ("." for a
    # single run, the point names of a lockstep sweep); None: a checkpoint older than this field
    models: list[str] | None = None


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, progress: Progress, keep: int = 2
) -> Path:
    """Every process calls this; returns the checkpoint folder."""
    root = run_dir / "checkpoints"
    final = root / f"step_{progress.step:08d}"
    tmp = root / f"step_{progress.step:08d}.tmp"
    if accelerator.is_main_process:
        _finish_interrupted(root)
        for leftover in [*root.glob("*.tmp"), *root.glob("*.old")]:  # from an earlier crash
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(tmp / "progress.json", json.dumps(asdict(progress)))  # tmp is whole
        aside = final.with_name(final.name + ".old")
        if final.exists():  # the same step saved twice: keep the first until the second is in
            final.rename(aside)
        tmp.rename(final)
        write_text_atomic(root / "last", final.name)
        if aside.exists():
            shutil.rmtree(aside)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _complete(root: Path) -> list[Path]:
    """Whole checkpoints, oldest first (not the ``.tmp`` or ``.old`` of a save)."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix not in (".tmp", ".old"))


def _interrupted(path: Path) -> Path | None:
    """The whole folder of checkpoint ``path`` that a save killed between moving the previous
    ``path`` aside and moving the new one in left behind: the new one, else the previous one."""
    for candidate in (path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
        if (candidate / "progress.json").is_file():
            return candidate
    return None


def _finish_interrupted(root: Path) -> None:
    """Put the whole folder of an interrupted save (``_interrupted``) under the name the pointer
    gives, so that the pointer is right again before anything else is removed."""
    pointer = root / "last"
    if not pointer.is_file():
        return
    named = root / pointer.read_text().strip()
    found = None if named.exists() else _interrupted(named)
    if found is not None:
        found.rename(named)


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path, fallback: bool = False) -> Path:
    """The last complete checkpoint of ``run_dir``, or an error naming what is missing.

    fallback: when the pointer or the checkpoint it names is missing, take the newest whole
    checkpoint folder instead of failing.
    """
    pointer = run_dir / "checkpoints" / "last"
    if not run_dir.is_dir():
        problem = "is not a directory" if run_dir.exists() else "does not exist"
        raise CheckpointError(f"cannot resume: run directory {run_dir} {problem}")
    problem = ""
    if not pointer.is_file():
        problem = f"cannot resume: {pointer} not found (no complete checkpoint in {run_dir})"
    else:
        path = run_dir / "checkpoints" / pointer.read_text().strip()
        if (path / "progress.json").is_file():
            return path
        found = None if path.exists() else _interrupted(path)
        if found is not None:  # a save of the same step was killed half-way: its whole folder
            return found
        problem = f"cannot resume: checkpoint {path} is incomplete or missing"
    whole = [p for p in _complete(run_dir / "checkpoints") if (p / "progress.json").is_file()]
    if fallback and whole:
        return whole[-1]
    raise CheckpointError(problem)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` has a checkpoint to resume from (its ``checkpoints/last`` pointer)."""
    return (run_dir / "checkpoints" / "last").is_file()


RUN_OUTPUTS = ("checkpoints/last", "metrics.json", "student.pt", "teacher.pt")


def check_fresh(run_dir: Path) -> None:
    """A fresh start must not overwrite a run already in ``run_dir`` (its checkpoints, weights
    or metrics): an error says how to continue it or where else to train."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunExistsError(f"output.dir {run_dir} is a file, not a directory")
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if found:
        raise RunExistsError(
            f"{run_dir} already holds a run ({', '.join(found)}): continue it with --resume "
            f"{run_dir}, train into another output.dir (--set output.dir=...), or remove {run_dir}"
            " first"
        )


def previous_checkpoint(path: Path) -> Path | None:
    """The whole checkpoint before ``path`` (for ``--resume-fallback``), if there is one."""
    earlier = [p for p in _complete(path.parent) if p.name < path.name]
    return earlier[-1] if earlier else None


def read_progress(path: Path) -> Progress:
    """The ``progress.json`` of checkpoint ``path``, or an error naming it."""
    try:
        return Progress(**json.loads((path / "progress.json").read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"cannot resume: {path / 'progress.json'} is unreadable: {err}"
        ) from None


def check_models(path: Path, progress: Progress, models: list[str]) -> None:
    """The checkpoint holds the models being resumed (``Progress.models``), or an error."""
    if progress.models is not None and progress.models != models:
        raise ModelsMismatchError(
            f"cannot resume: checkpoint {path} was saved for the models {progress.models}, not "
            f"{models} (another run or sweep, or a sweep with another grid, wrote it there): use "
            f"another output.dir, or remove {path.parent} to start these models anew (models "
            "that finished keep their weights and metrics.json)"
        )


def load_checkpoint(
    accelerator: Accelerator,
    path: Path,
    teacher_digest: str = "",
    models: list[str] | None = None,
) -> Progress:
    """Restore models, optimizers, schedulers and RNG state; returns where training stopped.

    teacher_digest: ``state_digest`` of this run's frozen teacher ("" for none).
    models: the run's ``Progress.models``. A checkpoint made against another teacher or for
    other models is refused before anything is loaded.
    """
    progress = read_progress(path)
    made_with = progress.teacher_digest
    if made_with is not None and made_with != teacher_digest:
        raise TeacherMismatchError(
            f"cannot resume: checkpoint {path} was trained against another teacher "
            f"({_short(made_with)}; the configured teacher.weights give {_short(teacher_digest)}): "
            "resume with the teacher it was made with, or start a new run in another output.dir"
        )
    if models is not None:
        check_models(path, progress, models)
    rng_state = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        if rng_state.is_file():  # load_state ignores an unreadable RNG state without a word
            load(rng_state)
        accelerator.load_state(str(path))
    except Exception as err:  # truncated, corrupt or unsafe pickles surface as many exception types
        raise CheckpointError(
            f"cannot resume: checkpoint {path} is corrupt or unsafe: {err}"
        ) from err
    return progress


def _short(digest: str) -> str:
    return f"sha256 {digest[:12]}" if digest else "no teacher"


@torch.no_grad()
def state_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, bytes): a model's fingerprint."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
