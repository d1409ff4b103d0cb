"""Distillation losses: pure functions of tensors, plus the function that weights and sums them.

- ``logits``: per-anchor soft labels (``soft_label_loss``) and box KD (``box_distill_loss``)
- ``features``: FPN feature KD (FitNet MSE, CWD, PKD, FGD, MGD) and its learnable blocks
- ``crosskd``: CrossKD's cross-head path and its two losses
- ``combine``: which terms are on, their warmup/stop schedule, the total loss

The plain detection loss (focal + box vs ground truth) is torchvision's, in
``distill.models.retinanet``.
"""

from distill.config import register_choices
from distill.losses.combine import (
    ANCHOR_WEIGHTINGS,
    combine,
    crosskd_teacher_layer,
    distill_terms,
    kd_scale,
    kd_weights,
    needs_teacher,
    uses_crosskd,
)
from distill.losses.crosskd import (
    CrossHead,
    crosskd_box_loss,
    kd_quality_focal_loss,
)
from distill.losses.features import (
    FEATURE_KINDS,
    LEVEL_REDUCTIONS,
    GlobalContextBlock,
    build_adapters,
    build_global_blocks,
    build_mgd_generators,
    cwd_loss,
    feature_kd_loss,
    fgd_loss,
    fgd_masks,
    mgd_loss,
    mgd_mask,
    mse_loss,
    pkd_loss,
)
from distill.losses.logits import (
    BOX_KINDS,
    LOGIT_KINDS,
    box_distill_loss,
    soft_label_loss,
    teacher_confidence,
    weighted_anchor_mean,
)

# the names of the distill.* keys, checked as a config is read
register_choices(
    {
        "distill.feature.kind": FEATURE_KINDS,
        "distill.feature.level_reduction": LEVEL_REDUCTIONS,
        "distill.logit.kind": LOGIT_KINDS,
        "distill.logit.anchor_weighting": ANCHOR_WEIGHTINGS,
        "distill.box.kind": BOX_KINDS,
    }
)

__all__ = [
    "BOX_KINDS",
    "FEATURE_KINDS",
    "LEVEL_REDUCTIONS",
    "LOGIT_KINDS",
    "CrossHead",
    "GlobalContextBlock",
    "box_distill_loss",
    "build_adapters",
    "build_global_blocks",
    "build_mgd_generators",
    "combine",
    "crosskd_box_loss",
    "crosskd_teacher_layer",
    "cwd_loss",
    "distill_terms",
    "feature_kd_loss",
    "fgd_loss",
    "fgd_masks",
    "kd_quality_focal_loss",
    "kd_scale",
    "kd_weights",
    "mgd_loss",
    "mgd_mask",
    "mse_loss",
    "needs_teacher",
    "pkd_loss",
    "soft_label_loss",
    "teacher_confidence",
    "uses_crosskd",
    "weighted_anchor_mean",
]
