"""The training loop under HuggingFace Accelerate. Read ``distill.engine.step`` first: it is one
step (the teacher, the student, the KD terms summed, backward, the optimizer step or a skip);
this file is what runs it: epochs of batches, logging, checkpoints, stopping, evaluation.

One loop serves three jobs:
  * ``job="teacher"``: train the teacher architecture on the dataset (no KD);
  * ``job="student"`` with no KD term on: the plain student baseline (the teacher is not run);
  * ``job="student"`` with KD terms on: distillation from the frozen teacher.

``train_group`` trains several students in lockstep on one stream of batches (``distill sweep``):
the data, the shared transform and the teacher forward happen once per batch for all of them.
``train`` is the group of one. ``train_group`` is setup, resume, the loop and the finish;
``train_loop`` is one screen: the epochs, the batches, ``train_batch`` and, after each optimizer
step, logging, checkpoints and stops; after each epoch, evaluation and a checkpoint. For one
batch read ``train_batch``: it goes through the shared transform once, into the frozen teacher
(no_grad, autocast, never prepared) and each trainee's ``train_step``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from tqdm import tqdm

from distill.config import Config, dump_config, replace
from distill.engine.build import (
    Trainee,
)
from distill.engine.checkpoint import (
    Progress,
    save_checkpoint,
    state_digest,
)
from distill.engine.setup import Run, check_start, resume_from, setup
from distill.engine.signals import StopFlag
from distill.engine.step import StepOutcome, teacher_forward, train_step
from distill.engine.trainable import student_state_dict
from distill.evaluation.draw import log_detections
from distill.evaluation.evaluate import evaluate
from distill.fileio import write_json
from distill.models.card import dataset_categories, evaluation_record, write_card
from distill.models.weights import save_state_dict_file

__all__ = [
    "NonFiniteLoss",
    "TrainingStopped",
    "Watcher",
    "evaluate_trainee",
    "leave",
    "train",
    "train_group",
]

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Training stopped on request (signal) after saving a checkpoint; resume with --resume."""


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row."""


def train(
    cfg: Config,
    job: str = "student",
    resume: Path | None = None,
    fallback: bool = False,
    stop_after: int | None = None,
    resume_hint: str = "",
    overwrite: bool = False,
    check: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one model; returns the final COCO metrics (also in ``metrics.json``).

    resume: a run directory to continue from its last complete checkpoint (its output.dir).
    fallback: if that checkpoint is missing or corrupt, use the previous whole one.
    stop_after: behave as if a stop signal arrived after this many optimizer steps (tests).
    overwrite: a fresh start may replace a run already in output.dir (callers that own it).
    check: what ``distill check`` found before the run, written to ``check.json`` once the run
    has started (``distill.engine.preflight``).
    """
    checkpoint_dir = Path(resume) if resume is not None else Path(cfg.output.dir)
    if resume is not None:
        cfg = replace(cfg, **{"output.dir": str(resume)})
    return train_group(
        [cfg],
        job,
        checkpoint_dir,
        resume=resume is not None,
        fallback=fallback,
        stop_after=stop_after,
        resume_hint=resume_hint,
        overwrite=overwrite,
        check=check,
    )[0]


class Watcher(Protocol):
    """What a caller does to a lockstep group as it trains (``distill search``'s successive
    halving): it is evaluated on ``eval_split``; ``started`` runs once the group is built (and
    resumed), ``after_step`` after every optimizer step; either may take trainees out of the
    group (``leave``). A trainee whose loss stays non-finite leaves the group, rather than
    stopping it."""

    eval_split: str

    def started(self, run: Run) -> None: ...

    def after_step(self, run: Run) -> None: ...


def train_group(
    cfgs: list[Config],
    job: str,
    checkpoint_dir: Path,
    resume: bool = False,
    fallback: bool = False,
    stop_after: int | None = None,
    resume_hint: str = "",
    overwrite: bool = False,
    check: dict[str, Any] | None = None,
    watcher: Watcher | None = None,
) -> list[dict[str, Any]]:
    """Train ``len(cfgs)`` models in lockstep on the same batches; one checkpoint for all.

    The configs may differ only in their ``distill`` and ``output`` sections. Each model is
    built right after ``set_seed(seed)``, so it starts from the weights a separate run has.
    resume_hint: how to resume, for the message of a stop (default: ``--resume DIR``).
    overwrite: a fresh start may replace runs already in these directories; otherwise it is
    refused before anything is written.
    watcher: see ``Watcher``. Returns the metrics of the trainees still in the group.
    """
    checkpoint = check_start(cfgs, checkpoint_dir, resume, fallback, overwrite)
    eval_split = watcher.eval_split if watcher is not None else "val"
    run = setup(cfgs, job, checkpoint_dir, eval_split)
    run.leave_on_failure = watcher is not None
    if checkpoint is not None:
        resume_from(run, checkpoint, fallback)
    if run.accelerator.is_main_process:
        for t in run.trainees:
            dump_config(t.cfg, t.run_dir / "config.yaml")
            if check is not None:
                write_json(check, t.run_dir / "check.json")
    if watcher is not None:
        watcher.started(run)
    hint = resume_hint or f"resume with --resume {checkpoint_dir}"
    train_loop(run, stop_after, hint, watcher.after_step if watcher is not None else None)
    return finish(run)


def leave(run: Run, t: Trainee, why: str) -> None:
    """Take trainee ``t`` out of the group (every process, at the same step): it trains no
    more and is not finished; its state stays in the checkpoints."""
    run.trainees.remove(t)
    run.left[str(t.run_dir)] = why
    if t.writer is not None:
        t.writer.close()
    log.info("%s leaves the group at step %d: %s", t.run_dir, run.progress.step, why)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train_loop(
    run: Run,
    stop_after: int | None,
    resume_hint: str,
    after_step: Callable[[Run], None] | None = None,
) -> None:
    """Epochs of batches until ``run.total_steps`` optimizer steps, from ``run.progress`` (mid-
    epoch on a resume); logs, checkpoints, evaluates, stops on a signal or at ``stop_after``;
    ``after_step(run)`` after each optimizer step; an empty group stops."""
    cfg, accelerator, progress = run.cfg, run.accelerator, run.progress
    stop = StopFlag.install()
    clock = _Clock(progress, cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum)
    try:
        for epoch in range(progress.epoch, cfg.train.epochs):
            if progress.step >= run.total_steps or not run.trainees:
                break
            bar = _epoch_batches(run, epoch)
            clock.start_epoch()
            for images, targets in bar:
                _trace_batch(run.trainees[0], accelerator, progress, targets)
                logs = train_batch(run, images, targets, epoch)
                progress.batch += 1
                if not accelerator.sync_gradients:
                    continue  # inside an accumulation window: no optimizer step yet
                progress.step += 1
                if run.trainees:
                    _log_step(run, bar, logs, epoch, clock.images_per_s())
                if after_step is not None:
                    after_step(run)
                if progress.step >= run.total_steps or not run.trainees:
                    break  # the end of the epoch below evaluates and saves
                _checkpoint_or_stop(run, epoch, stop, stop_after, clock, resume_hint)
            bar.close()
            _end_epoch(run, epoch, stop, clock, resume_hint)
    finally:
        stop.uninstall()
        for t in run.trainees:
            if t.writer is not None:
                t.writer.flush()


def train_batch(
    run: Run, images: list[torch.Tensor], targets: list[dict[str, Any]], epoch: int
) -> dict[str, torch.Tensor | float]:
    """One batch for every trainee; returns the last trainee's logs (device scalars).

    images: (3, H_i, W_i) each, on the device; targets: per image {"boxes", "labels", ...}
    """
    accelerator, step = run.accelerator, run.progress.step
    # Shared transform, once: teacher and students see one ImageList, one anchor set.
    image_list, targets = run.transform(images, targets)
    teacher_out = None
    if run.teacher is not None:
        terms = [t.terms for t in run.trainees]
        teacher_out = teacher_forward(accelerator, run.teacher, image_list, terms)
    # One accumulation window for all: each trainee's own accumulate() would advance the one
    # shared counter K times a batch (optimizers stepping off the window).
    logs: dict[str, torch.Tensor | float] = {}
    with accelerator.accumulate(*(t.module for t in run.trainees)):
        for t in list(run.trainees):
            # student forward, detection + KD terms summed (step_losses), backward, step
            outcome, logs = train_step(
                accelerator, t, image_list, targets, teacher_out, step, epoch
            )
            if outcome is None:
                continue
            try:
                _after_step(t, outcome, run.progress, logs)
            except NonFiniteLoss as err:
                if not run.leave_on_failure:
                    raise
                leave(run, t, f"failed: {err}")
    return logs


def _epoch_batches(run: Run, epoch: int) -> tqdm:
    """The epoch's batches (resuming mid-epoch: the same order, without those consumed)."""
    run.train_set.set_epoch(epoch)  # flips of this epoch
    run.train_loader.set_epoch(epoch)  # shuffle order of this epoch
    loader = run.train_loader
    if run.progress.batch > 0:
        loader = run.accelerator.skip_first_batches(run.train_loader, run.progress.batch)
    for t in run.trainees:
        t.module.train()
    return tqdm(
        loader,
        desc=f"epoch {epoch}",
        disable=not run.accelerator.is_main_process,
        leave=False,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # log files: a line per 30 s
    )


def _log_step(
    run: Run, bar: tqdm, logs: dict[str, torch.Tensor | float], epoch: int, images_per_s: float
) -> None:
    """At the first step and every ``train.log_every``: the loss and images/s on the progress
    bar, each trainee's scalars to TensorBoard."""
    step = run.progress.step
    if step % run.cfg.train.log_every != 0 and step != 1:
        return
    loss = float(logs["loss/total"])  # waits for the device: only at the steps that log
    # refresh=False: the bar redraws at its mininterval (log files)
    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_s:.1f}", refresh=False)
    for t in run.trainees:
        _log_scalars(t, step, epoch, images_per_s)


def _checkpoint_or_stop(
    run: Run,
    epoch: int,
    stop: StopFlag,
    stop_after: int | None,
    clock: _Clock,
    resume_hint: str,
) -> None:
    """After an optimizer step: a checkpoint every ``train.checkpoint_every_steps``; on a stop
    signal on any process (asked at every step: one all-reduce, so that all stop at the same
    step) or at step ``stop_after``, a checkpoint and ``TrainingStopped``."""
    accelerator, progress = run.accelerator, run.progress
    every = run.cfg.train.checkpoint_every_steps
    stop_now = _any_process(accelerator, stop.requested or progress.step == stop_after)
    if stop_now or (every > 0 and progress.step % every == 0):
        clock.record()
        save_checkpoint(accelerator, run.checkpoint_dir, progress)
    if stop_now:
        raise TrainingStopped(
            f"stopped at epoch {epoch}, step {progress.step} "
            f"({stop.reason or 'on request'}); checkpoint saved: {resume_hint}"
        )


def _end_epoch(run: Run, epoch: int, stop: StopFlag, clock: _Clock, resume_hint: str) -> None:
    """After the epoch's batches (or the last step): every ``eval.every_epochs`` epochs and at
    the end, evaluate each trainee; a checkpoint at the epoch's boundary; stop on a signal
    unless training is over anyway."""
    accelerator, progress = run.accelerator, run.progress
    progress.epoch, progress.batch = epoch + 1, 0
    last = epoch + 1 == run.cfg.train.epochs or progress.step >= run.total_steps
    every = run.cfg.eval.every_epochs
    if last or (every > 0 and (epoch + 1) % every == 0):
        for t in run.trainees:
            t.last_eval = evaluate_trainee(t, run)
    clock.record()
    save_checkpoint(accelerator, run.checkpoint_dir, progress)
    if _any_process(accelerator, stop.requested) and not last:
        raise TrainingStopped(f"stopped after epoch {epoch} ({stop.reason}); {resume_hint}")


class _Clock:
    """The loop's wall time: ``progress.seconds`` (summed over resumed sessions, recorded before
    each checkpoint) and the images per second of each optimizer step."""

    def __init__(self, progress: Progress, images_per_step: int) -> None:
        self.progress, self.images_per_step = progress, images_per_step
        self.start, self.seconds_before = time.perf_counter(), progress.seconds
        self.tic = self.start

    def start_epoch(self) -> None:
        self.tic = time.perf_counter()

    def images_per_s(self) -> float:
        """Of the step since the last call (or the epoch's start)."""
        toc = time.perf_counter()
        images_per_s, self.tic = self.images_per_step / max(toc - self.tic, 1e-9), toc
        return images_per_s

    def record(self) -> None:
        self.progress.seconds = self.seconds_before + time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------
# The finish
# ---------------------------------------------------------------------------------------------


def finish(run: Run) -> list[dict[str, Any]]:
    """Check the frozen teacher, evaluate where the loop did not, write weights and metrics."""
    accelerator, progress = run.accelerator, run.progress
    teacher_digest = progress.teacher_digest or ""
    if run.teacher is not None and state_digest(run.teacher) != teacher_digest:
        raise RuntimeError(
            "the frozen teacher's weights or BatchNorm statistics changed during training"
        )
    results = []
    for t in run.trainees:
        metrics = t.last_eval or evaluate_trainee(t, run)
        metrics = {
            **metrics,
            "job": run.job,
            "step": progress.step,
            "epoch": progress.epoch,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,  # what train.mixed_precision became
            "nonfinite_skipped": progress.nonfinite.get(str(t.run_dir), 0),
            "scaler_skipped": progress.scaler_skipped.get(str(t.run_dir), 0),  # fp16 overflows
            "teacher_digest": teacher_digest,
            "train_minutes": progress.seconds / 60,  # of the whole lockstep group
        }
        if accelerator.is_main_process:
            weights_name = "teacher.pt" if run.job == "teacher" else "student.pt"
            # the card first: a weights file on disk always has its card (teacher.json, ...)
            num_classes = run.train_set.num_categories + 1  # + background, as in setup
            # a teacher's card keeps its mAP on its own validation set: distill check compares
            # its mAP on another dataset against it
            evaluation = (
                evaluation_record(metrics, run.val_set.ann_path) if run.job == "teacher" else None
            )
            write_card(
                t.run_dir / weights_name,
                t.cfg,
                run.job,
                num_classes,
                dataset_categories(run.train_set),
                evaluation,
            )
            save_state_dict_file(
                student_state_dict(accelerator.unwrap_model(t.module)), t.run_dir / weights_name
            )
            write_json(metrics, t.run_dir / "metrics.json")
            log.info(
                "%s: mAP %.4f (AP50 %.4f); wrote %s, its card and metrics.json",
                t.run_dir, metrics["map"], metrics["ap50"], weights_name,
            )  # fmt: skip
            if t.writer is not None:
                t.writer.close()
        results.append(metrics)
    accelerator.wait_for_everyone()
    return results


# ---------------------------------------------------------------------------------------------
# Steps, logging, evaluation
# ---------------------------------------------------------------------------------------------


def _after_step(
    t: Trainee, outcome: StepOutcome, progress: Progress, logs: dict[str, torch.Tensor | float]
) -> None:
    """Count non-finite steps (stop after ``train.max_nonfinite`` in a row) and fp16 overflow
    steps, and keep the logs."""
    key = str(t.run_dir)
    if outcome is StepOutcome.SKIPPED:
        t.nonfinite_in_a_row += 1
        progress.nonfinite[key] = progress.nonfinite.get(key, 0) + 1
        log.warning(
            "%s: non-finite loss at step %d, step skipped (%d in a row): %s",
            t.run_dir, progress.step, t.nonfinite_in_a_row, _floats(logs),
        )  # fmt: skip
        if t.writer is not None:
            t.writer.add_scalar("train/nonfinite_skipped", progress.nonfinite[key], progress.step)
        if t.nonfinite_in_a_row >= t.cfg.train.max_nonfinite:
            raise NonFiniteLoss(
                f"{t.nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite="
                f"{t.cfg.train.max_nonfinite}) in {t.run_dir}; last terms {_floats(logs)}. Lower "
                "train.lr, set train.grad_clip, or resume from the last checkpoint with --resume"
            )
        return
    t.nonfinite_in_a_row = 0
    if outcome is StepOutcome.OVERFLOW:  # the fp16 grad scaler's own skip: not an error
        progress.scaler_skipped[key] = progress.scaler_skipped.get(key, 0) + 1
    t.last_logs = logs


def _log_scalars(t: Trainee, step: int, epoch: int, images_per_s: float) -> None:
    if t.writer is None:
        return
    logs = dict(t.last_logs)
    logs["train/lr"] = t.scheduler.get_last_lr()[0]
    if t.grad_norm is not None:
        logs["train/grad_norm"] = float(t.grad_norm)
    logs["train/images_per_s"] = images_per_s
    logs["train/epoch"] = epoch
    for key, value in _floats(logs).items():
        t.writer.add_scalar(key, value, step)


def _floats(logs: dict[str, Any]) -> dict[str, float]:
    """Logged values as python floats (each device tensor read is a host sync)."""
    return {key: float(value) for key, value in logs.items()}


def evaluate_trainee(t: Trainee, run: Run) -> dict[str, Any]:
    """COCO metrics of trainee ``t`` on the group's evaluation split (every process), logged
    to its TensorBoard at the current step."""
    accelerator, teacher, transform, val_set = (
        run.accelerator,
        run.teacher,
        run.transform,
        run.val_set,
    )
    step = run.progress.step
    cfg = t.cfg
    batch_size = cfg.eval.batch_size or cfg.data.batch_size
    if accelerator.num_processes > 1:
        # DDP broadcasts buffers only at the start of a training forward, so each process still
        # holds the BatchNorm statistics of its own last batch: evaluate process 0's, the ones
        # student.pt gets (broadcast is in place).
        broadcast(list(t.detector.buffers()), from_process=0)
    metrics = evaluate(
        t.detector, transform, val_set, accelerator, batch_size, cfg.data.num_workers
    )
    if t.writer is not None:
        for key, value in metrics.items():
            if isinstance(value, float):
                t.writer.add_scalar(f"eval/{key}", value, step)
        for name, value in metrics.get("per_class", {}).items():
            t.writer.add_scalar(f"eval_class/{name}", value, step)
        if cfg.eval.images_logged > 0:
            log_detections(
                t.writer, t.detector, teacher, transform, val_set, cfg.eval.images_logged, step
            )
        log.info("%s step %d: mAP %.4f AP50 %.4f", t.run_dir, step, metrics["map"], metrics["ap50"])
    return metrics


def _trace_batch(
    t: Trainee, accelerator: Accelerator, progress: Progress, targets: list[dict[str, Any]]
) -> None:
    """With ``train.trace_batches``: append the image ids of every batch to a per-process file."""
    if not t.cfg.train.trace_batches:
        return
    path = t.run_dir / f"batches.rank{accelerator.process_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "epoch": progress.epoch,
        "batch": progress.batch,
        "ids": [int(x["image_id"]) for x in targets],
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (one all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor(1.0 if flag else 0.0, device=accelerator.device)
    return bool(accelerator.reduce(value, "sum").item() > 0)
