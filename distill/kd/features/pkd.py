"""Pearson-correlation feature distillation (Cao et al., NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from distill.kd.base import Batch
from distill.kd.features.base import FeatureKind, KindConfig
from distill.losses.features import pkd_loss

__all__ = ["PKD", "PKDConfig"]


@dataclass(frozen=True)
class PKDConfig(KindConfig):
    """MMRazor's pkd_fpn_retina_x101_retina_r50_2x_coco.py: PKDLoss loss_weight 10 on each
    distilled level."""

    weight: float = 10.0


class PKD(FeatureKind):
    """``pkd_loss`` of each level; by default on P3-P6, as MMRazor's PKD RetinaNet config
    distils neck outputs 0-3."""

    name = "pkd"
    config_class = PKDConfig
    default_levels = ("p3", "p4", "p5", "p6")

    def loss(
        self, level: str, student: Tensor, teacher: Tensor, extras: Mapping[str, Tensor],
        batch: Batch,
    ) -> Tensor:  # fmt: skip
        return pkd_loss(student, teacher)
