"""The interface of a feature-KD kind (``distill.feature.kind``): its own keys, its default
levels, its trainable part and its loss on one level.

    kind = KINDS[cfg.kind](getattr(cfg, cfg.kind))         # with its own section
    part = kind.part(levels, channels, seed)               # nn.Module or None
    extras = part(adapted, teacher)                         # in the trainable module's forward
    loss = kind.loss(level, adapted[level], teacher.features[level], extras, batch)

The feature term (``distill.kd.feature.FeatureKD``) owns what every kind shares: the levels,
the 1x1 adapters to the teacher's width, the sum or mean over levels. The weight is the kind's
own (``distill.feature.<kind>.weight``, its reference's by default), so that a weight written
for one kind never applies to another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from distill.config import LEVEL_NAMES, Config
from distill.kd.base import Batch, Finding
from distill.models.retinanet import DenseOutputs

__all__ = ["FeatureKind", "KindConfig", "KindPart"]


@dataclass(frozen=True)
class KindConfig:
    """A kind's own section ``distill.feature.<kind>``: its weight, then (in a subclass) its
    other keys. A kind redeclares ``weight`` with its reference's RetinaNet loss weight."""

    weight: float = 1.0  # of the kind's loss, summed (or averaged) over the levels; 0: off


class KindPart(nn.Module):
    """A kind's trainable part, inside the trainable module (FGD's global-context blocks, MGD's
    generators): it runs after the adapters, in the module's ``forward``, so DDP sees it."""

    def forward(
        self, adapted: Mapping[str, Tensor], teacher: DenseOutputs | None
    ) -> dict[str, Tensor]:
        """adapted: {level: (N, C_t, H_l, W_l)} the adapted student features; teacher: the
        frozen teacher's outputs. Returns the tensors to add to the outputs' ``extras``, keyed
        ``"<what>/<level>"``, which the kind's ``loss`` reads back."""
        raise NotImplementedError


class FeatureKind:
    """One feature-KD kind. A subclass declares its name, its own config section
    ``distill.feature.<name>`` (``config_class``: its weight and keys) with its bounds and
    check, its default levels, and computes its per-level ``loss``; it is registered by
    ``distill.kd.features.register_kind``."""

    name: ClassVar[str]
    config_class: ClassVar[type[KindConfig]] = KindConfig  # ``distill.feature.<name>.*``
    positive: ClassVar[tuple[str, ...]] = ()  # its keys that must be > 0
    non_negative: ClassVar[tuple[str, ...]] = ()  # its keys that must be >= 0 (besides weight)
    default_levels: ClassVar[tuple[str, ...]] = LEVEL_NAMES  # ``distill.feature.levels`` null
    # a learnable 1x1 adapter on every level even where the widths match (FitNet's regressor)
    always_adapt: ClassVar[bool] = False

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg if cfg is not None else self.config_class()  # the kind's own section

    @classmethod
    def check(cls, section: Any, cfg: Config, source: str) -> None:
        """Raise ``ConfigError`` for a value of its section that bounds cannot check."""

    def part(self, levels: Sequence[str], channels: int, seed: int) -> KindPart | None:
        """Its trainable part over ``levels`` of ``channels`` (the teacher's width), or None.
        Initial weights draw from the global RNG; ``seed`` is the run's, for draws in training."""
        return None

    def loss(
        self,
        level: str,
        student: Tensor,
        teacher: Tensor,
        extras: Mapping[str, Tensor],
        batch: Batch,
    ) -> Tensor:
        """The loss of one level, scalar float32. student, teacher: (N, C_t, H_l, W_l) the
        adapted student's and the teacher's features; extras: the trainable module's outputs'
        extras (its part's tensors)."""
        raise NotImplementedError

    def findings(self, levels: Sequence[str], teacher: Mapping[str, Tensor]) -> list[Finding]:
        """What ``distill check`` should say of the kind's settings on the teacher's features
        {level: (N, C, H, W)} of a real batch."""
        return []
