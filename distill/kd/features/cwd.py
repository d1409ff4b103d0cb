"""Channel-wise distillation (Shu et al., ICCV 2021): per channel, the student's spatial
distribution at a temperature against the teacher's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from distill.kd.base import Batch
from distill.kd.features.base import FeatureKind, KindConfig
from distill.losses.features import cwd_loss

__all__ = ["CWD", "CWDConfig"]


@dataclass(frozen=True)
class CWDConfig(KindConfig):
    """MMRazor's cwd_fpn_retina_r101_retina_r50_1x_coco.py: ChannelWiseDivergence tau 1,
    loss_weight 10 on each FPN level (the weight of the levels' sum)."""

    weight: float = 10.0
    tau: float = 1.0  # temperature


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
