"""Per-image augmentations applied to an image and its boxes together.

Resizing and normalisation are not here: the detector's ``GeneralizedRCNNTransform`` does them
once per batch, shared by teacher and student (see ``distill.models.retinanet``).
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision import tv_tensors


def hflip(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Mirror an image and its boxes left-right: ``x1' = W - x2``, ``x2' = W - x1``.

    image:  (C, H, W)
    target: {"boxes": (n, 4) xyxy in pixels, ...}; other keys are passed through unchanged.
    Returns a new image and a new target dict; the inputs are not modified.
    """
    width = image.shape[-1]
    flipped = dict(target)
    flipped["boxes"] = F.horizontal_flip_bounding_boxes(
        target["boxes"],
        format=tv_tensors.BoundingBoxFormat.XYXY,
        canvas_size=(image.shape[-2], width),
    )
    return F.horizontal_flip_image(image), flipped


def random_hflip(
    image: Tensor, target: dict[str, Any], p: float, generator: torch.Generator | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """``hflip`` with probability ``p``.

    The coin comes from ``generator`` (or torch's global RNG), never ``random``. No number is
    drawn when ``p == 0``, so turning flips off does not shift other random streams.
    """
    if p > 0 and torch.rand((), generator=generator) < p:
        return hflip(image, target)
    return image, target
