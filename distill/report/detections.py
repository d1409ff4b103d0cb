"""Detections side by side: ground truth, teacher, baseline and distilled student per image.

Matches come from COCOeval itself (``evalImgs``: greedy matching at IoU 0.5 in score order), so
a box marked as a false positive or a miss is one that COCO's AP counts as such. Because
COCOeval matches detections in descending score order, keeping only the matches of detections
scoring at least ``min_score`` is exactly the matching of those detections alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from distill.data import CocoDetection
from distill.evaluation.draw import to_canvas
from distill.report.figures import literal_text

# Class colours skip red and magenta: those mark false positives and misses.
CLASS_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22",
                "#7f7f7f", "#aec7e8", "#98df8a")  # fmt: skip
FP_COLOR, MISS_COLOR = "#ff0000", "#ff00ff"
TILE_PX = 224  # tiles are scaled up to about this many pixels so that labels stay readable


@dataclass
class Outcome:
    """One model's detections on one image at IoU 0.5: [(xywh box, category id, score)]."""

    hits: list[tuple[list[float], int, float]] = field(default_factory=list)
    false_positives: list[tuple[list[float], int, float]] = field(default_factory=list)
    misses: list[tuple[list[float], int, float]] = field(default_factory=list)  # score: nan

    @property
    def errors(self) -> int:
        return len(self.false_positives) + len(self.misses)


def outcomes(
    evaluator: COCOeval | None, coco_gt: COCO, image_ids: Sequence[int], min_score: float
) -> dict[int, Outcome]:
    """{image id: Outcome} of the detections scoring >= ``min_score`` (IoU 0.5, all sizes).

    evaluator: an evaluated COCOeval, or None for a model without any detection (then every
    ground-truth box is a miss). Crowd and other ignored boxes are neither hits nor misses.
    """
    result = {image_id: Outcome() for image_id in image_ids}
    if evaluator is None:
        for image_id in image_ids:
            for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id], iscrowd=False)):
                result[image_id].misses.append((ann["bbox"], ann["category_id"], float("nan")))
        return result
    all_sizes = evaluator.params.areaRng[0]
    dt_anns, gt_anns = evaluator.cocoDt.anns, evaluator.cocoGt.anns
    for e in evaluator.evalImgs:
        if e is None or e["aRng"] != all_sizes or e["image_id"] not in result:
            continue
        out = result[e["image_id"]]
        scores = dict(zip(e["dtIds"], e["dtScores"]))
        for d, dt_id in enumerate(e["dtIds"]):
            if scores[dt_id] < min_score or e["dtIgnore"][0, d]:
                continue
            entry = (dt_anns[dt_id]["bbox"], e["category_id"], float(scores[dt_id]))
            (out.hits if e["dtMatches"][0, d] > 0 else out.false_positives).append(entry)
        for g, gt_id in enumerate(e["gtIds"]):
            matched = int(e["gtMatches"][0, g])
            if e["gtIgnore"][g] or (matched > 0 and scores[matched] >= min_score):
                continue
            out.misses.append((gt_anns[gt_id]["bbox"], e["category_id"], float("nan")))
    return result


def choose_images(
    distilled: dict[int, Outcome],
    reference: dict[int, Outcome],
    num_differ: int,
    num_random: int,
    seed: int = 0,
) -> list[tuple[int, str]]:
    """Images where the distilled student's errors (false positives + misses) differ most from
    the reference model's, then ``num_random`` others at random: [(image id, why)]."""
    diffs = {i: reference[i].errors - distilled[i].errors for i in distilled}
    ranked = sorted((i for i in diffs if diffs[i] != 0), key=lambda i: (-abs(diffs[i]), i))
    chosen = [
        (i, f"errors {reference[i].errors} → {distilled[i].errors}") for i in ranked[:num_differ]
    ]
    rest = sorted(set(distilled) - {i for i, _ in chosen})
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(rest), size=min(num_random, len(rest)), replace=False)
    chosen += [(rest[int(k)], "at random") for k in sorted(picks)]
    return chosen


def draw_tile(
    image: torch.Tensor,
    outcome: Outcome | None,
    gt: list[tuple[list[float], int, float]],
    class_names: dict[int, str],
) -> torch.Tensor:
    """(3, H, W) float image -> (3, s*H, s*W) uint8 with boxes: ground truth (``outcome`` None)
    or one model's hits (class colour), false positives (red, "FP") and misses (magenta)."""
    scale = max(1, round(TILE_PX / max(image.shape[-2:])))
    canvas = to_canvas(image, scale)
    cat_ids = sorted(class_names)
    boxes: list[list[float]] = []
    labels: list[str] = []
    colors: list[str] = []

    def add(entries: list[tuple[list[float], int, float]], color: str | None, prefix: str) -> None:
        for box, cat_id, score in entries:
            boxes.append(box)
            name = class_names.get(cat_id, str(cat_id))
            labels.append(prefix + name + ("" if np.isnan(score) else f" {score:.2f}"))
            colors.append(color or CLASS_COLORS[cat_ids.index(cat_id) % len(CLASS_COLORS)])

    if outcome is None:
        add(gt, None, "")
    else:
        add(outcome.hits, None, "")
        add(outcome.false_positives, FP_COLOR, "FP ")
        add(outcome.misses, MISS_COLOR, "miss ")
    if not boxes:
        return canvas
    xyxy = box_convert(torch.tensor(boxes, dtype=torch.float32), "xywh", "xyxy") * scale
    # White text on a label filled with the box colour: readable on any background.
    return draw_bounding_boxes(
        canvas,
        xyxy,
        labels,
        colors=colors,
        width=2,
        font=_font(),
        font_size=11,
        label_colors="white",
        fill_labels=True,
    )


def _font() -> str:
    """A TrueType font that is always here (matplotlib ships DejaVu Sans), so that labels can
    be sized; PIL's built-in bitmap font cannot."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


@literal_text
def detections_figure(
    path: Path,
    dataset: CocoDetection,
    columns: Sequence[tuple[str, dict[int, Outcome]]],
    images: Sequence[tuple[int, str]],
    class_names: dict[int, str],
) -> None:
    """A grid: one row per chosen image, columns ground truth then each model's outcomes."""
    import matplotlib.pyplot as plt

    index = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    ncols = 1 + len(columns)
    fig, axes = plt.subplots(
        len(images), ncols, figsize=(3.0 * ncols, 3.25 * len(images)), squeeze=False
    )
    for row, (image_id, why) in enumerate(images):
        image, _ = dataset[index[image_id]]
        gt = [
            (a["bbox"], a["category_id"], float("nan"))
            for a in dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[image_id], iscrowd=False))
        ]
        tiles: list[tuple[str, torch.Tensor]] = [
            ("ground truth", draw_tile(image, None, gt, class_names))
        ]
        for name, outs in columns:
            o = outs[image_id]
            title = f"{name}\n{len(o.false_positives)} FP, {len(o.misses)} missed"
            tiles.append((title, draw_tile(image, o, gt, class_names)))
        for col, (title, tile) in enumerate(tiles):
            ax = axes[row, col]
            ax.imshow(tile.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
        axes[row, 0].set_ylabel(f"image {image_id}\n{why}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def detection_rows(
    models: Sequence[Any],
    distilled: Any,
    reference: Any,
    dataset: CocoDetection,
    min_score: float,
    num_differ: int,
    num_random: int,
) -> tuple[list[tuple[str, dict[int, Outcome]]], list[tuple[int, str]]]:
    """The columns (name, outcomes) of the evaluated ``models`` and the images to show."""
    columns = [
        (m.name, outcomes(m.evaluator, dataset.coco, dataset.image_ids, min_score))
        for m in models
        if m.evaluated
    ]
    by_name = dict(columns)
    images = choose_images(by_name[distilled.name], by_name[reference.name], num_differ, num_random)
    return columns, images
