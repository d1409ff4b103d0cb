"""One training step of one trainee: the batch, already through the shared transform, goes into
the frozen teacher (``teacher_forward``, once for all trainees) and into the trainee's prepared
module; the detection loss and the KD terms are summed (``step_losses``); backward; and at the end
of an accumulation window the optimizer step, or a skip that every process agrees on.

Read this file first: it is the whole of what distillation adds to a training step. The loop
around it (epochs, logging, checkpoints, stopping) is ``distill.engine.loop``; the trainee it
steps, ``distill.engine.build.Trainee``.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torchvision.models.detection.image_list import ImageList

from distill.engine.build import Trainee
from distill.kd import Batch, KDTerm, combine, distill_terms, kd_scale, kd_weights
from distill.models.retinanet import DenseOutputs, dense_forward, detection_loss

__all__ = [
    "StepOutcome", "end_window", "step_losses", "step_parts", "teacher_forward", "train_step",
]  # fmt: skip

log = logging.getLogger(__name__)


class StepOutcome(enum.Enum):
    """How an accumulation window ended, the same on every process (``end_window``)."""

    STEPPED = "stepped"  # the optimizer and the LR schedule stepped
    # fp16's grad scaler found inf/NaN gradients of a finite loss (its scale was too large): no
    # step, the scale shrinks, the LR schedule waits
    OVERFLOW = "overflow"
    # the loss (or, without a scaler, the gradient norm) of the window was not finite on some
    # process: every process drops the gradients, puts the BatchNorm statistics back and
    # leaves weights, optimizer and LR untouched
    SKIPPED = "skipped"


def teacher_forward(
    accelerator: Accelerator | None,
    teacher: nn.Module,
    image_list: ImageList,
    terms: Sequence[Mapping[str, KDTerm]] = (),
) -> DenseOutputs:
    """The frozen teacher on the shared batch: no_grad, autocast, never prepared.

    With the hooks that the KD terms of the trainees (``terms``, one mapping per trainee) need
    around it (their ``teacher_probes``, each distinct one once: CrossKD's tower statistics),
    whose tensors are added to the outputs' ``extras`` after the forward. ``accelerator``
    None: float32, no autocast (``distill check``, which uses no process group)."""
    probes = dict.fromkeys(
        probe for trainee in terms for term in trainee.values() for probe in term.teacher_probes()
    )
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    with torch.no_grad(), autocast, ExitStack() as stack:
        extras_of = [stack.enter_context(probe.watch(teacher)) for probe in probes]
        out = dense_forward(teacher, image_list)
    for extras in extras_of:
        out.extras.update(extras(out))
    return out


def step_losses(
    module: nn.Module,
    detector: nn.Module,
    terms: Mapping[str, KDTerm],
    image_list: ImageList,
    targets: list[dict[str, Any]],
    teacher_out: DenseOutputs | None,
    scale: float,
    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """A trainee's forward and its losses on a transformed batch: the detection loss against
    the ground truth plus ``scale`` times the weighted KD ``terms`` against the teacher, anchor
    by anchor and level by level. The training step and ``distill check`` both call it.

    module: the trainee's (prepared) ``TrainableModule``; detector: the RetinaNet inside it
    teacher_out: ``teacher_forward``'s outputs on the same batch (None without terms)
    mean_over_processes: ``mean_over_processes(accelerator)`` (None: one process)
    returns: ``combine``'s total and logs
    """
    det_losses, kd_losses = step_parts(
        module, detector, terms, image_list, targets, teacher_out, mean_over_processes
    )
    return combine(det_losses, kd_losses, kd_weights(terms), scale)


def step_parts(
    module: nn.Module,
    detector: nn.Module,
    terms: Mapping[str, KDTerm],
    image_list: ImageList,
    targets: list[dict[str, Any]],
    teacher_out: DenseOutputs | None,
    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The losses ``step_losses`` combines, each in the autograd graph: the detection losses
    {name: loss} and the unweighted KD losses {name: loss} (``distill check`` measures the
    gradient of each)."""
    # the detector and the KD terms' trainable parts, which may read the teacher's outputs
    student_out = module(image_list.tensors, image_list.image_sizes, teacher_out)
    det_losses = detection_loss(detector, student_out, targets)  # vs the ground truth
    size = (int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1]))
    batch = Batch(targets, size, mean_over_processes, image_list.image_sizes)
    kd_losses = distill_terms(terms, student_out, teacher_out, batch)  # vs the teacher
    return det_losses, kd_losses


def train_step(
    accelerator: Accelerator,
    t: Trainee,
    image_list: ImageList,
    targets: list[dict[str, Any]],
    teacher_out: DenseOutputs | None,
    step: int,
    epoch: int,
) -> tuple[StepOutcome | None, dict[str, torch.Tensor | float]]:
    """Forward and backward of trainee ``t`` on a transformed batch and, at the end of an
    accumulation window, the optimizer step. Runs inside ``accelerator.accumulate`` of every
    trainee's module (one window for all of them).

    Returns ``(outcome, logs)``: outcome is None inside an accumulation window, else how the
    window ended (a ``StepOutcome``); logs are the loss terms (device scalars) by name.
    """
    if t.saved_buffers is None:  # first micro-batch of the window
        t.saved_buffers = [b.detach().clone() for b in t.module.buffers()]
    scale = kd_scale(t.cfg.distill, step, epoch)  # the KD terms' warm-up and stop
    total, logs = step_losses(
        t.module, t.detector, t.terms, image_list, targets, teacher_out, scale,
        mean_over_processes(accelerator),
    )  # fmt: skip
    bad = ~torch.isfinite(total.detach())  # on the device: no host sync per micro-batch
    t.window_bad = bad if t.window_bad is None else t.window_bad | bad
    accelerator.backward(total)  # fp16: of the loss times the grad scaler's scale
    if not accelerator.sync_gradients:
        return None, logs
    return end_window(accelerator, t), logs


def end_window(accelerator: Accelerator, t: Trainee) -> StepOutcome:
    """Clip, then step the optimizer and the LR schedule, or skip (see ``train_step``)."""
    max_norm = t.cfg.train.grad_clip or math.inf
    # fp16: unscales the gradients first (once per step); an overflow makes the norm inf
    grad_norm = accelerator.clip_grad_norm_(t.module.parameters(), max_norm)
    assert t.window_bad is not None and t.saved_buffers is not None  # set by train_step
    outcome = _window_outcome(accelerator, t.window_bad, grad_norm, accelerator.scaler)
    if outcome is StepOutcome.STEPPED:
        t.optimizer.step()  # fp16: the prepared optimizer's step also updates the scaler
        t.scheduler.step()
    else:
        if outcome is StepOutcome.SKIPPED:
            with torch.no_grad():
                for buffer, saved in zip(t.module.buffers(), t.saved_buffers):
                    buffer.copy_(saved)
        if accelerator.scaler is not None:
            # Close the step that unscale_ opened (the next unscale_ would fail) and shrink
            # the scale. The optimizer is not called: torch's fused SGD, told to skip its
            # first step, keeps an uninitialised momentum buffer (torch 2.14).
            accelerator.scaler.update()
    t.grad_norm = grad_norm.detach() if outcome is StepOutcome.STEPPED else None
    t.optimizer.zero_grad(set_to_none=True)
    t.saved_buffers, t.window_bad = None, None
    return outcome


def _window_outcome(
    accelerator: Accelerator, loss_bad: torch.Tensor, grad_norm: torch.Tensor, scaler: Any
) -> StepOutcome:
    """What to do at the end of a window, the same on every process: one all-reduce of two
    flags and one host sync. A non-finite gradient of a finite loss is the grad scaler's
    overflow under fp16 (``OVERFLOW``), an error (``SKIPPED``) without one."""
    # gradients are averaged over processes already (so is the norm), the loss flags are not
    flags = torch.stack([loss_bad, ~torch.isfinite(grad_norm)]).float()  # (2,)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    verdict = int((2 * (flags[0] > 0) + (flags[1] > 0)).item())  # the host sync
    if verdict == 0:
        return StepOutcome.STEPPED
    if verdict == 1 and scaler is not None:
        return StepOutcome.OVERFLOW
    return StepOutcome.SKIPPED


def mean_over_processes(accelerator: Accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The mean of a scalar over all processes (an all-reduce, no host sync); None for one."""
    if accelerator.num_processes == 1:
        return None
    return lambda value: accelerator.reduce(value, "mean")
