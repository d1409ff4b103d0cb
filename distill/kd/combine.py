"""Weighting and summing: the detection loss plus the enabled KD terms.

    kd = distill_terms(student_out, teacher_out, targets, image_size, cfg.distill)
    total, log = combine(det_losses, kd, cfg.distill, step, epoch)

A KD term exists only when its config weight is > 0 (``distill.kd.registry.kd_terms``); with
every weight 0 no teacher is needed (``needs_teacher``), ``distill_terms`` returns {} and
``combine`` returns exactly the plain detection loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from distill.config import DistillConfig
from distill.kd.base import Batch
from distill.kd.registry import kd_terms, kd_weights
from distill.models.retinanet import DenseOutputs

__all__ = ["combine", "distill_terms", "kd_scale"]


def kd_scale(cfg: DistillConfig, step: int, epoch: int) -> float:
    """Multiplier of all KD terms at optimizer step ``step`` (0-based) in epoch ``epoch``.

    ``0`` from ``cfg.stop_epoch`` on; otherwise ``min(1, step / warmup_steps)``, a linear ramp
    from 0 at step 0 to 1 at step ``warmup_steps`` (always 1 when ``warmup_steps == 0``).
    """
    if cfg.stop_epoch is not None and epoch >= cfg.stop_epoch:
        return 0.0
    if cfg.warmup_steps <= 0:
        return 1.0
    return min(1.0, max(step, 0) / cfg.warmup_steps)


def distill_terms(
    student: DenseOutputs,
    teacher: DenseOutputs | None,
    targets: Sequence[Mapping[str, Tensor]],
    image_size: tuple[int, int],
    cfg: DistillConfig,
    mean_over_processes: Callable[[Tensor], Tensor] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Tensor]:
    """The unweighted losses of the KD terms whose weight is > 0, keyed as ``kd_weights``, in
    the terms' order (``KDTerm.losses``).

    student, teacher: dense outputs on the same ``ImageList`` (same anchors); ``student`` from
        the trainable module (with the terms' tensors: adapted features, extras), ``teacher``
        from ``teacher_forward``; ``teacher`` may be None when no weight is > 0, and is then
        never looked at
    targets: per image {"boxes": (B_i, 4) xyxy in the transformed frame, ...}
    image_size: (H, W) of the padded batch
    mean_over_processes: with several processes, the mean of a scalar over all of them (an
        all-reduce; every process must call ``distill_terms``). The anchor-weighted terms divide
        by it of their local weight sums, so that 2 processes with batch B give the gradient of
        1 process with batch 2B; None: one process
    image_sizes: per image, its own (h, w) in the padded batch (``ImageList.image_sizes``);
        CrossKD leaves out the anchors in the padding. None: no padding
    returns: {name: scalar float32}
    """
    terms = kd_terms(cfg)
    if not terms:
        return {}
    if teacher is None:
        raise ValueError(
            f"KD terms {list(kd_weights(cfg))} have weight > 0 but no teacher outputs were given"
        )
    batch = Batch(targets, image_size, mean_over_processes, image_sizes)
    losses: dict[str, Tensor] = {}
    for term in terms.values():
        losses.update(term.losses(student, teacher, batch))
    return losses


def combine(
    det_losses: Mapping[str, Tensor],
    kd: Mapping[str, Tensor],
    cfg: DistillConfig,
    step: int,
    epoch: int,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Total loss and its parts for logging.

    det_losses: {"classification": T, "bbox_regression": T} from ``detection_loss``
    kd: the output of ``distill_terms``
    returns: ``total = sum_i det_i + kd_scale * sum_j weight_j * kd_j`` and a log dict with
        ``loss/<name>`` (each detection term), ``kd/<name>`` (each unweighted KD term),
        ``kd_weighted/<name>`` (``kd_scale * weight * term``, what enters the total),
        ``kd/scale`` (a float) and ``loss/total``. The terms are detached scalar tensors, left
        on the device: reading one (``float(v)``) waits for the device, so the loop reads them
        only at the steps it logs.

    With ``kd`` empty the total is the sum of the detection terms, bit for bit (nothing, not
    even 0 * x, is added). When ``kd`` is non-empty its terms are added even at scale 0
    (warmup step 0, after ``stop_epoch``) so that the adapters stay in the autograd graph and
    DDP sees a gradient for every parameter; for finite terms that adds exactly 0.
    """
    if not det_losses:
        raise ValueError("combine needs at least one detection loss term")
    weights = kd_weights(cfg)
    unknown = set(kd) - set(weights)
    if unknown:
        raise KeyError(f"unknown KD terms {sorted(unknown)}; expected a subset of {list(weights)}")
    scale = kd_scale(cfg, step, epoch)
    log: dict[str, Tensor | float] = {}
    total: Tensor | None = None
    for name, value in det_losses.items():
        log[f"loss/{name}"] = value.detach()
        total = value if total is None else total + value
    assert total is not None
    weighted_sum: Tensor | None = None
    for name, value in kd.items():
        weighted = value * weights[name]
        log[f"kd/{name}"] = value.detach()
        log[f"kd_weighted/{name}"] = scale * weighted.detach()
        weighted_sum = weighted if weighted_sum is None else weighted_sum + weighted
    if weighted_sum is not None:
        total = total + scale * weighted_sum
    log["kd/scale"] = scale
    log["loss/total"] = total.detach()
    return total, log
