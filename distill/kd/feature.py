"""Feature KD: the student's FPN features, through learnable 1x1 adapters, against the teacher's
(``distill.feature``; kinds mse, cwd, pkd, fgd, mgd: the losses are in ``distill.losses.features``).

The learnable parts live here, in the trainable module (``FeatureModule``): the adapters, FGD's
global-context blocks (Yang et al., CVPR 2022) and MGD's generators with their random masks
(Yang et al., ECCV 2022).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet

from distill.config import DistillConfig, FeatureKDConfig, default_levels, register_choices
from distill.kd.base import Batch, KDTerm, TermModule
from distill.losses.features import FEATURE_KINDS, LEVEL_REDUCTIONS, feature_kd_loss
from distill.models.retinanet import DenseOutputs

__all__ = [
    "FeatureKD",
    "FeatureModule",
    "GlobalContextBlock",
    "build_adapters",
    "build_global_blocks",
    "build_mgd_generators",
    "mgd_mask",
]

register_choices({"distill.feature.kind": FEATURE_KINDS,
                  "distill.feature.level_reduction": LEVEL_REDUCTIONS})  # fmt: skip


@dataclass(frozen=True)
class FeatureKD(KDTerm):
    """``feature_kd_loss`` of the adapted student features (MGD: of its generators' outputs) vs
    the teacher's over ``cfg.levels``, summed or averaged (``cfg.level_reduction``); FGD also
    uses its global-context blocks' outputs where it has them (``fgd_lambda`` > 0)."""

    cfg: FeatureKDConfig

    @classmethod
    def from_config(cls, cfg: DistillConfig) -> FeatureKD | None:
        return cls(cfg.feature) if cfg.feature.weight > 0 else None

    def weights(self) -> dict[str, float]:
        return {"feature": self.cfg.weight}

    @property
    def levels(self) -> tuple[str, ...]:
        """``cfg.levels``, or the kind's default when null (a config not read from a file)."""
        levels = self.cfg.levels
        return default_levels(self.cfg.kind) if levels is None else tuple(levels)

    @property
    def tau(self) -> float:
        """The attention temperature of the kind: ``fgd_tau`` for fgd, else ``tau``."""
        return self.cfg.fgd_tau if self.cfg.kind == "fgd" else self.cfg.tau

    def build(self, student: RetinaNet, teacher: RetinaNet, seed: int) -> FeatureModule:
        """Adapters from the student's FPN width to the teacher's (mse: always, FitNet's
        regressor; other kinds: where the widths differ), then FGD's blocks, then MGD's
        generators, in that order (their initial weights draw from the global RNG)."""
        cfg, levels = self.cfg, self.levels
        s_ch, t_ch = _out_channels(student), _out_channels(teacher)
        adapters = None
        if cfg.kind == "mse" or s_ch != t_ch:
            adapters = build_adapters(levels, s_ch, t_ch)
        global_s = global_t = None
        if cfg.kind == "fgd" and cfg.fgd_lambda > 0:
            blocks = build_global_blocks(levels, t_ch)  # {"student_p3": ..., "teacher_p3": ...}
            global_s = nn.ModuleDict({lv: blocks[f"student_{lv}"] for lv in levels})
            global_t = nn.ModuleDict({lv: blocks[f"teacher_{lv}"] for lv in levels})
        generators = build_mgd_generators(levels, t_ch) if cfg.kind == "mgd" else None
        return FeatureModule(levels, adapters, global_s, global_t, generators, cfg.mgd_ratio, seed)

    def losses(
        self, student: DenseOutputs, teacher: DenseOutputs, batch: Batch
    ) -> dict[str, Tensor]:
        cfg, levels = self.cfg, self.levels
        if not student.adapted:
            raise ValueError("feature KD needs the adapted student features (student.adapted)")
        global_s = _extras_per_level(student.extras, "global_s", levels)
        global_t = _extras_per_level(student.extras, "global_t", levels)
        compared = student.adapted
        if cfg.kind == "mgd":  # the generators' outputs from the masked features
            compared = _extras_per_level(student.extras, "mgd", levels)
            if not compared:
                raise ValueError("MGD needs the generators' outputs (student.extras['mgd/...'])")
        loss = feature_kd_loss(
            cfg.kind,
            compared,
            teacher.features,
            levels,
            tau=self.tau,
            boxes_per_image=[target["boxes"] for target in batch.targets],
            image_size=batch.image_size,
            fgd_alpha=cfg.fgd_alpha,
            fgd_beta=cfg.fgd_beta,
            fgd_gamma=cfg.fgd_gamma,
            fgd_lambda=cfg.fgd_lambda,
            global_s=global_s or None,
            global_t=global_t or None,
            reduction=cfg.level_reduction,
        )
        return {"feature": loss}


def _extras_per_level(
    extras: Mapping[str, Tensor], prefix: str, levels: Sequence[str]
) -> dict[str, Tensor]:
    return {level: extras[f"{prefix}/{level}"] for level in levels if f"{prefix}/{level}" in extras}


def _out_channels(model: nn.Module) -> int:
    """FPN width of a RetinaNet (torchvision's backbones carry ``out_channels``)."""
    backbone: Any = model.backbone
    return int(backbone.out_channels)


class FeatureModule(TermModule):
    """The feature term's part of the trainable module: 1x1 ``adapters``, FGD's ``global_s`` /
    ``global_t`` blocks and MGD's ``generators`` (masking ``mgd_ratio`` of the positions)."""

    def __init__(
        self,
        levels: Sequence[str],
        adapters: nn.ModuleDict | None = None,
        global_s: nn.ModuleDict | None = None,
        global_t: nn.ModuleDict | None = None,
        generators: nn.ModuleDict | None = None,
        mgd_ratio: float = 0.65,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.levels = tuple(levels)  # the levels whose (adapted) features are compared
        self.adapters = adapters if adapters is not None else nn.ModuleDict()
        self.global_s = global_s if global_s is not None else nn.ModuleDict()
        self.global_t = global_t if global_t is not None else nn.ModuleDict()
        self.generators = generators if generators is not None else nn.ModuleDict()
        self.mgd_ratio, self.seed = mgd_ratio, seed
        # Training forwards so far: with the seed and the process, it seeds MGD's masks. Counted
        # in Python (reading a device tensor would wait for the device) and mirrored in a buffer
        # (with MGD only: other modules' state stays as it was), so a checkpoint keeps it and a
        # resumed run draws the masks it would have drawn.
        self._forwards = 0
        counter = torch.zeros((), dtype=torch.long) if len(self.generators) > 0 else None
        self.mgd_forwards: Tensor | None
        self.register_buffer("mgd_forwards", counter)  # None: not in the state dict
        self.register_load_state_dict_post_hook(FeatureModule._after_load)
        self.register_state_dict_pre_hook(FeatureModule._before_save)

    def forward(self, out: DenseOutputs, teacher: DenseOutputs | None, held: Any = None) -> None:
        """Sets ``out.adapted`` {level: (N, C_t, H_l, W_l)} and adds to ``out.extras``
        ``"global_s/<level>"``, ``"global_t/<level>"`` (FGD's blocks on the adapted student and
        on the (constant) teacher features) and ``"mgd/<level>"`` (MGD's regenerated features,
        from the masked adapted ones), each (N, C_t, H_l, W_l)."""
        # (N, C_s, H_l, W_l) -> (N, C_t, H_l, W_l) on distilled levels that have an adapter;
        # levels without one (channels already equal, no learnable projection) pass through.
        out.adapted = {
            level: self.adapters[level](out.features[level])
            if level in self.adapters
            else out.features[level]
            for level in self.levels
        }
        if len(self.global_s) > 0:
            if teacher is None:
                raise ValueError("FGD global-context blocks need the teacher's features")
            for level in self.global_s:
                out.extras[f"global_s/{level}"] = self.global_s[level](out.adapted[level])
                out.extras[f"global_t/{level}"] = self.global_t[level](
                    teacher.features[level].detach().to(out.adapted[level].dtype)
                )
        if len(self.generators) > 0:
            stream = self._mask_stream(out.cls_logits.device)
            for level in self.generators:
                adapted = out.adapted[level]
                mask = mgd_mask(adapted.shape, self.mgd_ratio, stream).to(adapted.dtype)
                out.extras[f"mgd/{level}"] = self.generators[level](adapted * mask)
        if self.training and self.mgd_forwards is not None:
            self._forwards += 1
            self.mgd_forwards.fill_(self._forwards)

    @staticmethod
    def _before_save(module: nn.Module, _prefix: str, _keep_vars: bool) -> None:
        # the count as Python has it: a skipped step puts the buffers back, not the count
        assert isinstance(module, FeatureModule)
        if module.mgd_forwards is not None:
            module.mgd_forwards.fill_(module._forwards)

    @staticmethod
    def _after_load(module: nn.Module, _keys: object) -> None:
        assert isinstance(module, FeatureModule)
        if module.mgd_forwards is not None:  # one read, when a checkpoint is loaded
            module._forwards = int(module.mgd_forwards)

    def _mask_stream(self, device: torch.device) -> torch.Generator:
        """MGD's random stream for this forward: seeded by (seed, forwards so far, process), so
        runs repeat, processes mask differently, and other trainees' draws do not shift it."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        entropy = [self.seed, self._forwards, rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator(device=device).manual_seed(seed)


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


def build_adapters(
    levels: Sequence[str], student_channels: int, teacher_channels: int
) -> nn.ModuleDict:
    """{level: Conv2d(student_channels, teacher_channels, 1)} mapping student to teacher channels.

    A 1x1 conv is built even when the channel counts are equal: it is FitNet's learnable
    regressor, which lets the student's FPN keep its own basis instead of being forced to
    copy the teacher's features channel by channel. All feature losses use adapted features.
    """
    return nn.ModuleDict(
        {level: nn.Conv2d(student_channels, teacher_channels, kernel_size=1) for level in levels}
    )


def build_global_blocks(levels: Sequence[str], channels: int) -> nn.ModuleDict:
    """FGD's learnable global-context blocks, one student/teacher pair per level.

    Returns ``ModuleDict({"student_<level>": GlobalContextBlock, "teacher_<level>": ...})``
    (flat, so ``blocks[f"student_{level}"](x)`` type-checks); ``FeatureModule`` applies the
    student block to the adapted student features and the teacher block to the teacher
    features (``channels`` = the teacher's), and stores the outputs as
    ``extras["global_s/<level>"]`` and ``extras["global_t/<level>"]``.
    """
    return nn.ModuleDict(
        {
            f"{side}_{level}": GlobalContextBlock(channels)
            for side in ("student", "teacher")
            for level in levels
        }
    )


def build_mgd_generators(levels: Sequence[str], channels: int) -> nn.ModuleDict:
    """MGD's generators, one per level: ``conv3x3 -> ReLU -> conv3x3``, ``channels`` -> same.

    They turn the masked, adapted student feature into a guess of the teacher's; they train with
    the student and are dropped from ``student.pt`` (the trainable module holds them).
    """
    return nn.ModuleDict(
        {
            level: nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            )
            for level in levels
        }
    )


def mgd_mask(
    shape: Sequence[int], ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    """MGD's random spatial mask (Yang et al., ECCV 2022): which positions the student keeps.

    shape: (N, C, H, W) of the feature to mask; ratio: probability that a position is masked
    generator: the random stream (its device is the mask's); None: torch's global one, on CPU
    returns (N, 1, H, W) float32 of 0 (masked, with probability ``ratio``) and 1 (kept), the
    same for every channel of a position
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"MGD mask ratio must be in [0, 1), got {ratio}")
    n, _, h, w = shape
    device = generator.device if generator is not None else None
    draws = torch.rand((n, 1, h, w), generator=generator, device=device)
    return (draws >= ratio).float()
