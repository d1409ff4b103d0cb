"""The interface of a KD term: what it is in the config, what it adds to the trainable module,
what it needs from the teacher's forward, and its losses.

    term = FeatureKD.from_config(cfg.distill)          # None when its weight is 0
    part = term.build(student, teacher, seed)          # nn.Module in the trainable module, or None
    probes = term.teacher_probes()                     # hooks around the teacher's forward
    losses = term.losses(student_out, teacher_out, Batch(targets, image_size, image_sizes=sizes))

The engine only loops over the configured terms (``distill.kd.registry``): building the parts
(``distill.engine.build.build_models``), running them in the trainable module's ``forward``
(``distill.engine.trainable``), the teacher's forward (``distill.engine.step.teacher_forward``),
the losses and their weighted sum (``distill.kd.combine``). The losses themselves are pure
functions in ``distill.losses``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

from torch import Tensor, nn
from torchvision.models.detection import RetinaNet

from distill.config import Config, DistillConfig, flatten
from distill.models.retinanet import DenseOutputs

__all__ = ["Batch", "Finding", "KDTerm", "TeacherProbe", "TermModule"]


@dataclass(frozen=True)
class Batch:
    """What a term's losses know of the batch besides the two models' outputs.

    targets: per image {"boxes": (B_i, 4) xyxy in the transformed frame, "labels": (B_i,)}
    image_size: (H, W) of the padded batch
    mean_over_processes: with several processes, the mean of a scalar over all of them (an
        all-reduce: every process computes every loss); None: one process
    image_sizes: per image, its own (h, w) inside the padded batch (``ImageList.image_sizes``;
        the rest is padding); None: every image fills the batch
    """

    targets: Sequence[Mapping[str, Tensor]]
    image_size: tuple[int, int]
    mean_over_processes: Callable[[Tensor], Tensor] | None = None
    image_sizes: Sequence[tuple[int, int]] | None = None

    def mean(self, value: Tensor) -> Tensor:
        """A scalar's mean over processes (itself with one process)."""
        return value if self.mean_over_processes is None else self.mean_over_processes(value)

    def weight_sum(self, weights: Tensor) -> Tensor | None:
        """The normaliser of an anchor-weighted loss: the sum of its anchor weights averaged
        over processes. DDP averages the gradients over the N processes, so each process's
        ``local sum / mean of the N weight sums`` gives, averaged, ``global sum / global weight
        sum``: 2 processes with batch B give the loss and gradient of 1 process with batch 2B,
        whatever the padded size of each. None with one process: the loss takes its local sum.
        A uniform weighting passes its mask of anchors (``anchors_inside``), not None, so that
        its normaliser too counts the anchors of every process."""
        if self.mean_over_processes is None:
            return None
        return self.mean_over_processes(weights.detach().float().sum())


OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skipped"


@dataclass(frozen=True)
class Finding:
    """One check of ``distill check``: its name, ``ok`` | ``warn`` | ``fail`` | ``skipped``,
    and what was found."""

    check: str
    status: str
    detail: str
    value: float | None = None  # the measured number, where there is one (mAP, ratio, ...)


class TermModule(nn.Module):
    """The part of a KD term that runs inside the trainable module's ``forward``, so that DDP
    sees its parameters (adapters, FGD's context blocks, MGD's generators, CrossKD's cross head).

    The trainable module calls, for each term's part, ``watch`` around the detector's forward,
    then the part itself on the detector's outputs."""

    def watch(self, detector: RetinaNet) -> AbstractContextManager[Any]:
        """Hooks on the detector being trained while its forward runs (CrossKD holds a tower
        conv's output); what the context yields is ``forward``'s ``held``. Default: none."""
        return nullcontext()

    def forward(self, out: DenseOutputs, teacher: DenseOutputs | None, held: Any) -> None:
        """Adds the term's tensors to the detector's outputs ``out`` (``out.adapted``,
        ``out.extras``); ``teacher``: the frozen teacher's outputs (None without a teacher)."""
        raise NotImplementedError


class TeacherProbe(Protocol):
    """What a term needs from the teacher's forward beyond its outputs (CrossKD: statistics of a
    tower conv). Equal probes (frozen dataclasses) run once for all the trainees that share a
    teacher forward."""

    def watch(
        self, teacher: RetinaNet
    ) -> AbstractContextManager[Callable[[DenseOutputs], dict[str, Tensor]]]:
        """Hooks on ``teacher`` while its forward runs (no_grad, autocast); yields a function of
        the teacher's outputs, called after the forward, that returns the tensors to add to the
        outputs' ``extras``."""
        ...


class KDTerm(ABC):
    """One KD term. A subclass declares what it owns (the class variables and classmethods
    below: its config section, weights, bounds, key-dependent defaults, checks, the keys a
    resumed run may ignore, how an old config's keys read today) and is registered by
    ``distill.kd.registry.register_term`` (the order of registration is its build order); it can
    also be used directly. Nothing outside ``distill.kd`` names it."""

    name: ClassVar[str]  # its config section ``distill.<name>`` and its part's name
    config_class: ClassVar[type]  # the section's frozen dataclass: its keys and their defaults
    weight_keys: ClassVar[tuple[str, ...]] = ("weight",)  # all 0: the term is off
    positive: ClassVar[tuple[str, ...]] = ()  # keys that must be > 0
    non_negative: ClassVar[tuple[str, ...]] = ()  # keys that must be >= 0 (besides weights)
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {}  # {key: the names it accepts}
    renamed: ClassVar[Mapping[str, str]] = {}  # {old key: its key now}, named to old configs

    @classmethod
    def all_weight_keys(cls) -> tuple[str, ...]:
        """The keys, relative to its section, of every weight the term may use: its
        ``weight_keys``, and those of its registered sub-sections (the feature kinds')."""
        return cls.weight_keys

    @classmethod
    def section_of(cls, cfg: DistillConfig) -> Any:
        """The term's section ``distill.<name>`` of ``cfg``."""
        return getattr(cfg, cls.name)

    @classmethod
    def is_on(cls, section: Any) -> bool:
        """Some weight of the section is > 0."""
        return any(getattr(section, key) > 0 for key in cls.weight_keys)

    @classmethod
    def resolve(cls, section: Any, cfg: Config) -> Any:
        """The section with the defaults that depend on other keys of ``cfg`` filled in."""
        return section

    @classmethod
    def check(cls, section: Any, cfg: Config, source: str) -> None:
        """Raise ``ConfigError`` (naming the key and ``source``) for a value that types and
        bounds cannot check. Default: nothing to check."""
        return None

    @classmethod
    def upgrade(
        cls, raw: Mapping[str, Any], under: Mapping[str, Any], source: str
    ) -> Mapping[str, Any]:
        """One source's raw section (a file's own keys, an override) in today's keys, where an
        old key's new place depends on a value (``renamed`` moves a key whatever the values);
        ``under``: the raw section of the sources it is merged over. Default: as it is."""
        return raw

    @classmethod
    def unused_keys(cls, section: Any) -> set[str]:
        """The section's keys that change nothing in a run (a resumed run may differ from its
        start there): every key but the weights when the term is off."""
        if cls.is_on(section):
            return set()
        return set(flatten(section)) - set(cls.weight_keys)

    @classmethod
    def from_config(cls, cfg: DistillConfig) -> KDTerm | None:
        """The term as ``cfg`` configures it, or None when all its weights are 0: then nothing
        of it is built, run or computed. Default: the term made of its section alone (a
        dataclass whose one field is the section); a term built otherwise overrides this."""
        section = cls.section_of(cfg)
        make = cast(Callable[[Any], KDTerm], cls)
        return make(section) if cls.is_on(section) else None

    @abstractmethod
    def weights(self) -> dict[str, float]:
        """{loss name: weight > 0}: the losses ``losses`` returns, logged as ``kd/<name>``."""

    def weight_key(self, loss: str) -> str:
        """The dotted config key that sets the weight of ``loss`` (a name of ``weights``), as
        ``distill check`` names it in a suggested weight. Default: the term's one weight key."""
        return f"distill.{self.name}.{self.weight_keys[0]}"

    def build(self, student: RetinaNet, teacher: RetinaNet, seed: int) -> TermModule | None:
        """The term's trainable part, built from the student and the (frozen) teacher, or None
        when it computes nothing in the forward. Its initial weights draw from the global RNG:
        build the parts in a fixed order. ``seed``: the run's, for parts that draw while they
        train (MGD's masks)."""
        return None

    def teacher_probes(self) -> tuple[TeacherProbe, ...]:
        """What the term needs from the teacher's forward beyond its outputs."""
        return ()

    def findings(self, teacher: DenseOutputs) -> list[Finding]:
        """What ``distill check`` should say of this term's settings on the teacher's outputs
        of a real batch (FGD: how far its attention spreads at its temperature)."""
        return []

    @abstractmethod
    def losses(
        self, student: DenseOutputs, teacher: DenseOutputs, batch: Batch
    ) -> dict[str, Tensor]:
        """The unweighted losses named in ``weights``, scalar float32: pure functions of
        ``distill.losses`` on the outputs of the trainable module (``student``, with the term's
        part's tensors) and of the teacher (with its probes' ``extras``), on the same
        ``ImageList`` (same anchors)."""
