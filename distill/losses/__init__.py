"""Distillation losses: pure functions of tensors, shapes in their docstrings.

- ``logits``: per-anchor soft labels (``soft_label_loss``) and box KD (``box_distill_loss``);
  the anchor mask and mean every anchor-weighted loss shares (``anchors_inside``,
  ``weighted_anchor_mean``)
- ``features``: FPN feature KD (FitNet MSE, CWD, PKD, FGD, MGD)
- ``crosskd``: CrossKD's two losses on the cross-head predictions

The KD terms that call them, with their learnable parts and weights, are in ``distill.kd``; the
plain detection loss (focal + box vs ground truth) is torchvision's, in
``distill.models.retinanet``.
"""

from distill.losses.crosskd import crosskd_box_loss, kd_quality_focal_loss, match_anchors
from distill.losses.features import (
    cwd_loss,
    fgd_attention_spread,
    fgd_loss,
    fgd_masks,
    mgd_loss,
    mse_loss,
    pkd_loss,
)
from distill.losses.logits import (
    BOX_KINDS,
    LOGIT_KINDS,
    anchors_inside,
    box_distill_loss,
    soft_label_loss,
    teacher_confidence,
    weighted_anchor_mean,
)

__all__ = [
    "BOX_KINDS",
    "LOGIT_KINDS",
    "anchors_inside",
    "box_distill_loss",
    "crosskd_box_loss",
    "cwd_loss",
    "fgd_attention_spread",
    "fgd_loss",
    "fgd_masks",
    "kd_quality_focal_loss",
    "match_anchors",
    "mgd_loss",
    "mse_loss",
    "pkd_loss",
    "soft_label_loss",
    "teacher_confidence",
    "weighted_anchor_mean",
]
