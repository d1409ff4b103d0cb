"""FitNet's hint loss (Romero et al. 2015): the adapted student's features regress the teacher's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from distill.kd.base import Batch
from distill.kd.features.base import FeatureKind, KindConfig
from distill.losses.features import mse_loss

__all__ = ["MSE", "MSEConfig"]


@dataclass(frozen=True)
class MSEConfig(KindConfig):
    """No reference runs FitNet's hints on RetinaNet: weight 1."""

    weight: float = 1.0


class MSE(FeatureKind):
    """``mse_loss`` of each level, with a learnable 1x1 regressor on every level."""

    name = "mse"
    config_class = MSEConfig
    always_adapt = True

    def loss(
        self, level: str, student: Tensor, teacher: Tensor, extras: Mapping[str, Tensor],
        batch: Batch,
    ) -> Tensor:  # fmt: skip
        return mse_loss(student, teacher)
