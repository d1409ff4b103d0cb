"""Setting up a training run of one lockstep group: the refusals before anything is written
(``check_start``), the accelerator, data, shared transform, frozen teacher and trainees
(``setup``), and the state of a checkpoint to resume from (``resume_from``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from distill.config import Config, ConfigError, check_resume_config
from distill.data import CocoDetection, build_dataset
from distill.engine.build import (
    Trainee,
    build_accelerator,
    build_train_loader,
    build_trainee,
    check_lockstep,
    check_not_optimized,
)
from distill.engine.checkpoint import (
    CheckpointError,
    MismatchError,
    Progress,
    check_fresh,
    check_models,
    find_checkpoint,
    load_checkpoint,
    previous_checkpoint,
    read_progress,
    state_digest,
)
from distill.models.retinanet import build_transform

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A training session of one lockstep group: what ``setup`` builds and the loop uses."""

    job: str
    cfg: Config  # the group's shared sections (data, train, eval, ...): its first config
    accelerator: Accelerator
    train_set: CocoDetection
    train_loader: Any  # prepared DataLoader
    val_set: CocoDetection
    transform: nn.Module  # the shared resize + normalise
    teacher: nn.Module | None  # frozen, not prepared; None for a teacher job or a plain student
    trainees: list[Trainee]
    total_steps: int
    checkpoint_dir: Path
    progress: Progress
    # trainees that left the group before the end, and why ("pruned at step 300", "failed:
    # ..."): they stay prepared (their state is in every checkpoint) but no longer train
    left: dict[str, str] = field(default_factory=dict)
    # a trainee whose loss stays non-finite leaves the group (distill search) instead of
    # stopping it
    leave_on_failure: bool = False


def check_start(
    cfgs: list[Config], checkpoint_dir: Path, resume: bool, fallback: bool, overwrite: bool
) -> Path | None:
    """Refusals before anything is built or written; returns the checkpoint to resume from."""
    check_lockstep(cfgs)
    checkpoint = find_checkpoint(checkpoint_dir, fallback) if resume else None
    if not resume and not overwrite:
        for run_dir in {checkpoint_dir, *(Path(c.output.dir) for c in cfgs)}:
            check_fresh(run_dir)
    if checkpoint is not None:  # another run's or grid's checkpoint
        try:
            stored = read_progress(checkpoint)
        except CheckpointError:
            stored = None  # unreadable: load_checkpoint reports it (or falls back)
        if stored is not None:
            check_models(checkpoint, stored, _model_names(cfgs, checkpoint_dir))
        for c in cfgs:
            check_resume_config(c, Path(c.output.dir))
    return checkpoint


def _model_names(cfgs: list[Config], checkpoint_dir: Path) -> list[str]:
    """The models trained together, as the checkpoint records them ("." for a single run)."""
    return [os.path.relpath(c.output.dir, checkpoint_dir) for c in cfgs]


def setup(cfgs: list[Config], job: str, checkpoint_dir: Path, eval_split: str = "val") -> Run:
    """The accelerator, the data, the shared transform, the frozen teacher and the trainees;
    ``eval_split``: what the trainees are evaluated on (``holdout``: distill search's)."""
    cfg = cfgs[0]
    accelerator = build_accelerator(cfg)
    _setup_logging(accelerator)
    train_set, train_loader = build_train_loader(accelerator, cfg)
    val_set = build_dataset(cfg.data, eval_split)
    num_classes = train_set.num_categories + 1  # + background (label 0), torchvision's convention
    if len(train_loader) < cfg.train.grad_accum:
        raise ConfigError(
            f"{len(train_set)} training images (data.root {cfg.data.root}) make no optimizer step:"
            f" data.batch_size {cfg.data.batch_size} x {accelerator.num_processes} processes x "
            f"train.grad_accum {cfg.train.grad_accum} needs more (incomplete batches are dropped)"
        )
    steps_per_epoch = len(train_loader) // cfg.train.grad_accum  # per-process batches
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    transform = build_transform(cfg).to(accelerator.device)  # ONE resize + normalise for all
    teacher: nn.Module | None = None
    trainees = []
    for run_cfg in cfgs:
        trainee, teacher = build_trainee(
            accelerator, run_cfg, job, num_classes, total_steps, teacher
        )
        trainees.append(trainee)
    teacher_digest = ""
    if teacher is not None:
        teacher.to(accelerator.device)  # frozen: not prepared, not in an optimizer, not in DDP
        check_not_optimized(teacher, trainees)
        teacher_digest = state_digest(teacher)
    log.info(
        "job=%s models=%d processes=%d device=%s mixed_precision=%s steps=%d (%d per epoch)",
        job, len(trainees), accelerator.num_processes, accelerator.device,
        accelerator.mixed_precision, total_steps, steps_per_epoch,
    )  # fmt: skip
    progress = Progress(teacher_digest=teacher_digest, models=_model_names(cfgs, checkpoint_dir))
    return Run(
        job, cfg, accelerator, train_set, train_loader, val_set, transform, teacher, trainees,
        total_steps, checkpoint_dir, progress,
    )  # fmt: skip


def resume_from(run: Run, checkpoint: Path, fallback: bool) -> None:
    """Load models, optimizers, schedulers, grad scaler, RNG and progress from ``checkpoint``
    (with ``fallback``, from the previous whole one if it is corrupt)."""
    teacher_digest, models = run.progress.teacher_digest or "", run.progress.models
    try:
        progress = load_checkpoint(run.accelerator, checkpoint, teacher_digest, models)
    except CheckpointError as err:
        previous = previous_checkpoint(checkpoint) if fallback else None
        if previous is None or isinstance(err, MismatchError):
            raise
        log.warning("%s; falling back to %s", err, previous)
        checkpoint = previous
        progress = load_checkpoint(run.accelerator, checkpoint, teacher_digest, models)
    progress.models = models
    if progress.teacher_digest is None:
        log.warning(
            "%s records no teacher fingerprint (an older checkpoint): resuming without "
            "checking that the teacher is the one it was trained against",
            checkpoint,
        )
        progress.teacher_digest = teacher_digest
    log.info(
        "resumed from %s at epoch %d, batch %d, step %d",
        checkpoint, progress.epoch, progress.batch, progress.step,
    )  # fmt: skip
    run.progress = progress


def _setup_logging(accelerator: Accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("distill").setLevel(level)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
