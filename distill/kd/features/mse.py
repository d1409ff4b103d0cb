"""FitNet's hint loss (Romero et al. 2015): the adapted student's features regress the teacher's."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from distill.kd.base import Batch
from distill.kd.features.base import FeatureKind
from distill.losses.features import mse_loss

__all__ = ["MSE"]


class MSE(FeatureKind):
    """``mse_loss`` of each level, with a learnable 1x1 regressor on every level."""

    name = "mse"
    always_adapt = True

    def loss(
        self, level: str, student: Tensor, teacher: Tensor, extras: Mapping[str, Tensor],
        batch: Batch,
    ) -> Tensor:  # fmt: skip
        return mse_loss(student, teacher)
