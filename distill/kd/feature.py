"""Feature KD (``distill.feature``): the student's FPN features, through learnable 1x1 adapters,
against the teacher's, with one of the registered kinds' losses (``distill.kd.features``: mse,
cwd, pkd, fgd, mgd), summed or averaged over the distilled levels.

The learnable parts live in the trainable module (``FeatureModule``): the adapters and the
kind's own part (FGD's global-context blocks, MGD's generators).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet

from distill.config import LEVEL_NAMES, Config, ConfigError, Extensible
from distill.kd.base import Batch, Finding, KDTerm, TermModule
from distill.kd.features import KINDS, FeatureKind, KindPart
from distill.models.retinanet import DenseOutputs

__all__ = ["LEVEL_REDUCTIONS", "FeatureKD", "FeatureKDConfig", "FeatureModule", "build_adapters"]

LEVEL_REDUCTIONS = ("sum", "mean")  # of the per-level losses
# FeatureModule's state-dict keys before the kinds had parts of their own: (old, new) prefixes
MOVED_KEYS = (
    ("global_s.", "part.global_s."), ("global_t.", "part.global_t."),
    ("generators.", "part.generators."), ("mgd_forwards", "part.forwards"),
)  # fmt: skip


@dataclass(frozen=True)
class FeatureKDConfig(Extensible):
    """``distill.feature``: what every kind shares; each kind's own keys are its section
    ``distill.feature.<kind>`` (declared by the kind). Defaults follow each method's own
    RetinaNet reference config (tests/test_reference_defaults.py names the file and value)."""

    AT: ClassVar[str] = "distill.feature"
    kind: str = "cwd"  # a registered kind: mse | cwd | pkd | fgd | mgd
    weight: float = 0.0
    # null: the kind's reference levels, filled in when the config is read (so a run's
    # config.yaml names them): P3-P6 for pkd, P3-P7 for the others
    levels: tuple[str, ...] | None = None
    # sum | mean of the per-level losses; sum, as the papers (a weight from one means the same)
    level_reduction: str = "sum"


@dataclass(frozen=True)
class FeatureKD(KDTerm):
    """The kind's loss of the adapted student features vs the teacher's over ``cfg.levels``,
    summed or averaged (``cfg.level_reduction``)."""

    name: ClassVar[str] = "feature"
    config_class: ClassVar[type] = FeatureKDConfig
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"level_reduction": LEVEL_REDUCTIONS}
    # the kinds' own keys sat beside the shared ones before they had sections of their own
    renamed: ClassVar[dict[str, str]] = {
        "tau": "cwd.tau", "fgd_tau": "fgd.tau", "fgd_alpha": "fgd.alpha", "fgd_beta": "fgd.beta",
        "fgd_gamma": "fgd.gamma", "fgd_lambda": "fgd.lambda_", "mgd_ratio": "mgd.ratio",
    }  # fmt: skip

    cfg: FeatureKDConfig

    @classmethod
    def resolve(cls, section: Any, cfg: Config) -> Any:
        if section.levels is not None or section.kind not in KINDS:  # an unknown kind: its error
            return section
        return replace(section, levels=KINDS[section.kind].default_levels)

    @classmethod
    def check(cls, section: Any, cfg: Config, source: str) -> None:
        levels = section.levels or ()
        if not levels or any(level not in LEVEL_NAMES for level in levels):
            raise ConfigError(
                f"distill.feature.levels in {source}: {list(levels)} must be a non-empty list "
                f"of {', '.join(LEVEL_NAMES)}"
            )

    @classmethod
    def unused_keys(cls, section: Any) -> set[str]:
        """Off: all but the weight; on: the other kinds' sections."""
        if not cls.is_on(section):
            return super().unused_keys(section)
        return {name for name, _ in section.sections if name != section.kind}

    def weights(self) -> dict[str, float]:
        return {"feature": self.cfg.weight}

    @property
    def kind(self) -> FeatureKind:
        """The configured kind, with its own section."""
        kind = KINDS[self.cfg.kind]
        return kind(getattr(self.cfg, kind.name) if kind.config_class is not None else None)

    @property
    def levels(self) -> tuple[str, ...]:
        """``cfg.levels``, or the kind's default when null (a config not read from a file)."""
        levels = self.cfg.levels
        return KINDS[self.cfg.kind].default_levels if levels is None else tuple(levels)

    def build(self, student: RetinaNet, teacher: RetinaNet, seed: int) -> FeatureModule:
        """Adapters from the student's FPN width to the teacher's (where the widths differ, or
        on every level for a kind that always adapts), then the kind's part, in that order
        (their initial weights draw from the global RNG)."""
        levels, kind = self.levels, self.kind
        s_ch, t_ch = _out_channels(student), _out_channels(teacher)
        adapters = build_adapters(levels, s_ch, t_ch) if kind.always_adapt or s_ch != t_ch else None
        return FeatureModule(levels, adapters, kind.part(levels, t_ch, seed))

    def losses(
        self, student: DenseOutputs, teacher: DenseOutputs, batch: Batch
    ) -> dict[str, Tensor]:
        if not student.adapted:
            raise ValueError("feature KD needs the adapted student features (student.adapted)")
        kind = self.kind
        per_level = []
        for level in self.levels:
            if level not in student.adapted or level not in teacher.features:
                raise KeyError(
                    f"level {level!r} missing: student has {sorted(student.adapted)}, "
                    f"teacher has {sorted(teacher.features)}"
                )
            s, t = student.adapted[level], teacher.features[level]
            per_level.append(kind.loss(level, s, t, student.extras, batch))
        stacked = torch.stack(per_level)  # (L,)
        loss = stacked.sum() if self.cfg.level_reduction == "sum" else stacked.mean()
        return {"feature": loss}

    def findings(self, teacher: DenseOutputs) -> list[Finding]:
        return self.kind.findings(self.levels, teacher.features)


def _out_channels(model: nn.Module) -> int:
    """FPN width of a RetinaNet (torchvision's backbones carry ``out_channels``)."""
    backbone: Any = model.backbone
    return int(backbone.out_channels)


class FeatureModule(TermModule):
    """The feature term's part of the trainable module: 1x1 ``adapters`` and the kind's
    ``part`` (FGD's global-context blocks, MGD's generators)."""

    def __init__(
        self,
        levels: Sequence[str],
        adapters: nn.ModuleDict | None = None,
        part: KindPart | None = None,
    ) -> None:
        super().__init__()
        self.levels = tuple(levels)  # the levels whose (adapted) features are compared
        self.adapters = adapters if adapters is not None else nn.ModuleDict()
        self.part = part
        self.register_load_state_dict_pre_hook(FeatureModule._moved_keys)

    @staticmethod
    def _moved_keys(_module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        # a checkpoint from before the kinds had parts of their own holds FGD's blocks and MGD's
        # generators at this module's top: read them at their place in ``part``
        for old, new in MOVED_KEYS:
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)

    def forward(self, out: DenseOutputs, teacher: DenseOutputs | None, held: Any = None) -> None:
        """Sets ``out.adapted`` {level: (N, C_t, H_l, W_l)} and adds the kind's part's tensors
        to ``out.extras``."""
        # (N, C_s, H_l, W_l) -> (N, C_t, H_l, W_l) on distilled levels that have an adapter;
        # levels without one (channels already equal, no learnable projection) pass through.
        out.adapted = {
            level: self.adapters[level](out.features[level])
            if level in self.adapters
            else out.features[level]
            for level in self.levels
        }
        if self.part is not None:
            out.extras.update(self.part(out.adapted, teacher))


def build_adapters(
    levels: Sequence[str], student_channels: int, teacher_channels: int
) -> nn.ModuleDict:
    """{level: Conv2d(student_channels, teacher_channels, 1)} mapping student to teacher channels.

    A 1x1 conv is built even when the channel counts are equal for FitNet (mse): it is its
    learnable regressor, which lets the student's FPN keep its own basis instead of being forced
    to copy the teacher's features channel by channel.
    """
    return nn.ModuleDict(
        {level: nn.Conv2d(student_channels, teacher_channels, kernel_size=1) for level in levels}
    )
