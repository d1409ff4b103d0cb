"""Students: light RetinaNets whose anchors match the teacher's (P3-P7, strides 8..128).

``STUDENTS`` maps a config's ``student.arch`` to a builder that can also be called directly:

    model = STUDENTS["retinanet_mobilenet_v3_large_fpn"](num_classes=7, fpn_channels=96)
    model = build_student(cfg, num_classes=7)  # the same, with every option from cfg.student

A student is a torchvision RetinaNet (a FreezableRetinaNet), so trained alone it is exactly
torchvision's RetinaNet training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from torch import nn
from torchvision.models import (
    get_model_weights,
    mobilenet_v3_large,
    mobilenet_v3_small,
    resnet18,
    resnet34,
)

from distill.config import AnchorConfig, Config, register_choices, resize_bounds
from distill.models.provenance import check_trained_settings
from distill.models.retinanet import FreezableRetinaNet, build_anchor_generator
from distill.models.weights import (
    load_detector_weights,
    load_state_dict_file,
    load_weights,
    read_weights,
    resolve_weights,
)
from students.parts import NORMS, mobilenet_v3_fpn, norm_layer, resnet_fpn, retinanet_head

log = logging.getLogger("distill.models")


def _retinanet(
    classifier_name: str,
    classifier_fn: Callable[..., nn.Module],
    num_classes: int,
    *,
    anchors: AnchorConfig | None = None,
    image_size: int = 128,
    max_size: int | None = None,
    fpn_channels: int = 128,
    head_channels: int | None = None,
    head_convs: int = 2,
    norm: str = "gn",
    backbone_weights: str | None = None,
) -> FreezableRetinaNet:
    """RetinaNet on a P3-P7 FPN over ``classifier_fn``'s features; the builders' options.

    anchors:          the run's shared anchor config (default: ``AnchorConfig()``)
    image_size:       min_size of the model's own transform (torchvision's resize)
    max_size:         its max_size (None: image_size, so the longer side becomes image_size)
    fpn_channels:     FPN width; head_channels: head width (None: fpn_channels)
    head_convs:       3x3 convs per head branch before the output conv
    norm:             "gn" | "none" in the FPN and head
    backbone_weights: torchvision ImageNet weights name of ``classifier_name`` or a path to its
                      state dict; the backbone's BatchNorm is then held fixed.
    """
    norm_fn = norm_layer(norm)
    weights = None
    if backbone_weights:
        enum = get_model_weights(classifier_name)
        weights = resolve_weights(backbone_weights, enum, "student backbone")
    classifier = classifier_fn(weights=None)
    if weights is not None:
        state, source = read_weights(weights)
        load_weights(classifier, state, source)
        log.info("student backbone %s from %s", classifier_name, source)

    if classifier_name.startswith("mobilenet"):
        backbone = mobilenet_v3_fpn(cast(nn.Sequential, classifier.features), fpn_channels, norm_fn)
    else:
        backbone = resnet_fpn(classifier, fpn_channels, norm_fn)
    anchor_generator = build_anchor_generator(anchors or AnchorConfig())
    head = retinanet_head(
        fpn_channels,
        head_channels or fpn_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        head_convs,
        norm_fn,
    )
    model = FreezableRetinaNet(
        backbone,
        num_classes,
        min_size=image_size,
        max_size=max_size or image_size,
        anchor_generator=anchor_generator,
        head=head,
    )
    if weights is not None:
        model.freeze_backbone_norm()  # small batches would ruin the pretrained statistics
    return model


def retinanet_mobilenet_v3_large_fpn(num_classes: int, **options: Any) -> FreezableRetinaNet:
    """RetinaNet on MobileNetV3-Large (C3 40, C4 112, C5 960 channels); options: _retinanet."""
    return _retinanet("mobilenet_v3_large", mobilenet_v3_large, num_classes, **options)


def retinanet_mobilenet_v3_small_fpn(num_classes: int, **options: Any) -> FreezableRetinaNet:
    """RetinaNet on MobileNetV3-Small (C3 24, C4 48, C5 576 channels); options: _retinanet."""
    return _retinanet("mobilenet_v3_small", mobilenet_v3_small, num_classes, **options)


def retinanet_resnet18_fpn(num_classes: int, **options: Any) -> FreezableRetinaNet:
    """RetinaNet on ResNet-18 (C3 128, C4 256, C5 512 channels); options: _retinanet."""
    return _retinanet("resnet18", resnet18, num_classes, **options)


def retinanet_resnet34_fpn(num_classes: int, **options: Any) -> FreezableRetinaNet:
    """RetinaNet on ResNet-34 (C3 128, C4 256, C5 512 channels); options: _retinanet."""
    return _retinanet("resnet34", resnet34, num_classes, **options)


STUDENTS: dict[str, Callable[..., FreezableRetinaNet]] = {
    "retinanet_mobilenet_v3_large_fpn": retinanet_mobilenet_v3_large_fpn,
    "retinanet_mobilenet_v3_small_fpn": retinanet_mobilenet_v3_small_fpn,
    "retinanet_resnet18_fpn": retinanet_resnet18_fpn,
    "retinanet_resnet34_fpn": retinanet_resnet34_fpn,
}

register_choices({"student.arch": STUDENTS, "student.norm": NORMS})  # checked as a config is read


def build_student(
    cfg: Config, num_classes: int, strict_classes: bool = False
) -> FreezableRetinaNet:
    """The student ``cfg.student.arch`` with the run's anchors and image size.

    cfg.student.weights, a full student checkpoint path, is loaded last (a different class
    count re-creates cls_logits only, or is an error with ``strict_classes``: evaluation); with
    it, backbone_weights is not fetched, and the backbone's BatchNorm stays fixed as for a
    pretrained backbone.
    """
    s = cfg.student
    if s.arch not in STUDENTS:
        raise ValueError(f"unknown student.arch {s.arch!r}; known: {', '.join(STUDENTS)}")
    if s.weights and not Path(s.weights).is_file():
        raise FileNotFoundError(f"student weights file not found: {s.weights}")
    state = None
    if s.weights:
        state = load_state_dict_file(s.weights)
        check_trained_settings(cfg, "student", Path(s.weights), state)
    min_size, max_size = resize_bounds(cfg.data)
    model = STUDENTS[s.arch](
        num_classes,
        anchors=cfg.anchors,
        image_size=min_size,
        max_size=max_size,
        fpn_channels=s.fpn_channels,
        head_channels=s.head_channels,
        head_convs=s.head_convs,
        norm=s.norm,
        backbone_weights=None if s.weights else s.backbone_weights,
    )
    if s.weights and state is not None:
        load_detector_weights(model, state, s.weights, strict_classes=strict_classes)
        model.freeze_backbone_norm()
        log.info("student %s: loaded %s", s.arch, s.weights)
    return model


__all__ = [
    "STUDENTS",
    "build_student",
    "retinanet_mobilenet_v3_large_fpn",
    "retinanet_mobilenet_v3_small_fpn",
    "retinanet_resnet18_fpn",
    "retinanet_resnet34_fpn",
]
