"""COCOeval's ``accumulate`` again, fast, over a multiset of the evaluated images.

A bootstrap over images needs COCO's AP on hundreds of resampled image sets. The expensive part
of COCOeval, matching detections to ground truth per (image, class, area range), does not depend
on which images are drawn: ``evaluate_per_image`` runs it once (``COCOeval.evaluate``) and keeps,
for every (class, area range, maxDet) cell, its detections in pycocotools' score order with their
true/false-positive flags. ``accumulate`` then turns image multiplicities (how many times each
image was drawn: its detections and its ground truths count that many times) into COCOeval's
precision array with cumulative sums, and equals pycocotools' own ``accumulate`` exactly when
every multiplicity is 1 (tests/test_intervals.py).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The AP keys that ``ap_metrics`` reads from a precision array, as (IoU threshold, area range):
# COCOeval.summarize's stats[0:6] (METRIC_KEYS), all at maxDet 100
AP_KEYS = {
    "map": (None, "all"),
    "ap50": (0.5, "all"),
    "ap75": (0.75, "all"),
    "aps": (None, "small"),
    "apm": (None, "medium"),
    "apl": (None, "large"),
}


@dataclass(frozen=True)
class Cell:
    """One (class, area range, maxDet) cell of COCOeval's accumulate, its detections in the
    order pycocotools ranks them (score, highest first; ties in image order)."""

    image: np.ndarray  # (D,) int: the index (into PerImage.image_ids) of each detection's image
    tps: np.ndarray  # (T, D) bool: a true positive at each IoU threshold
    fps: np.ndarray  # (T, D) bool: a false positive (neither matched nor ignored)
    positives: np.ndarray  # (I,) int: the ground truths of each image that count (not ignored)


@dataclass(frozen=True)
class PerImage:
    """A model's per-image COCO evaluation, ready to be accumulated over any image multiset."""

    image_ids: list[int]  # sorted, as COCOeval orders them
    cat_ids: list[int]
    area_labels: list[str]  # all, small, medium, large
    max_dets: list[int]  # the maxDet of each M index of the precision array
    iou_thrs: np.ndarray  # (T,)
    rec_thrs: np.ndarray  # (R,)
    cells: dict[tuple[int, int, int], Cell]  # (k, a, m) -> Cell


def evaluate_per_image(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    image_ids: Sequence[int],
    max_dets: Sequence[int] | None = (100,),
) -> PerImage:
    """COCOeval (bbox) per-image matching of ``results`` over ``image_ids``, kept for
    ``accumulate``. max_dets: the maxDets of COCOeval's to keep (None: all three; every AP of
    ``AP_KEYS`` needs only 100). No detections at all is allowed: every AP is then 0."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_dt = coco_gt.loadRes(results) if results else _no_detections(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
    return per_image_of(evaluator, max_dets)


def _no_detections(coco_gt: COCO) -> COCO:
    """An empty result set (``loadRes`` cannot take an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {**coco_gt.dataset, "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def per_image_of(evaluator: COCOeval, max_dets: Sequence[int] | None = (100,)) -> PerImage:
    """The cells of an evaluated COCOeval (``evaluate()`` run; ``accumulate()`` not needed)."""
    p = evaluator.params
    if not p.useCats or p.iouType != "bbox":
        raise ValueError("per_image_of needs a bbox COCOeval with useCats=1")
    image_ids = [int(i) for i in p.imgIds]
    num_images, num_areas = len(image_ids), len(p.areaRng)
    keep = [m for m, d in enumerate(p.maxDets) if max_dets is None or d in max_dets]
    cells = {}
    for k in range(len(p.catIds)):
        for a in range(num_areas):
            start = (k * num_areas + a) * num_images  # evalImgs: class, then area, then image
            entries = evaluator.evalImgs[start : start + num_images]
            for j, m in enumerate(keep):
                cells[k, a, j] = _cell(entries, p.maxDets[m], len(p.iouThrs))
    return PerImage(
        image_ids=image_ids,
        cat_ids=[int(c) for c in p.catIds],
        area_labels=list(p.areaRngLbl),
        max_dets=[p.maxDets[m] for m in keep],
        iou_thrs=np.asarray(p.iouThrs),
        rec_thrs=np.asarray(p.recThrs),
        cells=cells,
    )


def _cell(entries: list[dict[str, Any] | None], max_det: int, num_thrs: int) -> Cell:
    """What pycocotools' accumulate concatenates for one cell, ranked as it ranks it."""
    present = [(i, e) for i, e in enumerate(entries) if e is not None]
    positives = np.zeros(len(entries), dtype=np.int64)
    for i, e in present:
        positives[i] = np.count_nonzero(e["gtIgnore"] == 0)
    if not present:
        empty = np.zeros((num_thrs, 0), dtype=bool)
        return Cell(np.zeros(0, dtype=np.int64), empty, empty, positives)
    scores = np.concatenate([e["dtScores"][:max_det] for _, e in present])
    image = np.concatenate([np.full(len(e["dtScores"][:max_det]), i) for i, e in present])
    matches = np.concatenate([e["dtMatches"][:, :max_det] for _, e in present], axis=1)
    ignored = np.concatenate([e["dtIgnore"][:, :max_det] for _, e in present], axis=1)
    order = np.argsort(-scores, kind="mergesort")  # pycocotools' own (stable) ranking
    matches, ignored = matches[:, order], ignored[:, order]
    tps = np.logical_and(matches, np.logical_not(ignored))
    fps = np.logical_and(np.logical_not(matches), np.logical_not(ignored))
    # a detection ignored at every threshold repeats the previous point of the curve: dropping
    # it changes no precision (most detections of an area range's cell are of other sizes)
    counts = (tps | fps).any(axis=0)
    return Cell(image[order][counts].astype(np.int64), tps[:, counts], fps[:, counts], positives)


def accumulate(per_image: PerImage, multiplicity: np.ndarray | None = None) -> np.ndarray:
    """COCOeval's precision array (T, R, K, A, M) over the images drawn ``multiplicity`` times.

    multiplicity: (I,) non-negative ints, one per ``per_image.image_ids`` (None: each once).
    A cell without a ground truth that counts is -1, as in pycocotools. The copies of an image's
    detection are ranked next to each other; pycocotools would rank duplicated images' tied
    scores in image order, which changes no point of the curve outside a run of tied scores.
    """
    p = per_image
    w = np.ones(len(p.image_ids), dtype=np.int64) if multiplicity is None else multiplicity
    w = np.asarray(w, dtype=np.int64)
    shape = (len(p.iou_thrs), len(p.rec_thrs), len(p.cat_ids), len(p.area_labels), len(p.max_dets))
    precision = -np.ones(shape)
    for (k, a, m), cell in p.cells.items():
        positives = int(w @ cell.positives)
        if positives:
            precision[:, :, k, a, m] = _precision_at_recalls(cell, w, positives, p.rec_thrs)
    return precision


def _precision_at_recalls(
    cell: Cell, w: np.ndarray, positives: int, rec_thrs: np.ndarray
) -> np.ndarray:
    """(T, R) interpolated precision of one cell, as pycocotools computes it."""
    weights = w[cell.image]  # (D,): each detection counts as many times as its image
    tp = np.cumsum(cell.tps * weights, axis=1).astype(float)  # (T, D)
    fp = np.cumsum(cell.fps * weights, axis=1).astype(float)
    recall = tp / positives
    precision = tp / (fp + tp + np.spacing(1))
    # the precision envelope: the best precision at this recall or beyond
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    out = np.zeros((len(tp), len(rec_thrs)))
    num_dets = tp.shape[1]
    for t in range(len(tp)):
        first = np.searchsorted(recall[t], rec_thrs, side="left")
        reached = first < num_dets  # recall points the curve never reaches keep precision 0
        out[t, reached] = precision[t, first[reached]]
    return out


def ap_metrics(per_image: PerImage, precision: np.ndarray) -> dict[str, Any]:
    """``AP_KEYS`` and ``per_class`` {category id: AP} of a precision array, as COCOeval's
    summarize and ``distill.evaluation.evaluate.metrics_of`` read them (maxDet 100; -1 where
    there is no ground truth)."""
    m = per_image.max_dets.index(100)
    out: dict[str, Any] = {}
    for key, (iou, area) in AP_KEYS.items():
        cells = precision[:, :, :, per_image.area_labels.index(area), m]
        if iou is not None:
            cells = cells[np.where(iou == per_image.iou_thrs)[0]]
        out[key] = _mean_present(cells)
    all_areas = per_image.area_labels.index("all")
    out["per_class"] = {
        cat_id: _mean_present(precision[:, :, k, all_areas, m])
        for k, cat_id in enumerate(per_image.cat_ids)
    }
    return out


def _mean_present(values: np.ndarray) -> float:
    present = values[values > -1]
    return float(np.mean(present)) if present.size else -1.0
