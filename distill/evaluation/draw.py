"""Detections drawn on images: validation grids for TensorBoard, and ``distill predict --draw``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.utils import draw_bounding_boxes, make_grid

from distill.models.retinanet import dense_forward, postprocess

COLORS = {"ground truth": "lime", "teacher": "deepskyblue", "student": "red"}


def to_canvas(image: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """(3, H, W) float in [0, 1] -> (3, scale*H, scale*W) uint8 (nearest: pixels stay sharp),
    what ``draw_bounding_boxes`` draws on."""
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    if scale == 1:
        return canvas
    return canvas.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


@torch.no_grad()
def draw_detections(
    detectors: dict[str, nn.Module],
    transform: nn.Module,
    dataset: Any,
    num_images: int,
    min_score: float = 0.3,
) -> torch.Tensor:
    """A (3, H, W) uint8 grid: one row per image, columns ground truth, then each detector."""
    label_names = {i + 1: name for i, name in enumerate(dataset.class_names)}
    tiles = []
    for index in range(min(num_images, len(dataset))):
        image, target = dataset[index]
        canvas = to_canvas(image)
        names = [dataset.class_names[int(label) - 1] for label in target["labels"]]
        tiles.append(
            draw_bounding_boxes(canvas, target["boxes"], names, colors=COLORS["ground truth"])
        )
        for name, detector in detectors.items():
            param = next(detector.parameters())
            was_training = detector.training
            detector.eval()
            with torch.autocast(param.device.type, enabled=False):
                image_list, _ = transform([image.to(param.device)])
                outputs = dense_forward(detector, image_list)
                det = postprocess(
                    detector, transform, outputs, image_list, [tuple(image.shape[-2:])]
                )[0]
            detector.train(was_training)
            tiles.append(draw_boxes(canvas, det, label_names, min_score, COLORS.get(name, "red")))
    return make_grid(tiles, nrow=1 + len(detectors), padding=2)


def draw_boxes(
    canvas: torch.Tensor,
    detections: dict[str, torch.Tensor],
    names: dict[int, str],
    min_score: float,
    color: str = "red",
) -> torch.Tensor:
    """Detections with score >= ``min_score`` drawn on ``canvas`` ((3, H, W) uint8), each
    labelled "name score"; labels without a name are drawn as their number. Returns a new
    (3, H, W) uint8 image."""
    keep = (detections["scores"] >= min_score) & (detections["labels"] > 0)
    boxes = detections["boxes"][keep].float().cpu()
    labels = [
        f"{names.get(int(lab), str(int(lab)))} {float(s):.2f}"
        for lab, s in zip(detections["labels"][keep], detections["scores"][keep])
    ]
    return draw_bounding_boxes(canvas, boxes, labels, colors=color)


def log_detections(
    writer: Any,
    detector: nn.Module,
    teacher: nn.Module | None,
    transform: nn.Module,
    dataset: Any,
    num_images: int,
    step: int,
) -> None:
    """Ground truth | teacher | model being trained, for the first ``num_images`` val images."""
    detectors = {"teacher": teacher} if teacher is not None else {}
    detectors["student"] = detector
    grid = draw_detections(detectors, transform, dataset, num_images)
    writer.add_image("eval/detections", grid, global_step=step)
