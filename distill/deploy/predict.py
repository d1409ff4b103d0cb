"""``distill predict``: a model on a user's own images (files or folders, JPEG / PNG, any size).

    distill predict CONFIG --weights FILE [--model student|teacher] INPUT... --out DIR
                    [--draw] [--score-thresh X] [--draw-thresh Y]

The images go through the path ``distill eval`` scores
(``distill.evaluation.evaluate.detect``: the shared transform, the dense forward,
torchvision's post-processing with ``eval``'s settings), one image at a time by default, so
that each image's detections are exactly those torchvision's ``model.eval()([image])`` gives it,
whatever else is in the folder. ``batch_size`` > 1 batches images of one size (see
``run_by_size``): faster on a GPU, with scores that may differ from a single image's in the
last bits (a convolution over a batch of 2 is not bit for bit that over 1, on a CPU too).
``DIR/detections.json`` is a list in COCO results
format, ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, plus the
category's ``category_name`` and the image's ``file_name``; ``--draw`` writes each image with
its boxes under ``DIR/drawn/``. An image that cannot be read is named in a warning and counted
(``DIR/summary.json``), and the others are still predicted.

Categories (ids and names) come from the weights' card, else the config's annotation file
(``data.val``), else torchvision's COCO category names for torchvision's weights.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_convert
from tqdm import tqdm

from distill.config import Config
from distill.data import DatasetError, build_dataset, load_image
from distill.deploy.onnx_runtime import ExportError, detect_onnx, open_session, read_metadata
from distill.engine.accelerator import inference_accelerator
from distill.evaluation.draw import draw_boxes
from distill.evaluation.evaluate import detect, load_detector, write_json
from distill.models.card import CardError, read_card
from distill.models.provenance import is_torchvision_name, torchvision_categories
from distill.models.retinanet import build_transform

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Categories:
    """The model's output labels as dataset categories."""

    num_classes: int  # classifier outputs, background included
    by_label: dict[int, tuple[int, str]]  # label -> (category id, name)
    source: str  # where they come from, for the log


def find_images(inputs: Sequence[Path]) -> list[tuple[Path, str]]:
    """(path, name) of every image: a file as given, a folder's JPEG / PNG files (recursively,
    sorted); ``name`` is the path relative to its folder (a file: its name). A missing input or
    a folder without images is an error naming it."""
    found: list[tuple[Path, str]] = []
    for item in inputs:
        if item.is_file():
            found.append((item, item.name))
        elif item.is_dir():
            files = sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not files:
                raise FileNotFoundError(f"{item}: no JPEG or PNG images in this folder")
            found.extend((p, p.relative_to(item).as_posix()) for p in files)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return found


def find_categories(cfg: Config, kind: str, weights: str) -> Categories:
    """The label -> category map of ``weights`` (see the module docstring for the order)."""
    path = Path(weights)
    card = read_card(path) if path.is_file() else None
    if card is not None:
        if card["role"] != kind:
            raise CardError(
                f"{path} holds a {card['role']}'s weights (its card {path.with_suffix('.json')}):"
                f" use --model {card['role']}"
            )
        by_label = {int(c["label"]): (int(c["id"]), str(c["name"])) for c in card["categories"]}
        return Categories(int(card["num_classes"]), by_label, f"the card of {path}")
    ann = Path(cfg.data.root) / cfg.data.val
    if ann.is_file():
        dataset = build_dataset(cfg.data, "val")
        by_label = {
            label: (cat_id, dataset.class_names[label - 1])
            for cat_id, label in dataset.cat_id_to_label.items()
        }
        return Categories(dataset.num_categories + 1, by_label, str(ann))
    if kind == "teacher" and cfg.data.category_ids_as_labels:
        names = torchvision_categories(cfg, weights)
        if names is not None:  # index = COCO category id = label; "N/A": ids COCO leaves unused
            by_label = {i: (i, n) for i, n in enumerate(names) if i > 0 and n != "N/A"}
            return Categories(len(names), by_label, "torchvision's COCO categories")
    raise DatasetError(
        f"cannot tell the categories of {weights}: it has no card ({path.with_suffix('.json')}),"
        f" and the config's annotation file {ann} does not exist; point data.root / data.val "
        "at the dataset's annotation file (only its categories are read)"
    )


class ImageFiles(Dataset[tuple[Tensor | None, dict[str, Any]]]):
    """Image files as (image (3, H, W) float in [0, 1] or None, {"index", "error"})."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, dict[str, Any]]:
        try:
            return load_image(self.files[index]), {"index": index, "error": None}
        except (DatasetError, FileNotFoundError) as err:
            return None, {"index": index, "error": str(err)}


def _keep_all(
    batch: Sequence[tuple[Tensor | None, dict[str, Any]]],
) -> list[tuple[Tensor | None, dict[str, Any]]]:
    return list(batch)


def predict_images(
    cfg: Config,
    weights: str,
    inputs: Sequence[Path],
    out: Path,
    kind: str = "student",
    draw: bool = False,
    score_threshold: float | None = None,
    draw_threshold: float = 0.3,
    onnx: Path | None = None,
    precision: str | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Detections of ``kind`` with ``weights`` on the images of ``inputs``, written to ``out``.

    score_threshold: None: ``eval.score_threshold`` (the detections ``distill eval`` scores).
    draw_threshold:  the lowest score drawn with ``draw``.
    onnx:            a model written by ``distill export``, run with ONNX Runtime instead of
                     ``weights`` (categories and settings from its metadata; cfg: batching).
    precision:       no | fp16 | bf16 | auto (default no, float32) for a PyTorch model; only
                     what inference needs is read from ``cfg``, never its training settings.
    batch_size:      images of one size per forward (1: exactly torchvision's single image).
    Returns the summary also written to ``out/summary.json``: images, predicted, unreadable
    (names), detections.
    """

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    images = find_images(inputs)  # before any model is built: a typo fails at once
    if onnx is not None:
        categories, run, used_threshold = _onnx_model(onnx, score_threshold)
    else:
        if not Path(weights).is_file() and not (
            kind == "teacher" and is_torchvision_name(cfg.teacher.arch, weights)
        ):
            names = " nor a torchvision weights name" if kind == "teacher" else ""
            raise FileNotFoundError(f"weights file not found{names}: {weights}")
        categories = find_categories(cfg, kind, weights)
        accelerator = inference_accelerator(precision)
        detector = load_detector(cfg, kind, weights, categories.num_classes, score_threshold)
        detector.to(accelerator.device)
        transform = build_transform(cfg).to(accelerator.device)
        used_threshold = float(detector.score_thresh)

        def run(images: list[Tensor]) -> list[dict[str, Tensor]]:
            return detect(detector, transform, images, accelerator)

    log.info("%d images; categories from %s", len(images), categories.source)

    loader = DataLoader(
        ImageFiles([path for path, _ in images]),
        batch_sampler=size_batches([path for path, _ in images], batch_size),
        num_workers=cfg.data.num_workers,
        collate_fn=_keep_all,
    )
    known = torch.tensor(sorted(categories.by_label))
    label_names = {label: name for label, (_, name) in categories.by_label.items()}
    results: list[dict[str, Any]] = []
    failed: list[int] = []  # indices of the images that could not be read
    drawn_names: set[str] = set()
    for batch in tqdm(loader, desc="predict", unit="batch", file=sys.stderr):
        readable = [(image, info) for image, info in batch if image is not None]
        for _, info in batch:
            if info["error"] is not None:
                failed.append(info["index"])
                log.warning("skipped: %s", info["error"])
        if not readable:
            continue
        detections = run_by_size(run, [im for im, _ in readable])
        for (image, info), det in zip(readable, detections):
            index = info["index"]
            name = images[index][1]
            keep = torch.isin(det["labels"], known)  # as distill eval: no unused COCO ids
            det = {k: v[keep] for k, v in det.items()}
            results.extend(_coco_results(index + 1, name, det, categories))
            if draw:
                canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
                picture = draw_boxes(canvas, det, label_names, draw_threshold)
                target = _unique(out / "drawn" / Path(name).with_suffix(".png"), drawn_names)
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(picture.permute(1, 2, 0).numpy()).save(target)
    results.sort(key=lambda row: row["image_id"])  # in the order of the inputs (stable)
    unreadable = [str(images[index][0]) for index in sorted(failed)]
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "detections.json")
    summary = {
        "images": len(images),
        "predicted": len(images) - len(unreadable),
        "unreadable": unreadable,
        "detections": len(results),
        "weights": str(onnx) if onnx is not None else weights,
        "model": kind,
        "score_threshold": used_threshold,
    }
    write_json(summary, out / "summary.json")
    print(
        f"{summary['predicted']} of {len(images)} images predicted, {len(results)} detections "
        f"-> {out / 'detections.json'}"
        + (f"; {len(unreadable)} unreadable: {', '.join(unreadable)}" if unreadable else "")
        + (f"; drawn in {out / 'drawn'}" if draw else "")
    )
    return summary


def size_batches(files: Sequence[Path], batch_size: int) -> list[list[int]]:
    """Indices of ``files`` in batches of images of one size (read from the file headers), in
    the order of the inputs within a size: see ``run_by_size``. A file whose header cannot be
    read goes in a batch of its own (loading it names the problem)."""
    by_size: dict[tuple[int, int] | int, list[int]] = {}
    for index, path in enumerate(files):
        try:
            with Image.open(path) as im:
                key: tuple[int, int] | int = im.size
        except Exception:  # unreadable: loading it reports why
            key = -index - 1
        by_size.setdefault(key, []).append(index)
    return [
        indices[start : start + batch_size]
        for indices in by_size.values()
        for start in range(0, len(indices), batch_size)
    ]


def run_by_size(
    run: Callable[[list[Tensor]], list[dict[str, Tensor]]], images: list[Tensor]
) -> list[dict[str, Tensor]]:
    """``run`` on each group of same-size images, results in the order of ``images``.

    A batch is padded to its largest image, and the padding changes the features, so the
    scores, of the smaller images near their borders: an image's detections would depend on
    the other images in its batch. In batches of one size each image gets the detections that
    torchvision's ``model.eval()([image])`` gives it.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    results: dict[int, dict[str, Tensor]] = {}
    for indices in groups.values():
        results.update(zip(indices, run([images[i] for i in indices])))
    return [results[i] for i in range(len(images))]


def _onnx_model(
    path: Path, score_threshold: float | None
) -> tuple[Categories, Callable[[list[Tensor]], list[dict[str, Tensor]]], float]:
    """(categories, detect function, score threshold) of an exported ONNX model. The graph's
    own threshold is the lowest it can give; a higher ``score_threshold`` filters after it."""

    session = open_session(path)
    meta = read_metadata(session, path)
    exported = float(meta["postprocess"]["score_threshold"])
    if score_threshold is not None and score_threshold < exported:
        raise ExportError(
            f"--score-thresh {score_threshold}: {path} was exported with score threshold "
            f"{exported}, in the graph; export again to keep lower scores"
        )
    threshold = exported if score_threshold is None else score_threshold
    by_label = {int(c["label"]): (int(c["id"]), str(c["name"])) for c in meta["categories"]}
    categories = Categories(int(meta["num_classes"]), by_label, f"the metadata of {path}")

    def run(images: list[Tensor]) -> list[dict[str, Tensor]]:
        detections = detect_onnx(session, images)
        return [{k: v[d["scores"] > threshold] for k, v in d.items()} for d in detections]

    return categories, run, threshold


def _coco_results(
    image_id: int, file_name: str, det: dict[str, Tensor], categories: Categories
) -> list[dict[str, Any]]:
    """One image's detections in COCO results format, with names (boxes in image pixels)."""
    xywh = box_convert(det["boxes"], "xyxy", "xywh").tolist()
    rows = []
    for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
        cat_id, name = categories.by_label[int(label)]
        rows.append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "category_id": cat_id,
                "category_name": name,
                "bbox": box,
                "score": float(score),
            }
        )
    return rows


def _unique(path: Path, taken: set[str]) -> Path:
    """``path``, or ``path`` with _1, _2, ... when an earlier image took that name."""
    candidate, n = path, 0
    while str(candidate) in taken:
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    taken.add(str(candidate))
    return candidate


__all__ = ["Categories", "find_categories", "find_images", "predict_images"]
