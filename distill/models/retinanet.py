"""DenseOutputs and the split forward over torchvision's RetinaNet parts.

Teacher and student are both ``torchvision.models.detection.RetinaNet`` instances. Instead of
calling ``RetinaNet.forward`` (whose return type depends on the mode), we run one shared
``GeneralizedRCNNTransform`` per batch and then each model's backbone, head and anchor generator
on the same ``ImageList``, so anchor ``a`` of the student is anchor ``a`` of the teacher.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from distill.config import LEVEL_NAMES, AnchorConfig, Config, EvalConfig, resize_bounds

M = TypeVar("M", bound=nn.Module)

LEVELS = LEVEL_NAMES
STRIDES = (8, 16, 32, 64, 128)
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as torchvision's detectors use
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass
class DenseOutputs:
    """Everything a detector computes before post-processing, the same in train and eval mode.

    features:        {"p3".."p7": (N, C, H_l, W_l)} FPN outputs, strides 8..128
    cls_logits:      (N, A, K) classification logits, A = sum over levels of H_l * W_l * A_loc
    bbox_regression: (N, A, 4) box deltas relative to ``anchors`` (torchvision's BoxCoder)
    anchors:         list over images of (A, 4) xyxy anchors in the transformed image frame
    num_anchors_per_level: [H_l * W_l * A_loc for each level], to split A back into levels
    adapted:         {"p3".."p7": (N, C_teacher, H_l, W_l)} student features after the 1x1
                     adapters (empty for the teacher, or when no feature KD needs them)
    extras:          named tensors of learnable KD blocks (e.g. FGD's global context), computed
                     inside the trainable module's forward so DDP syncs their gradients
    """

    features: dict[str, Tensor]
    cls_logits: Tensor
    bbox_regression: Tensor
    anchors: list[Tensor]
    num_anchors_per_level: list[int]
    adapted: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The parts both models share: anchors and the transform
# --------------------------------------------------------------------------------------------


def build_anchor_generator(anchors: AnchorConfig) -> AnchorGenerator:
    """One anchor generator for P3..P7: ``len(scales) * len(aspect_ratios)`` anchors per cell.

    Sizes are ``int(size * scale)`` like torchvision's default RetinaNet anchors, so
    ``sizes: [32, 64, 128, 256, 512]`` with the default scales reproduces them exactly.
    """
    if len(anchors.sizes) != len(LEVELS):
        raise ValueError(
            f"anchors.sizes needs one base size per level {', '.join(LEVELS)}, "
            f"got {len(anchors.sizes)}: {list(anchors.sizes)}"
        )
    sizes = tuple(tuple(int(size * scale) for scale in anchors.scales) for size in anchors.sizes)
    aspect_ratios = (tuple(anchors.aspect_ratios),) * len(sizes)
    return AnchorGenerator(sizes, aspect_ratios)


def build_transform(cfg: Config) -> GeneralizedRCNNTransform:
    """The shared resize + normalise, applied once per batch for teacher and student.

    torchvision's detector transform with ``resize_bounds(cfg.data)``: the shorter side becomes
    min_size unless the longer side would exceed max_size (without data.min_size/max_size: the
    longer side becomes data.image_size); the batch is padded to a multiple of 32. Images are
    (3, H, W) floats in [0, 1]; targets' boxes are resized along.
    """
    min_size, max_size = resize_bounds(cfg.data)
    return GeneralizedRCNNTransform(min_size, max_size, list(IMAGE_MEAN), list(IMAGE_STD))


def set_postprocess(
    model: RetinaNet, cfg: EvalConfig, score_threshold: float | None = None
) -> None:
    """The detection settings of ``cfg.eval`` on ``model`` (score threshold, NMS IoU,
    detections per image); ``score_threshold`` overrides the config's."""
    model.score_thresh = cfg.score_threshold if score_threshold is None else score_threshold
    model.nms_thresh = cfg.nms_threshold
    model.detections_per_img = cfg.detections_per_image


# --------------------------------------------------------------------------------------------
# The split forward
# --------------------------------------------------------------------------------------------


def dense_forward(model: RetinaNet, images: ImageList) -> DenseOutputs:
    """Backbone, head and anchors of ``model`` on an already transformed batch.

    images: ``ImageList`` from ``build_transform``: tensors (N, 3, H, W), image_sizes per image.
    Returns the same ``DenseOutputs`` in train and eval mode (see its docstring for shapes).
    """
    features_per_level = list(model.backbone(images.tensors).values())
    if len(features_per_level) != len(LEVELS):
        raise ValueError(
            f"{type(model.backbone).__name__} returned {len(features_per_level)} feature maps, "
            f"expected {len(LEVELS)} ({', '.join(LEVELS)})"
        )
    head_outputs = model.head(features_per_level)  # (N, A, K) and (N, A, 4)
    # Anchors depend only on the grid sizes; float32 placeholders keep them exact under
    # autocast, where half precision cannot hold pixel coordinates above 2048.
    grids = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in features_per_level]
    anchors = model.anchor_generator(images, grids)  # per image: (A, 4)

    hw_per_level = [f.shape[-2] * f.shape[-1] for f in features_per_level]
    anchors_per_location = head_outputs["cls_logits"].shape[1] // sum(hw_per_level)
    return DenseOutputs(
        features=dict(zip(LEVELS, features_per_level)),
        cls_logits=head_outputs["cls_logits"],
        bbox_regression=head_outputs["bbox_regression"],
        anchors=anchors,
        num_anchors_per_level=[hw * anchors_per_location for hw in hw_per_level],
    )


def detection_loss(
    model: RetinaNet, outputs: DenseOutputs, targets: list[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """torchvision's RetinaNet loss (focal + box regression), computed in float32.

    targets: the *transformed* targets (boxes (M, 4) xyxy in the resized frame, labels (M,)
    in 1..K-1). Returns {"classification": (), "bbox_regression": ()}, each averaged over images.
    """
    head_outputs = {
        "cls_logits": outputs.cls_logits.float(),
        "bbox_regression": outputs.bbox_regression.float(),
    }
    anchors = [a.float() for a in outputs.anchors]
    targets = [{**t, "boxes": t["boxes"].float()} for t in targets]
    with torch.autocast(outputs.cls_logits.device.type, enabled=False):
        losses: dict[str, Tensor] = model.compute_loss(targets, head_outputs, anchors)
    return losses


def postprocess(
    model: RetinaNet,
    transform: GeneralizedRCNNTransform,
    outputs: DenseOutputs,
    images: ImageList,
    original_sizes: Sequence[tuple[int, int]],
) -> list[dict[str, Tensor]]:
    """Detections per image in the original image frame, as ``model.eval()(images)`` gives them.

    Uses ``model.score_thresh``, ``nms_thresh``, ``topk_candidates`` and ``detections_per_img``.
    Returns per image {"boxes": (D, 4) xyxy, "scores": (D,), "labels": (D,)}.
    """
    split = outputs.num_anchors_per_level
    head_outputs = {
        "cls_logits": list(outputs.cls_logits.float().split(split, dim=1)),
        "bbox_regression": list(outputs.bbox_regression.float().split(split, dim=1)),
    }
    anchors = [list(a.float().split(split)) for a in outputs.anchors]
    with torch.autocast(outputs.cls_logits.device.type, enabled=False):
        detections = model.postprocess_detections(head_outputs, anchors, images.image_sizes)
    # postprocess() returns boxes unscaled in training mode, and nothing puts a parameter-free
    # shared transform in eval mode, so do that here.
    with eval_mode(transform):
        result: list[dict[str, Tensor]] = transform.postprocess(
            detections, images.image_sizes, list(original_sizes)
        )
    return result


# --------------------------------------------------------------------------------------------
# Teacher / student agreement
# --------------------------------------------------------------------------------------------


def feature_strides(model: RetinaNet, probe_size: int = 256) -> list[int]:
    """Stride of each backbone output level, measured with one probe forward in eval mode."""
    param = next(model.parameters())
    probe = torch.zeros(1, 3, probe_size, probe_size, device=param.device, dtype=param.dtype)
    with torch.no_grad(), eval_mode(model):
        features = model.backbone(probe)
    return [probe_size // f.shape[-1] for f in features.values()]


def check_compatible(teacher: RetinaNet, student: RetinaNet) -> None:
    """Raise ValueError unless anchor ``a`` of the student is anchor ``a`` of the teacher.

    Compares feature strides, anchor sizes, aspect ratios, anchors per location and the number
    of classes (logit distillation compares class by class).
    """

    def anchor_set(model: RetinaNet) -> tuple[object, object, list[int]]:
        gen = model.anchor_generator
        sizes = tuple(tuple(float(s) for s in level) for level in gen.sizes)
        ratios = tuple(tuple(float(r) for r in level) for level in gen.aspect_ratios)
        return sizes, ratios, gen.num_anchors_per_location()

    problems = []
    for name, t, s in zip(
        ("anchor sizes", "aspect ratios", "anchors per location"),
        anchor_set(teacher),
        anchor_set(student),
    ):
        if t != s:
            problems.append(f"{name}: teacher {t}, student {s}")
    t_classes = teacher.head.classification_head.num_classes
    s_classes = student.head.classification_head.num_classes
    if t_classes != s_classes:
        problems.append(f"classes: teacher {t_classes}, student {s_classes}")
    t_strides, s_strides = feature_strides(teacher), feature_strides(student)
    if t_strides != s_strides:
        problems.append(f"feature strides: teacher {t_strides}, student {s_strides}")
    if problems:
        raise ValueError(
            "teacher and student do not share anchors, so their outputs cannot be compared "
            "anchor by anchor:\n  " + "\n  ".join(problems)
        )


# --------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------


class FreezableRetinaNet(RetinaNet):
    """torchvision's RetinaNet, whose eval mode can be pinned against a parent's ``.train()``.

    ``freeze()``: the whole model is a fixed function (the distillation teacher). No parameter
    requires grad, and ``train()``, also when reached through a parent module, leaves every
    submodule in eval mode, so BatchNorm statistics never move.

    ``freeze_backbone_norm()``: the same for the BatchNorm layers of the backbone body only, the
    usual treatment of a pretrained backbone trained with small batches. It is what torchvision
    gets from FrozenBatchNorm2d, but the modules stay BatchNorm2d so that every build of an
    architecture has the same state dict keys.
    """

    frozen: bool = False
    frozen_norm: bool = False

    def freeze(self) -> FreezableRetinaNet:
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def freeze_backbone_norm(self) -> FreezableRetinaNet:
        self.frozen_norm = True
        for module in _backbone_norms(self):
            module.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> FreezableRetinaNet:
        super().train(mode and not self.frozen)
        if self.frozen_norm:
            for module in _backbone_norms(self):
                module.train(False)
        return self


def _backbone_norms(model: RetinaNet) -> Iterator[nn.Module]:
    body = getattr(model.backbone, "body", model.backbone)
    return (m for m in body.modules() if isinstance(m, _BatchNorm))


@contextmanager
def eval_mode(module: M) -> Iterator[M]:
    """Run a block with ``module`` in eval mode, then restore every submodule's own flag.

    Flags are restored one by one rather than through ``train()``, which a frozen model
    overrides; a probe forward in eval mode also leaves BatchNorm statistics untouched.
    """
    flags: list[tuple[nn.Module, Any]] = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
