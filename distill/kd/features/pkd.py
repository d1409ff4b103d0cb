"""Pearson-correlation feature distillation (Cao et al., NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from distill.kd.base import Batch
from distill.kd.features.base import FeatureKind
from distill.losses.features import pkd_loss

__all__ = ["PKD"]


class PKD(FeatureKind):
    """``pkd_loss`` of each level; by default on P3-P6, as MMRazor's PKD RetinaNet config
    distils neck outputs 0-3."""

    name = "pkd"
    default_levels = ("p3", "p4", "p5", "p6")

    def loss(
        self, level: str, student: Tensor, teacher: Tensor, extras: Mapping[str, Tensor],
        batch: Batch,
    ) -> Tensor:  # fmt: skip
        return pkd_loss(student, teacher)
