"""The teacher: torchvision's RetinaNet ResNet50-FPN (v1 or v2), its weights, and freezing.

    teacher = build_teacher(cfg, num_classes=len(categories) + 1)  # frozen, eval mode pinned
    trainee = build_teacher(cfg, num_classes, frozen=False)         # for `distill train-teacher`

Both builds have the same modules and state dict keys, so what ``train-teacher`` writes loads
into the frozen build. The architecture comes from torchvision's builders; this module swaps in
the run's anchor generator and transform size and loads the weights itself, so that a dataset
with another class count can start from the 91-class COCO weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from torch import Tensor, nn
from torchvision.models import WeightsEnum, get_model_weights
from torchvision.models.detection import (
    RetinaNet,
    RetinaNet_ResNet50_FPN_Weights,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
)
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import Bottleneck

from distill.config import Config, register_choices, resize_bounds
from distill.models.provenance import check_trained_settings, torchvision_file_names
from distill.models.retinanet import FreezableRetinaNet, build_anchor_generator
from distill.models.weights import (
    load_detector_weights,
    load_state_dict_file,
    load_weights,
    read_weights,
    resolve_weights,
)

log = logging.getLogger("distill.models")

TEACHERS: dict[str, Callable[..., RetinaNet]] = {
    "retinanet_resnet50_fpn": retinanet_resnet50_fpn,
    "retinanet_resnet50_fpn_v2": retinanet_resnet50_fpn_v2,
}
HEAD_NORMS = ("gn", "none")
register_choices({"teacher.arch": TEACHERS, "teacher.head_norm": (None, *HEAD_NORMS)})
# What torchvision trains of a pretrained ResNet in its detectors (trainable_backbone_layers=3).
_TRAINABLE_PRETRAINED_LAYERS = ("layer2", "layer3", "layer4")


def build_teacher(cfg: Config, num_classes: int, frozen: bool = True) -> FreezableRetinaNet:
    """RetinaNet ``cfg.teacher.arch`` for ``num_classes`` classes (background included).

    cfg.teacher.weights:          torchvision name (COCO_V1, DEFAULT), project checkpoint path,
                                  or None (random init, then cfg.teacher.backbone_weights: an
                                  ImageNet ResNet-50 name such as IMAGENET1K_V1, or a path).
    frozen=True:  no gradients, eval mode pinned against a parent's ``.train()``.
    frozen=False: trainable; from pretrained weights, the backbone's BatchNorm layers are held
                  fixed and conv1/layer1 are not trained, as in torchvision's detectors.
    The transform resizes to ``resize_bounds(cfg.data)``; anchors come from cfg.anchors.
    """
    t = cfg.teacher
    if t.arch not in TEACHERS:
        raise ValueError(f"unknown teacher.arch {t.arch!r}; known: {', '.join(TEACHERS)}")
    # Resolve the weights first: a wrong path should fail before the model is built.
    weights = (
        resolve_weights(t.weights, get_model_weights(t.arch), "teacher") if t.weights else None
    )
    # What the weights were trained with must be what this config runs them with.
    state: dict[str, Tensor] | None = None
    if isinstance(weights, Path):
        state = load_state_dict_file(weights)
    if weights is not None:
        check_trained_settings(cfg, "teacher", weights, state)
    backbone_weights = None
    if t.backbone_weights and weights is None:
        backbone_weights = resolve_weights(
            t.backbone_weights, get_model_weights("resnet50"), "teacher backbone"
        )

    anchor_generator = build_anchor_generator(cfg.anchors)
    reference = TEACHERS[t.arch](weights=None, weights_backbone=None, num_classes=num_classes)
    num_anchors = anchor_generator.num_anchors_per_location()[0]
    head = _head(reference, num_anchors, num_classes, t.head_norm)
    min_size, max_size = resize_bounds(cfg.data)
    model = FreezableRetinaNet(
        reference.backbone,
        num_classes,
        min_size=min_size,
        max_size=max_size,
        anchor_generator=anchor_generator,
        head=head,
    )

    if weights is not None:
        if state is None:
            state, source = read_weights(weights)
        else:
            source = str(weights)
        load_detector_weights(model, state, source, strict_classes=frozen)
        if _is_coco_v1(weights):
            # These weights were trained with FrozenBatchNorm2d(eps=0); torchvision's builder
            # restores that with overwrite_eps, the same here for the BatchNorm2d layers.
            for m in model.backbone.body.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eps = 0.0
        log.info("teacher %s: loaded %s", t.arch, source)
    elif backbone_weights is not None:
        state, source = read_weights(backbone_weights)
        load_weights(model.backbone.body, state, source, allow_unexpected=True)  # drops fc.*
        log.info("teacher %s: backbone from %s, FPN and head random", t.arch, source)
    else:
        if t.zero_init_residual:
            for m in model.backbone.body.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
        if frozen:
            log.warning("teacher %s has random weights (teacher.weights is null)", t.arch)

    if frozen:
        return model.freeze()
    if weights is not None or backbone_weights is not None:
        model.freeze_backbone_norm()
        for name, param in model.backbone.body.named_parameters():
            if not name.startswith(_TRAINABLE_PRETRAINED_LAYERS):
                param.requires_grad_(False)
    return model


def _is_coco_v1(weights: WeightsEnum | Path) -> bool:
    """torchvision's v1 COCO weights, by name or as torch's cache file."""
    if isinstance(weights, Path):
        name = torchvision_file_names().get(weights.name)
        return name == f"{RetinaNet_ResNet50_FPN_Weights.__name__}.COCO_V1"
    return weights == RetinaNet_ResNet50_FPN_Weights.COCO_V1


def _head(
    reference: RetinaNet, num_anchors: int, num_classes: int, head_norm: str | None
) -> RetinaNetHead:
    """torchvision's head for the arch, rebuilt when anchors per cell or the norm differ."""
    if head_norm is not None and head_norm not in HEAD_NORMS:
        raise ValueError(
            f"teacher.head_norm must be one of {HEAD_NORMS} or null, got {head_norm!r}"
        )
    head = reference.head
    has_gn = any(isinstance(m, nn.GroupNorm) for m in head.modules())
    want_gn = has_gn if head_norm is None else head_norm == "gn"
    if head.classification_head.num_anchors == num_anchors and has_gn == want_gn:
        return head
    norm_layer = partial(nn.GroupNorm, 32) if want_gn else None
    new = RetinaNetHead(reference.backbone.out_channels, num_anchors, num_classes, norm_layer)
    # v2 regresses boxes with a GIoU loss; keep the arch's choice.
    new.regression_head._loss_type = head.regression_head._loss_type
    return new


def teacher_weights_missing(cfg: Config) -> Path | None:
    """The teacher checkpoint path if ``cfg`` names one that does not exist (yet), else None."""
    spec = cfg.teacher.weights
    if not spec or cfg.teacher.arch not in TEACHERS:
        return None
    try:
        resolve_weights(spec, get_model_weights(cfg.teacher.arch), "teacher")
    except FileNotFoundError:
        return Path(spec)
    return None


__all__ = ["TEACHERS", "build_teacher", "teacher_weights_missing"]
