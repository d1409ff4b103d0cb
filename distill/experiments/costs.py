"""What a training run costs on this machine, measured piece by piece on the run's own code, so
that ``distill demo`` can plan a schedule it then keeps to (its time budget on a slow CPU too).

``probe_run`` sets up the run as ``train_group`` does (``engine.setup``: the data, the frozen
teacher, every trainee in lockstep), trains a few batches through the loop's ``train_batch``
(one shared transform and one teacher forward for all trainees) on batches from the run's own
loader (its workers, its batch size), crosses an epoch's end as the loop does (the workers stop,
a checkpoint, new workers start, the next step), and finishes as the run does (evaluation,
weights, card, metrics) on one batch of validation images; the other validation batches are
timed through ``detect``. ``RunCost`` adds these up for any schedule."""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection import RetinaNet

from distill.config import Config, replace
from distill.data import build_dataset
from distill.engine.checkpoint import save_checkpoint
from distill.engine.loop import finish, train_batch
from distill.engine.setup import Run, setup
from distill.evaluation.evaluate import detect

__all__ = ["RunCost", "probe_run"]


@dataclass(frozen=True)
class RunCost:
    """Seconds a training run (one model, or several in lockstep) takes here, by what it does."""

    start: float  # setup (data, models, teacher, optimizers) and its slower first steps
    step: float  # an optimizer step of every model of the run, its batch loaded as the run does
    epoch: float  # an epoch: the checkpoint at its end and its loader's workers, started afresh
    end: float  # the evaluation of every model; its weights, card and metrics written
    steps_per_epoch: int

    @property
    def per_step(self) -> float:
        """Seconds a step adds to the run, its share of the epoch's cost included."""
        return self.step + self.epoch / self.steps_per_epoch

    def seconds(self, steps: int, done: int = 0) -> float:
        """The run trained to step ``steps``, from step ``done`` (a run continued from its
        checkpoint: loading that costs about what writing it did, counted as an epoch's)."""
        epochs = math.ceil(steps / self.steps_per_epoch) - done // self.steps_per_epoch
        resume = self.epoch if done else 0.0
        return self.start + resume + (steps - done) * self.step + epochs * self.epoch + self.end


def probe_run(cfgs: Sequence[Config], job: str, warmup: int = 2, steps: int = 4) -> RunCost:
    """What training ``cfgs`` in lockstep (``train_group(cfgs, job, ...)``) costs here: the mean
    of ``steps`` steps after ``warmup`` steps, and the run's start, epochs and end (see the module
    docstring). The teacher has random weights (its cost does not depend on them); the run
    writes into a scratch folder, and its log lines (a random teacher, scratch paths) are held
    back."""
    with tempfile.TemporaryDirectory(prefix="distill-probe-") as scratch, _quiet():
        eval_batch = cfgs[0].eval.batch_size or cfgs[0].data.batch_size
        val_batches = math.ceil(len(build_dataset(cfgs[0].data, "val")) / eval_batch)
        # finish() evaluates one batch of validation images; the others are timed apart
        probes = [
            replace(cfg, **{"teacher.weights": None, "data.max_val_images": eval_batch,
                            "output.dir": str(Path(scratch, f"model{i}"))})
            for i, cfg in enumerate(cfgs)
        ]  # fmt: skip
        tic = time.perf_counter()
        run = setup(probes, job, Path(scratch))
        started = time.perf_counter() - tic
        batches = _batches(run, 0)
        times, images = _steps(run, batches, warmup + steps)
        step = statistics.mean(times[warmup:])

        # An epoch's end and the next one's first step, as the loop crosses them: the workers
        # stop, a checkpoint, new workers start (forked from this process, so that its next
        # step also pays for copying the pages they share) and deliver the first batch.
        tic = time.perf_counter()
        batches.close()
        save_checkpoint(run.accelerator, Path(scratch), run.progress)
        saved = time.perf_counter()
        _steps(run, _batches(run, run.progress.epoch + 1), 1)
        epoch = max(0.0, time.perf_counter() - tic - step)
        # the slower first steps, less the workers' start there (counted with the epochs)
        first_steps = max(0.0, sum(times[:warmup]) - warmup * step - (epoch - (saved - tic)))

        tic = time.perf_counter()
        finish(run)
        end = time.perf_counter() - tic
        if val_batches > 1:  # the other validation batches, as the evaluation runs them
            for t in run.trainees:
                end += (val_batches - 1) * _inference_seconds(run, t.detector, images)
        steps_per_epoch = max(1, len(run.train_loader) // cfgs[0].train.grad_accum)
    return RunCost(started + first_steps, step, epoch, end, steps_per_epoch)


def _steps(
    run: Run, batches: Iterator[tuple[list[torch.Tensor], Any]], count: int
) -> tuple[list[float], list[torch.Tensor]]:
    """Seconds of each of the next ``count`` optimizer steps on ``batches``, the wait for their
    batches included, and the last batch's images."""
    times: list[float] = []
    tic = time.perf_counter()
    for images, targets in batches:
        train_batch(run, images, targets, run.progress.epoch)
        if not run.accelerator.sync_gradients:
            continue  # within an accumulation window
        run.progress.step += 1
        _sync(run)
        toc = time.perf_counter()
        times.append(toc - tic)
        tic = toc
        if len(times) == count:
            return times, images
    raise AssertionError("unreachable: _batches does not end")


def _batches(run: Run, epoch: int) -> Generator[tuple[list[torch.Tensor], Any], None, None]:
    """The run's batches from ``epoch`` on, epoch after epoch, as its loop draws them."""
    for t in run.trainees:
        t.module.train()
    while True:
        run.progress.epoch = epoch
        run.train_set.set_epoch(epoch)
        run.train_loader.set_epoch(epoch)
        yield from run.train_loader
        epoch += 1


def _inference_seconds(run: Run, detector: RetinaNet, images: list[torch.Tensor]) -> float:
    """Seconds ``detect`` (as evaluation runs it) takes on ``images``, after one untimed call."""
    detector.eval()
    for _ in range(2):
        tic = time.perf_counter()
        detect(detector, run.transform, images, run.accelerator)
        _sync(run)
    return time.perf_counter() - tic


def _sync(run: Run) -> None:
    if run.accelerator.device.type == "cuda":
        torch.cuda.synchronize(run.accelerator.device)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Log records of WARNING and below, and Python warnings (torchvision's about drawing no
    box), are dropped; errors still raise."""
    before = logging.root.manager.disable  # a level a caller disabled stays disabled after
    logging.disable(max(before, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)
