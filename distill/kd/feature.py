"""Feature KD (``distill.feature``): the student's FPN features, through learnable 1x1 adapters,
against the teacher's, with one of the registered kinds' losses (``distill.kd.features``: mse,
cwd, pkd, fgd, mgd), summed or averaged over the distilled levels, at the kind's own weight
(``distill.feature.<kind>.weight``).

The learnable parts live in the trainable module (``FeatureModule``): the adapters and the
kind's own part (FGD's global-context blocks, MGD's generators).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet

from distill.config import LEVEL_NAMES, Config, ConfigError, Extensible, flatten
from distill.kd.base import Batch, Finding, KDTerm, TermModule
from distill.kd.features import KINDS, FeatureKind, KindPart
from distill.models.retinanet import DenseOutputs

__all__ = ["LEVEL_REDUCTIONS", "FeatureKD", "FeatureKDConfig", "FeatureModule", "build_adapters"]

log = logging.getLogger(__name__)
LEVEL_REDUCTIONS = ("sum", "mean")  # of the per-level losses
# distill.feature.kind's default before it was null (feature KD off) and each kind had its own
# weight: the kind that an old config's distill.feature.weight was written for when it names none
OLD_DEFAULT_KIND = "cwd"
# FeatureModule's state-dict keys before the kinds had parts of their own: (old, new) prefixes
MOVED_KEYS = (
    ("global_s.", "part.global_s."), ("global_t.", "part.global_t."),
    ("generators.", "part.generators."), ("mgd_forwards", "part.forwards"),
)  # fmt: skip


@dataclass(frozen=True)
class FeatureKDConfig(Extensible):
    """``distill.feature``: what every kind shares; each kind's own keys, its weight among them,
    are its section ``distill.feature.<kind>`` (declared by the kind). Defaults follow each
    method's own RetinaNet reference config (tests/test_reference_defaults.py names the file and
    value)."""

    AT: ClassVar[str] = "distill.feature"
    # null: no feature KD; a registered kind (mse | cwd | pkd | fgd | mgd), distilled at its own
    # weight distill.feature.<kind>.weight (its reference's by default)
    kind: str | None = None
    # null: the kind's reference levels, filled in when the config is read (so a run's
    # config.yaml names them): P3-P6 for pkd, P3-P7 for the others
    levels: tuple[str, ...] | None = None
    # sum | mean of the per-level losses; sum, as the papers (a weight from one means the same)
    level_reduction: str = "sum"


@dataclass(frozen=True)
class FeatureKD(KDTerm):
    """The kind's loss of the adapted student features vs the teacher's over ``cfg.levels``,
    summed or averaged (``cfg.level_reduction``), at the kind's weight. On when ``cfg.kind`` is
    a kind and its weight > 0."""

    name: ClassVar[str] = "feature"
    config_class: ClassVar[type] = FeatureKDConfig
    weight_keys: ClassVar[tuple[str, ...]] = ()  # none of its own: each kind's (all_weight_keys)
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"level_reduction": LEVEL_REDUCTIONS}
    # the kinds' own keys sat beside the shared ones before they had sections of their own
    renamed: ClassVar[dict[str, str]] = {
        "tau": "cwd.tau", "fgd_tau": "fgd.tau", "fgd_alpha": "fgd.alpha", "fgd_beta": "fgd.beta",
        "fgd_gamma": "fgd.gamma", "fgd_lambda": "fgd.lambda_", "mgd_ratio": "mgd.ratio",
    }  # fmt: skip

    cfg: FeatureKDConfig

    @classmethod
    def all_weight_keys(cls) -> tuple[str, ...]:
        """``<kind>.weight`` of every registered kind."""
        return tuple(f"{name}.weight" for name in KINDS)

    @classmethod
    def is_on(cls, section: Any) -> bool:
        """A kind is chosen and its own weight is > 0."""
        return section.kind in KINDS and getattr(section, section.kind).weight > 0

    @classmethod
    def upgrade(
        cls, raw: Mapping[str, Any], under: Mapping[str, Any], source: str
    ) -> Mapping[str, Any]:
        """``distill.feature.weight``, the one weight every kind shared before each had its
        own, read as the weight of the kind it was written for: ``distill.feature.<kind>.weight``
        of the kind the same source names, else of the kind of the sources under it, else of
        cwd (the old default kind). A weight of 0 turned feature KD off: it reads as ``kind:
        null``. A warning names the old and the new key; both given is an error."""
        if "weight" not in raw:
            return raw
        out = dict(raw)
        weight = out.pop("weight")
        kind: str | None = out["kind"] if "kind" in out else under.get("kind") or OLD_DEFAULT_KIND
        if kind is not None and (not isinstance(kind, str) or kind not in KINDS):
            names = " | ".join(["null", *KINDS])
            raise ConfigError(f"distill.feature.kind in {source}: {kind!r} is not one of {names}")
        new = f"distill.feature.{kind or '<kind>'}.weight"
        own = out.get(kind, {}) if kind is not None else {}
        if isinstance(own, Mapping) and "weight" in own:
            raise ConfigError(
                f"distill.feature.weight in {source} is the old name of {new}, which is given "
                "too: keep the new one"
            )
        if isinstance(weight, int | float) and not isinstance(weight, bool) and weight == 0:
            out["kind"] = None
            log.warning(
                "%s: distill.feature.weight 0 read as distill.feature.kind null (no feature KD); "
                "each kind has its own weight now, %s", source, new,
            )  # fmt: skip
            return out
        if kind is None:
            raise ConfigError(
                f"distill.feature.weight in {source}: {weight!r} with distill.feature.kind null "
                "(no feature KD): give the kind and its own weight, distill.feature.<kind>.weight"
            )
        out["kind"] = kind
        out[kind] = {**own, "weight": weight} if isinstance(own, Mapping) else own
        log.warning(
            "%s: distill.feature.weight read as %s, the weight of the kind it was written for "
            "(each kind has its own weight now, its reference's by default); rename it there",
            source, new,
        )  # fmt: skip
        return out

    @classmethod
    def resolve(cls, section: Any, cfg: Config) -> Any:
        if section.levels is not None or section.kind not in KINDS:  # null, or unknown: its error
            return section
        return replace(section, levels=KINDS[section.kind].default_levels)

    @classmethod
    def check(cls, section: Any, cfg: Config, source: str) -> None:
        if section.kind is None and section.levels is None:  # no kind: no levels to distil
            return
        levels = section.levels or ()
        if not levels or any(level not in LEVEL_NAMES for level in levels):
            raise ConfigError(
                f"distill.feature.levels in {source}: {list(levels)} must be a non-empty list "
                f"of {', '.join(LEVEL_NAMES)}"
            )

    @classmethod
    def unused_keys(cls, section: Any) -> set[str]:
        """Off: every key (a run that was on differs in the keys it used: its kind, its
        weight); on: the other kinds' sections, their weights with them."""
        if not cls.is_on(section):
            return set(flatten(section))
        return {name for name, _ in section.sections if name != section.kind}

    def weights(self) -> dict[str, float]:
        return {"feature": getattr(self.cfg, self._kind_class.name).weight}

    def weight_key(self, loss: str) -> str:
        return f"distill.feature.{self._kind_class.name}.weight"

    @property
    def _kind_class(self) -> type[FeatureKind]:
        if self.cfg.kind is None:
            raise ValueError("distill.feature.kind is null: feature KD has no kind to distil with")
        return KINDS[self.cfg.kind]

    @property
    def kind(self) -> FeatureKind:
        """The configured kind, with its own section."""
        kind = self._kind_class
        return kind(getattr(self.cfg, kind.name))

    @property
    def levels(self) -> tuple[str, ...]:
        """``cfg.levels``, or the kind's default when null (a config not read from a file)."""
        levels = self.cfg.levels
        return self._kind_class.default_levels if levels is None else tuple(levels)

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
