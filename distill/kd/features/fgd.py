"""Focal and Global Distillation (Yang et al., CVPR 2022): the teacher's attention and the
ground-truth boxes weigh the feature imitation; learnable global-context blocks (GcBlocks, after
GCNet) on both sides add a relation term."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import LEVEL_NAMES
from distill.kd.base import OK, WARN, Batch, Finding
from distill.kd.features.base import FeatureKind, KindConfig, KindPart
from distill.losses.features import fgd_attention_spread, fgd_loss
from distill.models.retinanet import DenseOutputs

__all__ = ["FGD", "FGDConfig", "FGDPart", "GlobalContextBlock", "build_global_blocks"]

# FGD's attention on the teacher's features spread over fewer than this share of a level's
# pixels or channels distils a handful of them: the teacher's features are large for its tau
FGD_MIN_SPREAD = 0.02


@dataclass(frozen=True)
class FGDConfig(KindConfig):
    """FGD's temperature and weights, as in its RetinaNet configs
    (fgd_retina_*_distill_retina_r50_fpn_2x_coco.py: temp 0.5, alpha 1e-3, beta 5e-4,
    gamma 5e-4, lambda 5e-6); the loss carries its own weights, so its ``weight`` is 1."""

    weight: float = 1.0
    tau: float = 0.5
    alpha: float = 0.001  # foreground imitation
    beta: float = 0.0005  # background imitation
    gamma: float = 0.0005  # attention imitation
    lambda_: float = 0.000005  # global relation (0: no global-context blocks are built)


class FGD(FeatureKind):
    """``fgd_loss`` of each level, with the global-context blocks' outputs where they exist."""

    name = "fgd"
    config_class = FGDConfig
    positive = ("tau",)
    non_negative = ("alpha", "beta", "gamma", "lambda_")
    cfg: FGDConfig

    def part(self, levels: Sequence[str], channels: int, seed: int) -> FGDPart | None:
        if self.cfg.lambda_ <= 0:
            return None
        blocks = build_global_blocks(levels, channels)  # {"student_p3": ..., "teacher_p3": ...}
        global_s = nn.ModuleDict({lv: blocks[f"student_{lv}"] for lv in levels})
        global_t = nn.ModuleDict({lv: blocks[f"teacher_{lv}"] for lv in levels})
        return FGDPart(global_s, global_t)

    def loss(
        self, level: str, student: Tensor, teacher: Tensor, extras: Mapping[str, Tensor],
        batch: Batch,
    ) -> Tensor:  # fmt: skip
        cfg = self.cfg
        return fgd_loss(
            student,
            teacher,
            [target["boxes"] for target in batch.targets],
            batch.image_size,
            tau=cfg.tau,
            alpha=cfg.alpha,
            beta=cfg.beta,
            gamma=cfg.gamma,
            lam=cfg.lambda_,
            global_s=extras.get(f"global_s/{level}"),
            global_t=extras.get(f"global_t/{level}"),
        )

    def findings(self, levels: Sequence[str], teacher: Mapping[str, Tensor]) -> list[Finding]:
        """How much of the finest distilled level the teacher's attention covers at ``tau``,
        and at 4x, 16x and 64x it, for the choice; under ``FGD_MIN_SPREAD`` is a warning."""
        tau = self.cfg.tau
        level = min(levels, key=LEVEL_NAMES.index)  # the most pixels
        x = teacher[level]
        size, width = x.shape[-2] * x.shape[-1], x.shape[1]
        spread = {k: fgd_attention_spread(x, tau * k) for k in (1, 4, 16, 64)}
        pixels, channels = spread[1]
        text = (
            f"at fgd.tau {tau:g} the teacher's attention on {level} spreads over {pixels:.1%} of "
            f"its {size} pixels and {channels:.1%} of its {width} channels (mean |feature| "
            f"{float(x.abs().mean()):.3g}); pixels / channels at fgd.tau "
            + ", ".join(f"{tau * k:g}: {p:.1%} / {c:.1%}" for k, (p, c) in spread.items() if k > 1)
        )
        least = min(pixels, channels)
        if least >= FGD_MIN_SPREAD:
            return [Finding("kd/fgd attention", OK, text, least)]
        advice = next(
            (
                f"set distill.feature.fgd.tau to {tau * k:g}, the first of these over "
                f"{FGD_MIN_SPREAD:.0%}"
                for k, (p, c) in spread.items()
                if min(p, c) >= FGD_MIN_SPREAD
            ),
            f"raise distill.feature.fgd.tau above {tau * 64:g}",
        )
        return [Finding(
            "kd/fgd attention", WARN,
            f"{text}: FGD weighs about {pixels * size:.0f} pixels and {channels * width:.0f} "
            f"channels of them; {advice}",
            least,
        )]  # fmt: skip


class FGDPart(KindPart):
    """FGD's global-context blocks: ``global_s`` on the adapted student's features, ``global_t``
    on the (constant) teacher's, one pair per level."""

    def __init__(self, global_s: nn.ModuleDict, global_t: nn.ModuleDict) -> None:
        super().__init__()
        self.global_s, self.global_t = global_s, global_t

    def forward(
        self, adapted: Mapping[str, Tensor], teacher: DenseOutputs | None
    ) -> dict[str, Tensor]:
        """``"global_s/<level>"`` and ``"global_t/<level>"``, each (N, C_t, H_l, W_l)."""
        if teacher is None:
            raise ValueError("FGD global-context blocks need the teacher's features")
        extras = {}
        for level in self.global_s:
            extras[f"global_s/{level}"] = self.global_s[level](adapted[level])
            extras[f"global_t/{level}"] = self.global_t[level](
                teacher.features[level].detach().to(adapted[level].dtype)
            )
        return extras


class GlobalContextBlock(nn.Module):
    """FGD's GcBlock (after GCNet, Cao et al. 2019): x + a transform of one global context.

    (N, C, H, W) -> (N, C, H, W):
        a = softmax_hw(conv_mask(x))                      (N, 1, H*W)  attention over positions
        context = sum_hw x[:, :, hw] * a[:, hw]           (N, C, 1, 1)
        out = x + conv(relu(layernorm(conv(context))))    C -> C/2 -> C
    As FGD, ``conv_mask`` is Kaiming-initialised (fan_in) and the last conv starts at zero, so
    the block starts as the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"GlobalContextBlock needs at least 2 channels, got {channels}")
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        last = self.channel_add[-1]
        assert isinstance(last, nn.Conv2d)
        nn.init.zeros_(last.weight)
        for conv in (self.conv_mask, last):
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        attention = F.softmax(self.conv_mask(x).reshape(n, 1, h * w), dim=-1)  # (N, 1, H*W)
        # (N, C, H*W) @ (N, H*W, 1) -> (N, C, 1)
        context = torch.bmm(x.reshape(n, c, h * w), attention.transpose(1, 2))
        return x + self.channel_add(context.reshape(n, c, 1, 1))


def build_global_blocks(levels: Sequence[str], channels: int) -> nn.ModuleDict:
    """FGD's learnable global-context blocks, one student/teacher pair per level.

    Returns ``ModuleDict({"student_<level>": GlobalContextBlock, "teacher_<level>": ...})``
    (flat, so ``blocks[f"student_{level}"](x)`` type-checks), built student blocks first (their
    initial weights draw from the global RNG in this order); ``channels``: the teacher's width.
    """
    return nn.ModuleDict(
        {
            f"{side}_{level}": GlobalContextBlock(channels)
            for side in ("student", "teacher")
            for level in levels
        }
    )
