"""Distributed inference and COCO mAP (pycocotools).

Every process infers on its own contiguous shard of the validation images (no padding, so no
image is counted twice), the COCO-format detections are gathered with Accelerate's
``gather_object``, and ``COCOeval`` runs on the main process. Category ids are mapped back to
the dataset's own ids, so the numbers are those of the official COCO evaluation.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from distill.config import Config, replace
from distill.data import CocoDetection, build_dataset, collate, predictions_to_coco
from distill.device import inference_accelerator
from distill.fileio import FileFormatError, read_json, write_json
from distill.models.card import evaluation_record, record_evaluation
from distill.models.retinanet import build_transform, dense_forward, postprocess, set_postprocess
from students import build_student
from teachers import build_teacher

log = logging.getLogger(__name__)

# COCOeval.stats indices: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
METRIC_KEYS = {"map": 0, "ap50": 1, "ap75": 2, "aps": 3, "apm": 4, "apl": 5, "ar100": 8}


@torch.no_grad()
def detect(
    detector: RetinaNet,
    transform: GeneralizedRCNNTransform,
    images: list[Tensor],
    accelerator: Accelerator | torch.device,
) -> list[dict[str, Tensor]]:
    """Detections of a batch of images, as ``distill eval`` scores them.

    images: (3, H_i, W_i) float RGB in [0, 1], any sizes. The shared transform, the dense
    forward under the accelerator's autocast (a bare device: float32, and no process group
    is touched: ``distill check`` on the main process alone), then torchvision's
    post-processing with the detector's score_thresh / nms_thresh / detections_per_img.
    Returns per image {"boxes": (D, 4) xyxy in the image's own pixels, "scores": (D,),
    "labels": (D,) in 1..K-1}: float32 / int64 on the CPU, best score first.
    """
    autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if isinstance(accelerator, torch.device):
        device = accelerator
    else:
        device, autocast = accelerator.device, accelerator.autocast()
    images = [image.to(device) for image in images]
    original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    with autocast:
        image_list, _ = transform(images)
        outputs = dense_forward(detector, image_list)
    detections = postprocess(detector, transform, outputs, image_list, original_sizes)
    results = []
    for det in detections:
        keep = det["labels"] > 0  # label 0 is the background column of torchvision's head
        results.append(
            {
                "boxes": det["boxes"][keep].float().cpu(),
                "scores": det["scores"][keep].float().cpu(),
                "labels": det["labels"][keep].cpu(),
            }
        )
    return results


@torch.no_grad()
def predict(
    detector: RetinaNet,
    transform: GeneralizedRCNNTransform,
    dataset: CocoDetection,
    accelerator: Accelerator | torch.device,
    batch_size: int,
    num_workers: int = 0,
    indices: list[int] | None = None,
) -> list[dict[str, Any]]:
    """COCO-format detections for every image of ``dataset`` (or its images ``indices``),
    gathered on all processes.

    Each process takes a contiguous shard of the image indices (uneven shards allowed: no
    padding, so nothing is duplicated) and the shards are concatenated in process order; a
    bare device (``detect``): this process alone, every image.
    Labels that are no category of the dataset are dropped: torchvision's COCO head has outputs
    for the ids COCO leaves unused, and COCOeval would ignore them too.
    """
    was_training = detector.training
    detector.eval()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    shard = indices
    if not isinstance(accelerator, torch.device):
        with accelerator.split_between_processes(indices) as mine:
            shard = list(mine)
    loader = DataLoader(
        Subset(dataset, shard),
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
    )
    known = torch.tensor(sorted(dataset.label_to_cat_id))
    results: list[dict[str, Any]] = []
    for images, targets in loader:
        for det, target in zip(detect(detector, transform, images, accelerator), targets):
            keep = torch.isin(det["labels"], known)
            results.extend(
                predictions_to_coco(
                    dataset,
                    int(target["image_id"]),
                    det["boxes"][keep],
                    det["scores"][keep],
                    det["labels"][keep],
                )
            )
    detector.train(was_training)
    if not isinstance(accelerator, torch.device) and accelerator.num_processes > 1:
        results = gather_object(results)
    return results


def coco_metrics(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    image_ids: list[int],
    class_names: dict[int, str],
) -> dict[str, Any]:
    """COCOeval bbox metrics over ``image_ids``.

    class_names: {category id: name}. Returns ``map, ap50, ap75, aps, apm, apl, ar100`` (floats
    in [0, 1]; -1 where COCO has no ground truth for a bucket) and ``per_class`` {name: AP}.
    No detections at all gives 0 everywhere (COCO's ``loadRes`` cannot take an empty list).
    """
    evaluator = run_cocoeval(coco_gt, results, image_ids)
    if evaluator is None:
        return {
            **{key: 0.0 for key in METRIC_KEYS},
            "per_class": {name: 0.0 for name in class_names.values()},
            "num_images": len(image_ids),
            "num_detections": 0,
        }
    return {
        **metrics_of(evaluator, class_names),
        "num_images": len(image_ids),
        "num_detections": len(results),
    }


def run_cocoeval(
    coco_gt: COCO, results: list[dict[str, Any]], image_ids: list[int]
) -> COCOeval | None:
    """COCOeval (bbox) evaluated, accumulated and summarized over ``image_ids``; None without
    detections (COCO's ``loadRes`` cannot take an empty list)."""
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def metrics_of(evaluator: COCOeval, class_names: dict[int, str]) -> dict[str, Any]:
    """``METRIC_KEYS`` and ``per_class`` {name: AP} of a summarized COCOeval."""
    stats = evaluator.stats
    metrics: dict[str, Any] = {key: float(stats[i]) for key, i in METRIC_KEYS.items()}
    # precision: (T iou thresholds, R recall points, K classes, A area ranges, M max dets)
    precision = evaluator.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[class_names.get(cat_id, str(cat_id))] = (
            float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
        )
    metrics["per_class"] = per_class
    return metrics


def evaluate(
    detector: RetinaNet,
    transform: GeneralizedRCNNTransform,
    dataset: CocoDetection,
    accelerator: Accelerator,
    batch_size: int,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Distributed inference + COCOeval; the metrics are returned on every process."""
    results = predict(detector, transform, dataset, accelerator, batch_size, num_workers)
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        metrics = coco_metrics(dataset.coco, results, dataset.image_ids, category_names(dataset))
    if accelerator.num_processes > 1:
        metrics = gather_object([metrics])[0]  # the main process's dict, on every process
    return metrics


def category_names(dataset: CocoDetection) -> dict[int, str]:
    """{dataset category id: class name}, as ``coco_metrics`` takes them."""
    return {
        cat_id: dataset.class_names[label - 1] for cat_id, label in dataset.cat_id_to_label.items()
    }


def format_metrics_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table: one row per model."""
    keys = list(METRIC_KEYS)
    lines = [
        "| model | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, metrics in rows:
        lines.append(f"| {name} | " + " | ".join(f"{metrics[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def evaluate_checkpoints(
    cfg: Config, models: list[tuple[str, str]], precision: str | None = None
) -> tuple[Accelerator, list[tuple[str, dict[str, Any]]]]:
    """COCO metrics of each (``teacher`` | ``student``, weights file) on the validation set, in
    ``precision`` (no | fp16 | bf16 | auto; default no). Only what inference needs is read from
    ``cfg``: its training settings (precision, optimizer, schedule) are never checked."""

    accelerator = inference_accelerator(precision)
    dataset = build_dataset(cfg.data, "val")
    num_classes = dataset.num_categories + 1
    transform = build_transform(cfg).to(accelerator.device)
    rows = []
    for kind, weights in models:
        detector = load_detector(cfg, kind, weights, num_classes)
        detector.to(accelerator.device)
        metrics = evaluate(
            detector,
            transform,
            dataset,
            accelerator,
            cfg.eval.batch_size or cfg.data.batch_size,
            cfg.data.num_workers,
        )
        rows.append((f"{kind} ({weights})", metrics))
        # a teacher's card keeps its mAP on this validation set (distill check compares)
        mine = kind == "teacher" and accelerator.is_main_process and Path(weights).is_file()
        if mine and record_evaluation(weights, evaluation_record(metrics, dataset.ann_path)):
            log.info("%s: recorded mAP %.4f in its card", weights, metrics["map"])
    return accelerator, rows


def load_detector(
    cfg: Config,
    kind: str,
    weights: str,
    num_classes: int,
    score_threshold: float | None = None,
) -> RetinaNet:
    """The frozen ``kind`` (teacher | student) with ``weights`` and ``cfg.eval``'s detection
    settings, in eval mode. A teacher's weights may be a torchvision name (COCO_V1, DEFAULT);
    a student's are a file. The weights' training settings are checked
    (``distill.models.provenance``)."""

    if kind == "teacher":  # a missing file that is no torchvision name: build_teacher says so
        detector: RetinaNet = build_teacher(
            replace(cfg, **{"teacher.weights": weights}), num_classes
        )
    elif kind == "student":
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
        student_cfg = replace(cfg, **{"student.weights": weights})
        detector = build_student(student_cfg, num_classes, strict_classes=True).freeze()
    else:
        raise ValueError(f"unknown model kind {kind!r}: teacher | student")
    set_postprocess(detector, cfg.eval, score_threshold)
    return detector.eval()


def run_metrics(weights: Path) -> dict[str, Any] | None:
    """The ``metrics.json`` that the run which wrote ``weights`` left beside them, if any."""
    path = weights.parent / "metrics.json"
    if not path.is_file():
        return None
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise FileFormatError(f"{path}: expected the metrics of a run (a JSON object)")
    return metrics


def eval_command(
    cfg: Config,
    models: list[tuple[str, str]],
    out: Path | None = None,
    precision: str | None = None,
) -> None:
    """``distill eval``: evaluate each (kind, weights file) on the validation set, side by side."""
    if out is not None and (out.is_dir() or not out.parent.is_dir()):  # before evaluating
        what = "is a directory" if out.is_dir() else f"needs the folder {out.parent}"
        raise FileNotFoundError(f"--out {out} {what}: give a .json file path in a folder")
    accelerator, rows = evaluate_checkpoints(cfg, models, precision)
    if accelerator.is_main_process:
        print(format_metrics_table(rows))
        if out is not None:
            payload: Any = (
                rows[0][1]
                if len(rows) == 1
                else {"models": [{"model": name, **m} for name, m in rows]}
            )
            write_json(payload, out)
            print(f"wrote {out}")
