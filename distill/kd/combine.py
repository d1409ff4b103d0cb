"""Weighting and summing: the detection loss plus the enabled KD terms.

    terms = kd_terms(cfg.distill)                        # once per trainee
    kd = distill_terms(terms, student_out, teacher_out, Batch(targets, image_size, ...))
    total, log = combine(det_losses, kd, kd_weights(terms), kd_scale(cfg.distill, step, epoch))

A KD term exists only when its config weight is > 0 (``distill.kd.registry.kd_terms``); with
every weight 0 no teacher is needed (``needs_teacher``), ``distill_terms`` returns {} and
``combine`` returns exactly the plain detection loss.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from distill.config import DistillConfig
from distill.kd.base import Batch, KDTerm
from distill.kd.registry import kd_weights
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
    terms: Mapping[str, KDTerm],
    student: DenseOutputs,
    teacher: DenseOutputs | None,
    batch: Batch,
) -> dict[str, Tensor]:
    """The unweighted losses of ``terms`` (``kd_terms``, built once per trainee), keyed as
    ``kd_weights``, in the terms' order (``KDTerm.losses``).

    student, teacher: dense outputs on the same ``ImageList`` (same anchors); ``student`` from
        the trainable module (with the terms' tensors: adapted features, extras), ``teacher``
        from ``teacher_forward``; ``teacher`` may be None when there is no term, and is then
        never looked at
    batch: the targets, the padded size and per-image sizes, and the mean over processes
        (every process must call ``distill_terms``: the anchor-weighted terms divide by the
        mean of their local weight sums, so that 2 processes with batch B give the gradient of
        1 process with batch 2B)
    returns: {name: scalar float32}
    """
    if not terms:
        return {}
    if teacher is None:
        raise ValueError(
            f"KD terms {list(kd_weights(terms))} have weight > 0 but no teacher outputs were given"
        )
    losses: dict[str, Tensor] = {}
    for term in terms.values():
        losses.update(term.losses(student, teacher, batch))
    return losses


def combine(
    det_losses: Mapping[str, Tensor],
    kd: Mapping[str, Tensor],
    weights: Mapping[str, float],
    scale: float,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Total loss and its parts for logging.

    det_losses: {"classification": T, "bbox_regression": T} from ``detection_loss``
    kd: the output of ``distill_terms``; weights: {name: weight} (``kd_weights``)
    scale: the multiplier of every KD term (``kd_scale``: warm-up, stop epoch)
    returns: ``total = sum_i det_i + scale * sum_j weight_j * kd_j`` and a log dict with
        ``loss/<name>`` (each detection term), ``kd/<name>`` (each unweighted KD term),
        ``kd_weighted/<name>`` (``scale * weight * term``, what enters the total),
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
    unknown = set(kd) - set(weights)
    if unknown:
        raise KeyError(f"unknown KD terms {sorted(unknown)}; expected a subset of {list(weights)}")
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
