"""YAML run configuration -> frozen dataclasses.

A config file has the sections below; every key has a default, so a file names only what it
changes. Adding a field is one line in the matching dataclass. Files are read with
``yaml.safe_load`` only; unknown keys and wrong types are errors that name the key, the file
and (for unknown keys) the closest known key.

    cfg = load_config("configs/shapes/distill.yaml", ["distill.logit.temperature=2"])
    cfg.distill.logit.temperature  # 2.0
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from distill.files import write_text_atomic


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
    max_train_images: int | None = None  # use only the first N training images (smoke runs)
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
    # backbone-only weights: torchvision name (e.g. IMAGENET1K_V1), a local path, or null.
    backbone_weights: str | None = None
    head_norm: str | None = None  # gn | none: override the head's norm (v1: none, v2: GroupNorm)
    # from random weights: start each residual block as the identity (last BN scale = 0), which
    # makes a from-scratch ResNet-50 learn faster (Goyal et al. 2017); ignored with weights
    zero_init_residual: bool = False
    # check: refuse a resize or anchors other than those the weights were trained with (see
    # distill.settings); torchvision: the weights are a card-less state dict of torchvision's
    # COCO RetinaNet, check against its settings; ignore: a deliberate override, no check
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


@dataclass(frozen=True)
class FeatureKDConfig:
    kind: str = "cwd"  # mse | cwd | pkd | fgd | mgd
    weight: float = 0.0
    tau: float = 1.0  # temperature of cwd / fgd attention
    levels: tuple[str, ...] = ("p3", "p4", "p5", "p6", "p7")
    # sum | mean of the per-level losses; sum, as the papers (a weight from one means the same)
    level_reduction: str = "sum"
    # FGD (Yang et al. 2022) weights; defaults are the paper's RetinaNet settings.
    fgd_alpha: float = 0.001
    fgd_beta: float = 0.0005
    fgd_gamma: float = 0.001
    fgd_lambda: float = 0.000005
    # MGD (Yang et al. 2022): share of the student's feature positions masked before its
    # generator regenerates the teacher's feature (the paper's 0.65 for detection)
    mgd_ratio: float = 0.65


@dataclass(frozen=True)
class LogitKDConfig:
    kind: str = "bce"  # bce | kl
    weight: float = 0.0
    temperature: float = 4.0
    # per-anchor weighting: none | teacher_max (teacher's max class probability)
    anchor_weighting: str = "teacher_max"


@dataclass(frozen=True)
class BoxKDConfig:
    kind: str = "l1"  # l1 | giou
    weight: float = 0.0
    # anchors whose teacher max class probability is at least this take part
    score_threshold: float = 0.3


@dataclass(frozen=True)
class CrossKDConfig:
    """CrossKD (Wang et al., CVPR 2024): the student's head features after its first ``layer``
    tower convs run through the teacher's head from its conv ``teacher_layer`` on, and those
    cross-head predictions are distilled towards the teacher's."""

    cls_weight: float = 0.0  # quality-focal KD of the cross-head classification
    box_weight: float = 0.0  # GIoU of the cross-head boxes, weighted by the teacher's score
    layer: int = 2  # student tower convs before the hand-over (0: the FPN features)
    teacher_layer: int | None = None  # teacher tower convs skipped; null: the same as layer
    beta: float = 1.0  # exponent of the quality-focal weight |sigmoid(s) - sigmoid(t)|^beta


@dataclass(frozen=True)
class DistillConfig:
    feature: FeatureKDConfig = field(default_factory=FeatureKDConfig)
    logit: LogitKDConfig = field(default_factory=LogitKDConfig)
    box: BoxKDConfig = field(default_factory=BoxKDConfig)
    crosskd: CrossKDConfig = field(default_factory=CrossKDConfig)
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


# --------------------------------------------------------------------------------------------
# Reading, checking, overriding, writing
# --------------------------------------------------------------------------------------------

T = TypeVar("T")


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (``None``: all defaults), apply ``key.path=value`` overrides, check it."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(Path(path))
    cfg = _build(raw, source)  # the file alone: its errors name the file
    sources = [source]
    for item in overrides:
        _apply_override(raw, item)
        cfg = _build(raw, f"--set {item}")  # an override's errors name the override
        sources.append(f"--set {item}")
    # a pair of keys, checked once all overrides are in (they may set one key each)
    if (cfg.data.min_size is None) != (cfg.data.max_size is None):
        given, other = (
            ("min_size", "max_size") if cfg.data.max_size is None else ("max_size", "min_size")
        )
        raise ConfigError(
            f"data.{given} in {' / '.join(sources)}: give data.{other} too (torchvision's resize "
            "needs both; neither: data.image_size)"
        )
    return cfg


def _build(raw: dict[str, Any], source: str) -> Config:
    cfg = from_dict(Config, raw, source)
    check_values(cfg, source)
    return _named_anchors(cfg, raw.get("anchors") or {}, source)


def _named_anchors(cfg: Config, raw_anchors: Mapping[str, Any], source: str) -> Config:
    """Fill in the numbers of ``anchors.name``; numbers given beside the name must be its own
    (a resolved config.yaml holds both), anything else is an error naming the key."""
    if cfg.anchors.name is None:
        return cfg
    preset = ANCHOR_PRESETS[cfg.anchors.name]
    for key in ("sizes", "scales", "aspect_ratios"):
        given, wanted = getattr(cfg.anchors, key), getattr(preset, key)
        if key in raw_anchors and given != wanted:
            raise ConfigError(
                f"anchors.{key} in {source}: {list(given)} contradicts anchors.name "
                f"{cfg.anchors.name} ({list(wanted)}); give the name or the numbers, not both"
            )
    return dataclasses.replace(cfg, anchors=preset)


LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")  # the FPN levels of every model here
# The weight of every KD term: all 0 is the plain student (no teacher runs).
KD_WEIGHT_KEYS = (
    "distill.feature.weight", "distill.logit.weight", "distill.box.weight",
    "distill.crosskd.cls_weight", "distill.crosskd.box_weight",
)  # fmt: skip


# Values that must be positive, or at least zero (a type check cannot tell).
POSITIVE = (
    "data.image_size", "data.batch_size", "train.lr", "train.grad_accum", "train.log_every",
    "train.max_nonfinite", "distill.logit.temperature", "distill.feature.tau",
    "eval.detections_per_image", "eval.batch_size", "student.fpn_channels", "data.min_size",
    "data.max_size",
    "student.head_channels", "student.head_convs", "data.max_train_images", "data.max_val_images",
)  # fmt: skip
NON_NEGATIVE = (
    "data.num_workers", "train.epochs",
    "train.max_steps", "train.warmup_steps", "train.weight_decay", "train.momentum",
    "train.checkpoint_every_steps", "train.seed", "eval.every_epochs", "eval.images_logged",
    "distill.warmup_steps", *KD_WEIGHT_KEYS, "distill.crosskd.layer",
    "distill.crosskd.teacher_layer", "distill.crosskd.beta", "distill.feature.mgd_ratio",
)  # fmt: skip


# The names a key accepts. A registry (students, teachers, distill.losses) declares the names of
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


def check_values(cfg: Config, source: str) -> None:
    """Names and ranges that types alone do not check; errors name the key and the source."""
    flat = flatten(cfg)
    for key, allowed in choices().items():
        if flat[key] not in allowed:
            names = " | ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{key} in {source}: {flat[key]!r} is not one of {names}")
    for keys, low, words in ((POSITIVE, False, "> 0"), (NON_NEGATIVE, True, ">= 0")):
        for key in keys:
            value = flat[key]
            if value is not None and not (value >= 0 if low else value > 0):
                raise ConfigError(f"{key} in {source}: {value!r} must be {words}")
    if not 0 <= cfg.data.hflip <= 1:  # also NaN
        raise ConfigError(f"data.hflip in {source}: {cfg.data.hflip!r} must be between 0 and 1")
    if not 0 <= cfg.distill.feature.mgd_ratio < 1:  # also NaN
        raise ConfigError(
            f"distill.feature.mgd_ratio in {source}: {cfg.distill.feature.mgd_ratio!r} "
            "must be in [0, 1)"
        )
    if not 0 < cfg.eval.nms_threshold <= 1:
        raise ConfigError(
            f"eval.nms_threshold in {source}: {cfg.eval.nms_threshold!r} must be in (0, 1]"
        )
    levels = cfg.distill.feature.levels
    if not levels or any(level not in LEVEL_NAMES for level in levels):
        raise ConfigError(
            f"distill.feature.levels in {source}: {list(levels)} must be a non-empty list of "
            f"{', '.join(LEVEL_NAMES)}"
        )
    if len(cfg.anchors.sizes) != len(LEVEL_NAMES):
        raise ConfigError(
            f"anchors.sizes in {source}: one base size per level {', '.join(LEVEL_NAMES)}, "
            f"got {list(cfg.anchors.sizes)}"
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the
    last one silently: a second ``train:`` section would drop the first)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """``yaml.safe_load`` a file that must hold a mapping; errors name the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # safe_load, unique keys
    except yaml.YAMLError as err:  # includes Python tags, which safe_load refuses
        raise ConfigError(f"cannot parse {path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"cannot read {path}: not a text (UTF-8) file ({err.reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """A command-line value read as YAML (``4``, ``null``, ``[p3, p4]``), except that YAML 1.1's
    word booleans (no, yes, on, off) stay words: ``train.mixed_precision=no`` is the string."""
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    return value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = parse_value(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot read the value: {err}") from None
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], raw: Mapping[str, Any], source: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} in {source} must be a mapping, "
            f"got {type(raw).__name__} {raw!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key {prefix}{key} in {source}{hint}")
    values = {}
    for key, value in raw.items():
        values[key] = _convert(hints[key], value, f"{prefix}{key}", source)
    return cls(**values)


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{key}.")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key, source)
            except ConfigError as err:
                errors.append(err)
        raise _type_error(key, value, tp, source)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise _type_error(key, value, tp, source)
        return tuple(_convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(key, value, tp, source)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, value, tp, source)
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise _type_error(key, value, tp, source)
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp}")  # a bug in this file


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, value: Any, tp: Any, source: str) -> ConfigError:
    hint = ""
    if isinstance(value, bool) and tp is str:
        hint = ' (YAML reads an unquoted no, yes, on or off as a boolean: quote it, "no")'
    return ConfigError(
        f"{key} in {source}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}"
    )


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (tuples as lists) of a config, suitable for YAML or JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


# What a resumed run may change: where things are, how it is logged or evaluated, and how long
# it trains (a finished run resumed with more epochs goes on), not what it trains. Keys ending
# in "." cover a section.
RESUME_MAY_CHANGE = (
    "output.", "eval.", "data.root", "data.train", "data.val", "data.images", "data.val_images",
    "data.num_workers", "teacher.weights", "teacher.backbone_weights", "student.weights",
    "student.backbone_weights", "teacher.weights_settings", "student.weights_settings",
    "train.epochs", "train.max_steps", "train.log_every",
    "train.checkpoint_every_steps", "train.max_nonfinite", "train.trace_batches",
)  # fmt: skip


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 0.01, ...}``: every leaf of a config under its dotted key."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}{key}.", sub)
        else:
            flat[prefix[:-1]] = value

    walk("", to_dict(cfg))
    return flat


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """A resumed run trains with the config it started with (its ``config.yaml``): same
    model, data and schedule, so that it does not silently change course halfway."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    before, now = flatten(load_config(saved)), flatten(cfg)
    changed = [
        f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key) and not key.startswith(RESUME_MAY_CHANGE)
    ]
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from the one the run started with "
            f"({saved}) in {'; '.join(changed)}. Resume with the config and --set overrides it "
            f"started with (all of them are in {saved}; for a single run, pass that file as the "
            "CONFIG)"
        )


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; ``load_config(path)`` reads back the same object."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` with dotted keys: ``replace(cfg, **{"train.epochs": 3})``."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **direct)  # type: ignore[type-var]
