"""The run configuration's schema: one frozen dataclass per YAML section, and the names and
ranges that its keys accept.

A config file has the sections below; every key has a default, so a file names only what it
changes. Adding a field is one line in the matching dataclass (``distill.config.load`` reads and
checks files against these classes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any


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


@dataclass(frozen=True)
class FeatureKDConfig:
    """Feature KD. Defaults follow each method's own RetinaNet reference config (see
    tests/test_reference_defaults.py for the file and value each follows)."""

    kind: str = "cwd"  # mse | cwd | pkd | fgd | mgd
    weight: float = 0.0
    tau: float = 1.0  # temperature of cwd (MMRazor's CWD configs: tau=1)
    # null: the kind's reference levels, filled in when the config is read (``resolve_defaults``,
    # so a run's config.yaml names them): P3-P6 for pkd (MMRazor's PKD RetinaNet config distils
    # neck outputs 0-3), P3-P7 for the others
    levels: tuple[str, ...] | None = None
    # sum | mean of the per-level losses; sum, as the papers (a weight from one means the same)
    level_reduction: str = "sum"
    # FGD (Yang et al., CVPR 2022): its own temperature and weights, as in FGD's RetinaNet
    # configs (fgd_retina_*_distill_retina_r50_fpn_2x_coco.py: temp 0.5, alpha 1e-3, beta 5e-4,
    # gamma 5e-4, lambda 5e-6)
    fgd_tau: float = 0.5
    fgd_alpha: float = 0.001
    fgd_beta: float = 0.0005
    fgd_gamma: float = 0.0005
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
    # student tower convs before the hand-over (0: the FPN features); null: one before the last
    # (student.head_convs - 1: CrossKD's reused_teacher_head_idx=3 of four-conv heads), filled in
    # when the config is read (``resolve_defaults``)
    layer: int | None = None
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


LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")  # the FPN levels of every model here
# distill.feature.levels when null, per kind: PKD's reference (MMRazor) distils P3-P6
DEFAULT_LEVELS = {"pkd": ("p3", "p4", "p5", "p6")}
INIT_FROM_TEACHER_PARTS = ("neck", "head")  # student.init_from_teacher's names


def default_levels(kind: str) -> tuple[str, ...]:
    """The levels feature KD of ``kind`` distils when ``distill.feature.levels`` is null."""
    return DEFAULT_LEVELS.get(kind, LEVEL_NAMES)


def default_crosskd_layer(head_convs: int) -> int:
    """``distill.crosskd.layer`` when null: the student's tower conv before its last one (3 of
    four, CrossKD's ``reused_teacher_head_idx=3``), 0 for a head without tower convs."""
    return max(head_convs - 1, 0)


def resolve_defaults(cfg: Config) -> Config:
    """``cfg`` with the defaults that depend on other keys filled in (null ->
    ``default_levels(kind)``, ``default_crosskd_layer(student.head_convs)``), so that a run's
    resolved config.yaml names every value it ran with."""
    feature, crosskd = cfg.distill.feature, cfg.distill.crosskd
    if feature.levels is None:
        feature = replace(feature, levels=default_levels(feature.kind))
    if crosskd.layer is None:
        crosskd = replace(crosskd, layer=default_crosskd_layer(cfg.student.head_convs))
    if feature is cfg.distill.feature and crosskd is cfg.distill.crosskd:
        return cfg
    return replace(cfg, distill=replace(cfg.distill, feature=feature, crosskd=crosskd))


# The weight of every KD term: all 0 is the plain student (no teacher runs).
KD_WEIGHT_KEYS = (
    "distill.feature.weight", "distill.logit.weight", "distill.box.weight",
    "distill.crosskd.cls_weight", "distill.crosskd.box_weight",
)  # fmt: skip


# Values that must be positive, or at least zero (a type check cannot tell).
POSITIVE = (
    "data.image_size", "data.batch_size", "train.lr", "train.grad_accum", "train.log_every",
    "train.max_nonfinite", "distill.logit.temperature", "distill.feature.tau",
    "distill.feature.fgd_tau",
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

# Upper bounds where a larger value is a typo that would allocate without end rather than a
# model (torchvision's RetinaNet: 4 head convs, 256 channels).
AT_MOST = {"student.head_convs": 16, "student.fpn_channels": 4096, "student.head_channels": 4096}


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
