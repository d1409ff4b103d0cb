"""The run configuration's schema: one frozen dataclass per YAML section, and the names and
ranges that its keys accept.

A config file has the sections below; every key has a default, so a file names only what it
changes. Adding a field is one line in the matching dataclass (``distill.config.load`` reads and
checks files against these classes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the file."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/shapes"
    train: str = "train.json"  # annotation file, relative to root
    val: str = "val.json"
    images: str = "images"  # image folder, relative to root; file_name is relative to it
    val_images: str | None = None  # image folder of the val split; null: same as images
    image_size: int = 128  # without min_size/max_size: the longer side is resized to this
    # torchvision's detector resize (GeneralizedRCNNTransform): the shorter side becomes
    # min_size unless the longer side would then exceed max_size (COCO: 800, 1333). Give both
    # or neither; null: min_size = max_size = image_size.
    min_size: int | None = None
    max_size: int | None = None
    batch_size: int = 8  # per process
    num_workers: int = 2
    hflip: float = 0.5  # probability of a horizontal flip (training only)
    skip_bad_images: bool = False  # skip and count missing/unreadable images instead of failing
    # leave out (and count) the training images with no box left once crowd and bad boxes are
    # dropped, as mmdetection's filter_empty_gt and torchvision's detection reference do on COCO
    # (configs/coco/<method>.yaml set it). Off by default: an image without objects teaches the
    # detector where not to fire, and a dataset of your own may hold them on purpose; the
    # validation images are never left out
    skip_empty_images: bool = False
    max_train_images: int | None = None  # use only the first N training images (smoke runs)
    # this many training images held out of training, the same ones whatever the seed (drawn
    # with HOLDOUT_SEED): ``build_dataset(data, "holdout")``, on which distill search scores its
    # trials, so that the validation set stays for the number reported
    holdout_images: int = 0
    max_val_images: int | None = None
    # labels = the dataset's category ids (COCO: torchvision's 91-way label space, needed to keep
    # a COCO_V1 teacher's classifier); false: labels 1..K in sorted id order
    category_ids_as_labels: bool = False


@dataclass(frozen=True)
class AnchorConfig:
    """One anchor set shared by teacher and student (P3-P7, strides 8..128).

    ``name: torchvision`` stands for torchvision's RetinaNet anchors (``TORCHVISION_ANCHORS``);
    the numbers are then filled in when the config is read.
    """

    name: str | None = None  # torchvision | null (the numbers below)
    sizes: tuple[int, ...] = (16, 32, 64, 128, 256)  # base size per level, P3..P7
    scales: tuple[float, ...] = (1.0, 1.26, 1.587)  # octave scales per level
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class TeacherConfig:
    arch: str = "retinanet_resnet50_fpn"
    # torchvision weights name (e.g. COCO_V1), a path to a checkpoint written by this project,
    # or null for random initialisation.
    weights: str | None = None
    # a random or barely trained teacher on purpose (smoke runs and tests): distill check only
    # warns of it. Without it distill run refuses one (it would distil noise) unless --force.
    allow_random: bool = False
    # backbone-only weights: torchvision name (e.g. IMAGENET1K_V1), a local path, or null.
    backbone_weights: str | None = None
    head_norm: str | None = None  # gn | none: override the head's norm (v1: none, v2: GroupNorm)
    # from random weights: start each residual block as the identity (last BN scale = 0), which
    # makes a from-scratch ResNet-50 learn faster (Goyal et al. 2017); ignored with weights
    zero_init_residual: bool = False
    # check: refuse a resize or anchors other than those the weights were trained with (see
    # distill.models.provenance); torchvision: the weights are a card-less state dict of
    # torchvision's COCO RetinaNet, check against its settings; ignore: a deliberate override,
    # no check
    weights_settings: str = "check"


@dataclass(frozen=True)
class StudentConfig:
    arch: str = "retinanet_mobilenet_v3_large_fpn"
    fpn_channels: int = 128
    head_channels: int | None = None  # null: same as fpn_channels
    head_convs: int = 2  # 3x3 convs in each head branch before the output conv
    norm: str = "gn"  # normalisation in FPN extra levels and heads: gn | none
    backbone_weights: str | None = None
    weights: str | None = None  # full student checkpoint to start from
    weights_settings: str = "check"  # as teacher.weights_settings
    # parts copied from the teacher when a distillation run builds the student (neck: the FPN,
    # head: the RetinaNet head), as FGD's init_student and MMRazor's MGD config do; every copied
    # tensor must have the teacher's shape (same widths, head_convs, norm). Not with a plain
    # student (no KD term: no teacher is built) nor when resuming (the checkpoint wins).
    init_from_teacher: tuple[str, ...] = ()


_EXTENSIBLE: dict[str, type] = {}  # the extensible sections by dotted key: {"distill": ...}


@dataclass(frozen=True)
class Extensible:
    """A section whose sub-sections are declared by a registry, not here (``register_section``):
    ``distill`` holds one per KD term (``distill.feature``, ``distill.logit``, ...), declared by
    the terms in ``distill.kd``; a term's own section may be extensible in turn (the feature
    kinds' ``distill.feature.<kind>``). A sub-section reads like a field, ``cfg.distill.logit``;
    one registered after the section was built reads as its defaults.

    ``AT`` is the section's dotted key; ``sections`` holds ``(name, value)`` in registration
    order (a tuple, so that a config stays hashable and compares by value).
    """

    AT: ClassVar[str] = ""
    sections: tuple[tuple[str, Any], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _EXTENSIBLE[cls.AT] = cls  # a registered name must not shadow one of its keys

    def __post_init__(self) -> None:
        given = dict(self.sections)
        declared = registered_sections(self.AT)
        unknown = set(given) - set(declared)
        if unknown:
            raise ConfigError(
                f"unknown section {self.AT}.{sorted(unknown)[0]}; known: {', '.join(declared)}"
            )
        full = tuple(
            (name, given[name] if name in given else spec.config())
            for name, spec in declared.items()
        )
        object.__setattr__(self, "sections", full)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # pickling and copying look these up before __init__
            raise AttributeError(name)
        for key, value in self.__dict__.get("sections", ()):
            if key == name:
                return value
        declared = registered_sections(self.AT)
        if name in declared:  # registered after this section was built: its defaults
            return declared[name].config()
        raise AttributeError(f"{self.AT or type(self).__name__} has no key or section {name!r}")

    def with_sections(self, **values: Any) -> Any:
        """A copy with the named sub-sections replaced (or added, where registered since)."""
        held = [name for name, _ in self.sections]
        unknown = set(values) - set(held) - set(registered_sections(self.AT))
        if unknown:
            raise KeyError(f"{self.AT} has no section {sorted(unknown)[0]!r}")
        sections = [(name, values.get(name, value)) for name, value in self.sections]
        sections += [(name, value) for name, value in values.items() if name not in held]
        return replace(self, sections=tuple(sections))


@dataclass(frozen=True)
class DistillConfig(Extensible):
    """The ``distill`` section: one sub-section per KD term, declared by the term
    (``distill.kd.registry``), and the schedule that all the terms share."""

    AT: ClassVar[str] = "distill"
    warmup_steps: int = 0  # KD weights ramp linearly from 0 over this many steps
    stop_epoch: int | None = None  # KD terms are switched off from this epoch on (0-based)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # for the global batch (batch_size x processes x grad_accum)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # also decay the 1-D parameters (biases, norm scales and shifts), as mmdetection does
    # (configs/coco/<method>.yaml set it). Off by default, as in timm's optimizers (decay pulls
    # the norms' scales towards 0): the shapes recipes were tuned without it
    decay_norms_and_biases: bool = False
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | step | constant
    step_milestones: tuple[float, ...] = (0.67, 0.89)  # fractions of the run, for "step"
    step_gamma: float = 0.1
    grad_clip: float | None = 10.0  # max gradient norm, null for none
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 | auto (bf16 where native, else no)
    seed: int = 0
    log_every: int = 10  # steps between TensorBoard scalars
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    trace_batches: bool = False  # write the image ids of every batch to batches.rank*.jsonl


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: int = 1
    score_threshold: float = 0.05
    nms_threshold: float = 0.5  # IoU above which the lower-scored box of a class is dropped
    detections_per_image: int = 100
    batch_size: int | None = None  # null: data.batch_size
    images_logged: int = 4  # validation images drawn in TensorBoard


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/shapes/distill"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# torchvision's RetinaNet anchors (retinanet_resnet50_fpn and _v2): base sizes 32..512 on
# P3..P7, three octave scales 2^(0/3, 1/3, 2/3) rounded down to integers as torchvision rounds
# them (32 -> 32, 40, 50), aspect ratios 0.5, 1, 2. tests/test_coco_parity.py checks them
# against torchvision's builder.
TORCHVISION_ANCHORS = AnchorConfig(
    name="torchvision",
    sizes=(32, 64, 128, 256, 512),
    scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
    aspect_ratios=(0.5, 1.0, 2.0),
)
ANCHOR_PRESETS = {"torchvision": TORCHVISION_ANCHORS}
WEIGHTS_SETTINGS = ("check", "torchvision", "ignore")


def resize_bounds(data: DataConfig) -> tuple[int, int]:
    """(min_size, max_size) of the shared resize: the shorter side goes to min_size unless the
    longer side would exceed max_size. Without ``data.min_size`` both are ``data.image_size``
    (the longer side becomes image_size)."""
    if data.min_size is None or data.max_size is None:
        return data.image_size, data.image_size
    return data.min_size, data.max_size


LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")  # the FPN levels of every model here
INIT_FROM_TEACHER_PARTS = ("neck", "head")  # student.init_from_teacher's names


# Values that must be positive, or at least zero (a type check cannot tell). A registered
# section declares its own (``Section``).
POSITIVE = (
    "data.image_size", "data.batch_size", "train.lr", "train.grad_accum", "train.log_every",
    "train.max_nonfinite", "eval.detections_per_image", "eval.batch_size",
    "student.fpn_channels", "data.min_size", "data.max_size", "student.head_channels",
    "student.head_convs", "data.max_train_images", "data.max_val_images",
)  # fmt: skip
NON_NEGATIVE = (
    "data.num_workers", "data.holdout_images", "train.epochs",
    "train.max_steps", "train.warmup_steps", "train.weight_decay", "train.momentum",
    "train.checkpoint_every_steps", "train.seed", "eval.every_epochs", "eval.images_logged",
    "distill.warmup_steps",
)  # fmt: skip

# Upper bounds where a larger value is a typo that would allocate without end rather than a
# model (torchvision's RetinaNet: 4 head convs, 256 channels).
AT_MOST = {"student.head_convs": 16, "student.fpn_channels": 4096, "student.head_channels": 4096}


# --------------------------------------------------------------------------------------------
# What registries declare
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """A sub-section of an ``Extensible`` section, as a registry declares it (a KD term declares
    ``distill.<term>``, a feature kind ``distill.feature.<kind>``). Keys are relative to it.

    config: its frozen dataclass (its keys and their defaults)
    positive, non_negative: its keys that must be > 0, >= 0 (null always passes)
    resolve: ``(section, cfg) -> section`` with the defaults that depend on other keys filled
        in (a run's config.yaml then names every value it ran with)
    check: ``(section, cfg, source)``, raising ``ConfigError`` (naming the key and ``source``)
        for values a type and the bounds cannot check
    unused: ``section -> keys`` that change nothing in a run with this section (a term that is
        off, another feature kind's keys): a resumed run may differ from its start there
    renamed: {old key: its key now}: an old config's value is read at the new place, with a
        warning that names both
    upgrade: ``(raw, under, source) -> raw``: one source's raw mapping of the section (a file's
        own keys, an override) in today's keys, where an old key's new place depends on a value
        (of the source, or of ``under``, the raw section of the sources it is merged over);
        it warns and raises ``ConfigError`` as ``renamed`` does
    """

    config: type
    positive: tuple[str, ...] = ()
    non_negative: tuple[str, ...] = ()
    resolve: Callable[[Any, Config], Any] | None = None
    check: Callable[[Any, Config, str], None] | None = None
    unused: Callable[[Any], Iterable[str]] | None = None
    renamed: Mapping[str, str] = field(default_factory=dict)
    upgrade: Callable[[Mapping[str, Any], Mapping[str, Any], str], Mapping[str, Any]] | None = None


_SECTIONS: dict[str, dict[str, Section]] = {}  # {"distill": {"feature": Section, ...}, ...}


def register_section(at: str, name: str, section: Section) -> None:
    """Declare sub-section ``name`` of the extensible section ``at`` (in this order)."""
    owner = _EXTENSIBLE.get(at)
    if owner is not None and hasattr(owner, name):
        raise ValueError(f"{at}.{name}: a section cannot take the name of a key of {at}")
    _SECTIONS.setdefault(at, {})[name] = section


def unregister_section(at: str, name: str) -> None:
    """Remove a declared sub-section and the names its keys accept (tests add their own)."""
    _SECTIONS.get(at, {}).pop(name, None)
    for key in [k for k in _CHOICES if k.startswith(f"{at}.{name}.")]:
        del _CHOICES[key]


def section_at(path: str) -> Section | None:
    """The declaration of the registered section at dotted ``path``, or None."""
    at, _, name = path.rpartition(".")
    return _SECTIONS.get(at, {}).get(name)


def registered_sections(at: str) -> dict[str, Section]:
    """{name: Section} of extensible section ``at``, in registration order."""
    return dict(_SECTIONS.get(at, {}))


def _declaration(at: str, name: str) -> Section:
    """The declaration of a sub-section a config holds; an error when this process has not
    registered it (its term or kind was registered where the config was built, not here)."""
    section = _SECTIONS.get(at, {}).get(name)
    if section is None:
        raise ConfigError(
            f"{at}.{name} is not registered in this process: import the module that registers "
            "it before reading or using this config"
        )
    return section


def walk_sections(obj: Any) -> Iterator[tuple[str, Section, Any]]:
    """(dotted key, declaration, value) of every registered sub-section in a config (or a
    section of it), parents before their own sub-sections."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from walk_sections(value)
    if isinstance(obj, Extensible):
        for name, value in obj.sections:
            yield f"{obj.AT}.{name}", _declaration(obj.AT, name), value
            yield from walk_sections(value)


def resolve_defaults(cfg: Config) -> Config:
    """``cfg`` with the defaults that depend on other keys filled in by each registered
    section's ``resolve`` (a feature kind's levels, CrossKD's layer), so that a run's resolved
    config.yaml names every value it ran with."""
    return _resolved(cfg, cfg)


def _resolved(obj: Any, cfg: Config) -> Any:
    changes = {
        f.name: _resolved(getattr(obj, f.name), cfg)
        for f in fields(obj)
        if is_dataclass(getattr(obj, f.name))
    }
    changes = {name: v for name, v in changes.items() if v is not getattr(obj, name)}
    if isinstance(obj, Extensible):
        sections, changed = [], False
        for name, value in obj.sections:
            new = _resolved(value, cfg)
            resolve = _declaration(obj.AT, name).resolve
            if resolve is not None:
                new = resolve(new, cfg)
            sections.append((name, new))
            changed = changed or new is not value
        if changed:
            changes["sections"] = tuple(sections)
    return replace(obj, **changes) if changes else obj


# The names a key accepts. A registry (students, teachers, distill.kd) declares the names of
# its keys when it is imported (``register_choices``): this module imports none of them, and
# ``import distill`` imports them all, so every config read checks every name.
_CHOICES: dict[str, tuple[Any, ...]] = {
    "teacher.weights_settings": WEIGHTS_SETTINGS,
    "student.weights_settings": WEIGHTS_SETTINGS,
    "anchors.name": (None, *ANCHOR_PRESETS),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("cosine", "step", "constant"),
}


def register_choices(names: Mapping[str, Iterable[Any]]) -> None:
    """For a registry: ``{"student.arch": STUDENTS, ...}``, the names each key accepts."""
    for key, allowed in names.items():
        _CHOICES[key] = tuple(allowed)


def choices() -> dict[str, tuple[Any, ...]]:
    """The names a key accepts, as the registries declared them."""
    return dict(_CHOICES)
