"""Channel-wise distillation (Shu et al., ICCV 2021): per channel, the student's spatial
distribution at a temperature against the teacher's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from distill.kd.base import Batch
from distill.kd.features.base import FeatureKind
from distill.losses.features import cwd_loss

__all__ = ["CWD", "CWDConfig"]


@dataclass(frozen=True)
class CWDConfig:
    tau: float = 1.0  # temperature (MMRazor's CWD configs: tau=1)


class CWD(FeatureKind):
    """``cwd_loss`` of each level at ``distill.feature.cwd.tau``."""

    name = "cwd"
    config_class = CWDConfig
    positive = ("tau",)
    cfg: CWDConfig

    def loss(
        self, level: str, student: Tensor, teacher: Tensor, extras: Mapping[str, Tensor],
        batch: Batch,
    ) -> Tensor:  # fmt: skip
        return cwd_loss(student, teacher, self.cfg.tau)
