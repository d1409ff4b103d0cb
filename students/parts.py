"""Student parts: P3-P7 feature pyramids over small torchvision backbones, and a lighter head.

Everything is composed from torchvision: the backbones' own feature stages, BackboneWithFPN
(IntermediateLayerGetter + FeaturePyramidNetwork), LastLevelP6P7, and RetinaNetHead with its
conv towers replaced, so that RetinaNet.compute_loss and postprocess_detections work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

from torch import nn
from torchvision.models import ResNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation

NormLayer = Callable[[int], nn.Module]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels each.

    At least 4 channels per group keeps a group non-degenerate on the 1x1 maps that P7 has at
    small image sizes (a 1-channel group on a 1x1 map normalises a single value to 0).
    """
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels)


NORMS: dict[str, NormLayer | None] = {"gn": group_norm, "none": None}


def norm_layer(name: str) -> NormLayer | None:
    """The norm layer of a config's ``norm`` key (``gn`` | ``none``)."""
    if name not in NORMS:
        raise ValueError(f"student.norm must be one of {', '.join(NORMS)}, got {name!r}")
    return NORMS[name]


def _fpn(
    body: nn.Module,
    return_layers: dict[str, str],
    in_channels: list[int],
    out_channels: int,
    norm: NormLayer | None,
) -> BackboneWithFPN:
    # P6 and P7 come from P5 (in == out channels), as in torchvision's RetinaNet v1.
    return BackboneWithFPN(
        body,
        return_layers,
        in_channels,
        out_channels,
        extra_blocks=LastLevelP6P7(out_channels, out_channels),
        norm_layer=norm,
    )


def mobilenet_v3_fpn(
    features: nn.Sequential, out_channels: int, norm: NormLayer | None
) -> BackboneWithFPN:
    """P3-P7 (strides 8..128, keys "p3".."p7") over a MobileNetV3 ``features`` Sequential.

    C3 and C4 are the outputs of the last block before the stride-16 and stride-32 stages,
    C5 the final 1x1 conv; torchvision marks the downsampling blocks with ``_is_cn``, as its
    own ``mobilenet_backbone`` reads them.
    """
    downsampling = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    stages = [downsampling[-2] - 1, downsampling[-1] - 1, len(features) - 1]
    return_layers = {str(i): name for i, name in zip(stages, ("p3", "p4", "p5"))}
    in_channels = [cast(int, features[i].out_channels) for i in stages]
    return _fpn(features, return_layers, in_channels, out_channels, norm)


def resnet_fpn(resnet: ResNet, out_channels: int, norm: NormLayer | None) -> BackboneWithFPN:
    """P3-P7 (strides 8..128, keys "p3".."p7") over a torchvision ResNet's layer2..layer4."""
    return_layers = {"layer2": "p3", "layer3": "p4", "layer4": "p5"}
    in_channels = [getattr(resnet, name)[-1].conv1.in_channels for name in return_layers]
    # conv1 of a block's last unit reads the stage's output width (BasicBlock and Bottleneck).
    return _fpn(resnet, return_layers, in_channels, out_channels, norm)


def retinanet_head(
    in_channels: int,
    channels: int,
    num_anchors: int,
    num_classes: int,
    num_convs: int,
    norm: NormLayer | None,
) -> RetinaNetHead:
    """torchvision's RetinaNetHead with ``num_convs`` 3x3 convs per branch instead of 4.

    The first conv maps the FPN's ``in_channels`` to the head's ``channels``; the output convs
    (cls_logits with its prior-probability bias, bbox_reg) are torchvision's.
    """
    if num_convs < 0:
        raise ValueError(f"student.head_convs must be >= 0, got {num_convs}")
    if num_convs == 0 and in_channels != channels:
        raise ValueError(
            f"student.head_channels ({channels}) differs from fpn_channels ({in_channels}): "
            "needs head_convs >= 1 to change the width"
        )
    head = RetinaNetHead(channels, num_anchors, num_classes, norm_layer=norm)
    head.classification_head.conv = _conv_tower(in_channels, channels, num_convs, norm)
    head.regression_head.conv = _conv_tower(in_channels, channels, num_convs, norm)
    return head


def _conv_tower(
    in_channels: int, channels: int, num_convs: int, norm: NormLayer | None
) -> nn.Sequential:
    layers = [
        Conv2dNormActivation(in_channels if i == 0 else channels, channels, norm_layer=norm)
        for i in range(num_convs)
    ]
    tower = nn.Sequential(*layers)
    # RetinaNetHead's own initialisation of its towers.
    for m in tower.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return tower
