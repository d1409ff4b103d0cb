"""Masked Generative Distillation (Yang et al., ECCV 2022): a random share of the adapted
student's positions is masked, and a generator regenerates the teacher's feature from the rest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from distill.config import Config, ConfigError
from distill.kd.base import Batch
from distill.kd.features.base import FeatureKind, KindConfig, KindPart
from distill.losses.features import mgd_loss
from distill.models.retinanet import DenseOutputs

__all__ = ["MGD", "MGDConfig", "MGDPart", "build_mgd_generators", "mgd_mask"]


@dataclass(frozen=True)
class MGDConfig(KindConfig):
    """MMRazor's mgd_fpn_retina_x101_retina_r50_2x_coco.py: alpha_mgd 2e-5 on each FPN level.
    MGD's loss sums squared errors per image, so the weight depends on the teacher's feature
    scale: the reference's is for mmdet's RetinaNet-X101."""

    weight: float = 2e-5
    ratio: float = 0.65  # share of the positions masked (the paper's 0.65 for detection)


class MGD(FeatureKind):
    """``mgd_loss`` of each level's regenerated feature (``"mgd/<level>"``) vs the teacher's."""

    name = "mgd"
    config_class = MGDConfig
    non_negative = ("ratio",)
    cfg: MGDConfig

    @classmethod
    def check(cls, section: Any, cfg: Config, source: str) -> None:
        if not 0 <= section.ratio < 1:  # also NaN
            raise ConfigError(
                f"distill.feature.mgd.ratio in {source}: {section.ratio!r} must be in [0, 1)"
            )

    def part(self, levels: Sequence[str], channels: int, seed: int) -> MGDPart:
        return MGDPart(build_mgd_generators(levels, channels), self.cfg.ratio, seed)

    def loss(
        self, level: str, student: Tensor, teacher: Tensor, extras: Mapping[str, Tensor],
        batch: Batch,
    ) -> Tensor:  # fmt: skip
        key = f"mgd/{level}"
        if key not in extras:
            raise ValueError(f"MGD needs the generators' outputs (extras[{key!r}])")
        return mgd_loss(extras[key], teacher)


class MGDPart(KindPart):
    """MGD's ``generators``, one per level, on the adapted features masked at ``ratio``.

    The masks draw from a stream seeded by (seed, training forwards so far, process), so runs
    repeat, processes mask differently and other trainees' draws do not shift them. The count
    is kept in Python (reading a device tensor would wait for the device) and mirrored in the
    ``forwards`` buffer, so a checkpoint keeps it and a resumed run draws the masks it would
    have drawn."""

    def __init__(self, generators: nn.ModuleDict, ratio: float, seed: int) -> None:
        super().__init__()
        self.generators, self.ratio, self.seed = generators, ratio, seed
        self._forwards = 0
        self.forwards: Tensor
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_post_hook(MGDPart._after_load)
        self.register_state_dict_pre_hook(MGDPart._before_save)

    def forward(
        self, adapted: Mapping[str, Tensor], teacher: DenseOutputs | None
    ) -> dict[str, Tensor]:
        """``"mgd/<level>"`` (N, C_t, H_l, W_l): the generator's output from the masked
        adapted feature."""
        extras = {}
        device = next(iter(adapted.values())).device
        stream = self._mask_stream(device)
        for level in self.generators:
            x = adapted[level]
            mask = mgd_mask(x.shape, self.ratio, stream).to(x.dtype)
            extras[f"mgd/{level}"] = self.generators[level](x * mask)
        if self.training:
            self._forwards += 1
            self.forwards.fill_(self._forwards)
        return extras

    @staticmethod
    def _before_save(module: nn.Module, _prefix: str, _keep_vars: bool) -> None:
        # the count as Python has it: a skipped step puts the buffers back, not the count
        assert isinstance(module, MGDPart)
        module.forwards.fill_(module._forwards)

    @staticmethod
    def _after_load(module: nn.Module, _keys: object) -> None:
        assert isinstance(module, MGDPart)
        module._forwards = int(module.forwards)  # one read, when a checkpoint is loaded

    def _mask_stream(self, device: torch.device) -> torch.Generator:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        entropy = [self.seed, self._forwards, rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator(device=device).manual_seed(seed)


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
    """MGD's random spatial mask: which positions the student keeps.

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
