"""Weighting and summing: the detection loss plus the enabled KD terms.

    kd = distill_terms(student_out, teacher_out, targets, image_size, cfg.distill)
    total, log = combine(det_losses, kd, cfg.distill, step, epoch)

A KD term exists only when its config weight is > 0; with every weight 0 no teacher is needed
(``needs_teacher``), ``distill_terms`` returns {} and ``combine`` returns exactly the plain
detection loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from distill.config import DistillConfig
from distill.losses.crosskd import crosskd_box_loss, kd_quality_focal_loss, match_anchors
from distill.losses.features import feature_kd_loss
from distill.losses.logits import box_distill_loss, soft_label_loss, teacher_confidence
from distill.models.retinanet import DenseOutputs

__all__ = [
    "combine",
    "crosskd_teacher_layer",
    "distill_terms",
    "kd_scale",
    "kd_weights",
    "needs_teacher",
    "uses_crosskd",
]

ANCHOR_WEIGHTINGS = ("none", "teacher_max")


def kd_weights(cfg: DistillConfig) -> dict[str, float]:
    """The configured weight of each KD term:
    {"feature": w, "logit": w, "box": w, "crosskd_cls": w, "crosskd_box": w}."""
    return {
        "feature": cfg.feature.weight,
        "logit": cfg.logit.weight,
        "box": cfg.box.weight,
        "crosskd_cls": cfg.crosskd.cls_weight,
        "crosskd_box": cfg.crosskd.box_weight,
    }


def uses_crosskd(cfg: DistillConfig) -> bool:
    """True when a CrossKD term has a weight > 0 (the student needs a cross head)."""
    return cfg.crosskd.cls_weight > 0 or cfg.crosskd.box_weight > 0


def crosskd_teacher_layer(cfg: DistillConfig) -> int:
    """The teacher tower convs CrossKD skips (``teacher_layer``, or ``layer`` when null)."""
    layer = cfg.crosskd.teacher_layer
    return cfg.crosskd.layer if layer is None else layer


def needs_teacher(cfg: DistillConfig) -> bool:
    """True when some KD term has a weight > 0, i.e. the teacher must run."""
    return any(weight > 0 for weight in kd_weights(cfg).values())


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
) -> dict[str, Tensor]:
    """The unweighted KD terms whose weight is > 0, keyed as ``kd_weights``.

    student, teacher: dense outputs on the same ``ImageList`` (same anchors); ``teacher`` may be
        None when no weight is > 0, and is then never looked at
    targets: per image {"boxes": (B_i, 4) xyxy in the transformed frame, ...} (FGD's masks)
    image_size: (H, W) of the padded batch (FGD's masks)
    mean_over_processes: with several processes, the mean of a scalar over all of them (an
        all-reduce; every process must call ``distill_terms``). The anchor-weighted terms divide
        by it of their local weight sums, so that 2 processes with batch B give the gradient of
        1 process with batch 2B; None: one process
    returns: {name: scalar float32}

    - feature: ``feature_kd_loss`` of ``student.adapted`` vs ``teacher.features`` over
      ``cfg.feature.levels``, summed or averaged (``cfg.feature.level_reduction``); FGD also
      uses ``student.extras["global_s/<level>"]`` and ``["global_t/<level>"]`` where present.
    - logit: ``soft_label_loss`` at ``cfg.logit.temperature``, anchors weighted by the teacher's
      max class probability (``anchor_weighting: teacher_max``) or uniformly (``none``).
    - box: ``box_distill_loss`` on the anchors whose teacher max class probability is
      >= ``cfg.box.score_threshold`` (weight 1 there, 0 elsewhere).
    - crosskd_cls, crosskd_box: ``kd_quality_focal_loss`` and ``crosskd_box_loss`` of the
      cross-head predictions (``student.extras["crosskd/..."]``) vs the teacher's, without the
      anchors in the matcher's ignore zone, both divided by the batch's foreground anchors
      (floored at 1 per image, averaged over processes; ``match_anchors``, one matcher pass).
    - feature with ``kind: mgd``: ``mgd_loss`` of ``student.extras["mgd/<level>"]``.
    """
    weights = kd_weights(cfg)
    if not needs_teacher(cfg):
        return {}
    if teacher is None:
        enabled = [name for name, weight in weights.items() if weight > 0]
        raise ValueError(f"KD terms {enabled} have weight > 0 but no teacher outputs were given")
    terms: dict[str, Tensor] = {}
    if weights["feature"] > 0:
        feature = cfg.feature
        if not student.adapted:
            raise ValueError("feature KD needs the adapted student features (student.adapted)")
        global_s = _extras_per_level(student.extras, "global_s", feature.levels)
        global_t = _extras_per_level(student.extras, "global_t", feature.levels)
        compared = student.adapted
        if feature.kind == "mgd":  # the generators' outputs from the masked features
            compared = _extras_per_level(student.extras, "mgd", feature.levels)
            if not compared:
                raise ValueError("MGD needs the generators' outputs (student.extras['mgd/...'])")
        terms["feature"] = feature_kd_loss(
            feature.kind,
            compared,
            teacher.features,
            feature.levels,
            tau=feature.tau,
            boxes_per_image=[target["boxes"] for target in targets],
            image_size=image_size,
            fgd_alpha=feature.fgd_alpha,
            fgd_beta=feature.fgd_beta,
            fgd_gamma=feature.fgd_gamma,
            fgd_lambda=feature.fgd_lambda,
            global_s=global_s or None,
            global_t=global_t or None,
            reduction=feature.level_reduction,
        )
    confidence = None
    if weights["logit"] > 0 or weights["box"] > 0:
        confidence = teacher_confidence(teacher.cls_logits)  # (N, A)
    if weights["logit"] > 0:
        logit = cfg.logit
        if logit.anchor_weighting not in ANCHOR_WEIGHTINGS:
            raise ValueError(
                f"unknown distill.logit.anchor_weighting {logit.anchor_weighting!r}; "
                f"expected one of {ANCHOR_WEIGHTINGS}"
            )
        anchor_weights = confidence if logit.anchor_weighting == "teacher_max" else None
        terms["logit"] = soft_label_loss(
            student.cls_logits,
            teacher.cls_logits,
            logit.temperature,
            logit.kind,
            anchor_weights,
            _normaliser(anchor_weights, mean_over_processes),
        )
    if weights["box"] > 0:
        assert confidence is not None  # computed above whenever the box weight is > 0
        selected = (confidence >= cfg.box.score_threshold).float()
        terms["box"] = box_distill_loss(
            student.bbox_regression,
            teacher.bbox_regression,
            student.anchors,
            selected,
            cfg.box.kind,
            _normaliser(selected, mean_over_processes),
        )
    if uses_crosskd(cfg):
        wanted = [f"crosskd/{name}" for name, term in
                  (("cls_logits", "crosskd_cls"), ("bbox_regression", "crosskd_box"))
                  if weights[term] > 0]  # fmt: skip
        if any(key not in student.extras for key in wanted):
            raise ValueError(f"CrossKD needs the cross-head predictions {wanted} (student.extras)")
        boxes = [target["boxes"] for target in targets]
        foreground, valid = match_anchors(student.anchors, boxes)  # scalar, (N, A)
        if mean_over_processes is not None:
            foreground = mean_over_processes(foreground)
        if weights["crosskd_cls"] > 0:
            terms["crosskd_cls"] = kd_quality_focal_loss(
                student.extras["crosskd/cls_logits"],
                teacher.cls_logits,
                cfg.crosskd.beta,
                valid,
                foreground,
            )
        if weights["crosskd_box"] > 0:
            terms["crosskd_box"] = crosskd_box_loss(
                student.extras["crosskd/bbox_regression"],
                teacher.bbox_regression,
                student.anchors,
                teacher.cls_logits,
                valid,
                foreground,
            )
    return terms


def _normaliser(
    weights: Tensor | None, mean_over_processes: Callable[[Tensor], Tensor] | None
) -> Tensor | None:
    """The sum of the anchor weights, averaged over processes (None: the local sum is used)."""
    if weights is None or mean_over_processes is None:
        return None
    return mean_over_processes(weights.detach().float().sum())


def _extras_per_level(
    extras: Mapping[str, Tensor], prefix: str, levels: Sequence[str]
) -> dict[str, Tensor]:
    return {level: extras[f"{prefix}/{level}"] for level in levels if f"{prefix}/{level}" in extras}


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
