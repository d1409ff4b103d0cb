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
its boxes under ``DIR/drawn/``. An image that cannot be read or predicted is named with the
reason in a warning and in ``DIR/summary.json``, and the others are still predicted; both files
are written while the images run (``predict_images``). ``distill predict`` exits non-zero only
when no image could be predicted.

Categories (ids and names) come from the weights' card, else the config's annotation file
(``data.val``), else torchvision's COCO category names for torchvision's weights.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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
from distill.device import inference_accelerator
from distill.evaluation.draw import draw_boxes
from distill.evaluation.evaluate import detect, load_detector
from distill.fileio import write_json
from distill.models.card import CardError, read_card
from distill.models.provenance import is_torchvision_name, torchvision_categories
from distill.models.retinanet import build_transform

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SAVE_EVERY_S = 30.0  # detections.json and summary.json are rewritten this often while running


@dataclass(frozen=True)
class Categories:
    """The model's output labels as dataset categories."""

    num_classes: int  # classifier outputs, background included
    by_label: dict[int, tuple[int, str]]  # label -> (category id, name)
    source: str  # where they come from, for the log


def find_images(inputs: Sequence[Path], out: Path | None = None) -> list[tuple[Path, str]]:
    """(path, file_name) of every image: a file as given, a folder's JPEG / PNG files
    (recursively, sorted), each file once (a file given twice, or under two given folders, is
    predicted once). ``file_name`` is the path relative to its folder (a file: its name); when
    two files get the same name (``a/x.jpg`` and ``b/x.jpg`` from folders ``a`` and ``b``),
    each of them is named by its path as given instead (``a/x.jpg``, ``b/x.jpg``), so names
    stay unique. Files in ``out`` (the output folder, e.g. inside an input folder) are left out:
    drawn images are not inputs. A missing input, a folder without images or ``out`` being an
    input folder is an error naming it."""
    skip = out.resolve() if out is not None else None
    found: list[tuple[Path, str]] = []
    for item in inputs:
        if item.is_file():
            found.append((item, item.name))
        elif item.is_dir():
            if skip is not None and item.resolve() == skip:
                raise FileExistsError(
                    f"--out {out} is the input folder {item}: give another folder for the "
                    "outputs (drawn images would mix with the inputs)"
                )
            files = sorted(
                p
                for p in item.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and (skip is None or not p.resolve().is_relative_to(skip))
            )
            if not files:
                raise FileNotFoundError(f"{item}: no JPEG or PNG images in this folder")
            found.extend((p, p.relative_to(item).as_posix()) for p in files)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    seen: set[Path] = set()
    unique = []
    for path, name in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append((path, name))
    # shared names: the path as given; (rarer) one still shared: the absolute path, unique
    for rename in (Path.as_posix, lambda path: path.resolve().as_posix()):
        counts = Counter(name for _, name in unique)
        unique = [(path, rename(path) if counts[name] > 1 else name) for path, name in unique]
    return unique


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


class PredictError(ValueError):
    """``distill predict`` cannot run as asked (e.g. an output folder it cannot write)."""


class ImageFiles(Dataset[tuple[Tensor | None, dict[str, Any]]]):
    """Image files as (image (3, H, W) float in [0, 1] or None, {"index", "error"})."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, dict[str, Any]]:
        try:
            return load_image(self.files[index]), {"index": index, "error": None}
        except Exception as err:  # any file: named in the summary, the others go on
            return None, {"index": index, "error": _reason(err)}


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

    An image that fails, to be read or to be predicted (e.g. a 10 x 2000 banner that the
    resize makes 0 pixels tall), is named with the reason in the summary's ``failed`` and the
    others go on: a batch that fails is run again one image at a time, so that only the bad
    image is lost. ``detections.json`` and ``summary.json`` are written (whole, atomically)
    every ``SAVE_EVERY_S`` seconds while the images run, with ``"complete": false``, and at
    the end: a run stopped midway keeps what it predicted. ``out`` is checked before the model
    is built and written before the first image runs: a folder that cannot be written fails
    before the compute.
    Returns the summary also written to ``out/summary.json``: images, predicted, failed
    ([{"file", "file_name", "reason"}]), detections, complete.
    """

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    _check_writable(out)
    images = find_images(inputs, out)  # before any model is built: a typo fails at once
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
    head = {
        "weights": str(onnx) if onnx is not None else weights,
        "model": kind,
        "score_threshold": used_threshold,
    }
    saver = _Saver(out, images, head)
    saver.save(complete=False)  # the folder is writable before the first image runs

    loader = DataLoader(
        ImageFiles([path for path, _ in images]),
        batch_sampler=size_batches([path for path, _ in images], batch_size),
        num_workers=cfg.data.num_workers,
        collate_fn=_keep_all,
    )
    known = torch.tensor(sorted(categories.by_label))
    label_names = {label: name for label, (_, name) in categories.by_label.items()}
    drawn_names: set[str] = set()

    def finish(index: int, image: Tensor, det: dict[str, Tensor]) -> None:
        """One image's rows (and drawing); an error here loses this image only."""
        name = images[index][1]
        keep = torch.isin(det["labels"], known)  # as distill eval: no unused COCO ids
        det = {k: v[keep] for k, v in det.items()}
        rows = _coco_results(index + 1, name, det, categories)
        if draw:
            canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
            picture = draw_boxes(canvas, det, label_names, draw_threshold)
            target = _unique(_drawn_path(out, name), drawn_names)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture.permute(1, 2, 0).numpy()).save(target)
        saver.rows[index] = rows

    for batch in tqdm(loader, desc="predict", unit="batch", file=sys.stderr):
        readable = [(image, info["index"]) for image, info in batch if image is not None]
        for _, info in batch:
            if info["error"] is not None:
                saver.fail(info["index"], info["error"])
        if readable:
            image_of = {index: image for image, index in readable}
            for index, outcome in _run_each(run, readable):
                if isinstance(outcome, Exception):
                    saver.fail(index, _reason(outcome))
                    continue
                try:
                    finish(index, image_of[index], outcome)
                except Exception as err:  # e.g. a drawing that cannot be written
                    saver.fail(index, _reason(err))
        saver.save(complete=False, every=SAVE_EVERY_S)
    summary = saver.save(complete=True)
    failed = summary["failed"]
    print(
        f"{summary['predicted']} of {len(images)} images predicted, {summary['detections']} "
        f"detections -> {out / 'detections.json'}"
        + (f"; {len(failed)} failed (reasons in {out / 'summary.json'}): " if failed else "")
        + ", ".join(f["file"] for f in failed)
        + (f"; drawn in {out / 'drawn'}" if draw else "")
    )
    return summary


def _run_each(
    run: Callable[[list[Tensor]], list[dict[str, Tensor]]], images: list[tuple[Tensor, int]]
) -> list[tuple[int, dict[str, Tensor] | Exception]]:
    """(index, detections or the error) of each image: ``run_by_size`` on all of them, and if
    that fails, on each image alone, so that one image that cannot run loses only itself."""
    try:
        detections = run_by_size(run, [image for image, _ in images])
        return [(index, det) for (_, index), det in zip(images, detections)]
    except Exception as err:
        if len(images) == 1:
            return [(images[0][1], err)]
    outcomes: list[tuple[int, dict[str, Tensor] | Exception]] = []
    for image, index in images:
        try:
            outcomes.append((index, run([image])[0]))
        except Exception as err:
            outcomes.append((index, err))
    return outcomes


class _Saver:
    """The rows and failures of ``predict_images`` so far, and their files in ``out``."""

    def __init__(self, out: Path, images: list[tuple[Path, str]], head: dict[str, Any]) -> None:
        self.out, self.images, self.head = out, images, head
        self.rows: dict[int, list[dict[str, Any]]] = {}  # image index -> its COCO rows
        self.failed: dict[int, str] = {}  # image index -> why it was not predicted
        self.saved_at = -math.inf

    def fail(self, index: int, reason: str) -> None:
        log.warning("skipped %s: %s", self.images[index][0], reason)
        self.failed[index] = reason

    def save(self, complete: bool, every: float = 0.0) -> dict[str, Any]:
        """Write detections.json (rows in input order) and summary.json, unless the last
        write was less than ``every`` seconds ago; returns the summary."""
        results = [row for index in sorted(self.rows) for row in self.rows[index]]
        summary = {
            "images": len(self.images),
            "predicted": len(self.rows),
            "failed": [
                {"file": str(self.images[i][0]), "file_name": self.images[i][1], "reason": why}
                for i, why in sorted(self.failed.items())
            ],
            "detections": len(results),
            "complete": complete,
            **self.head,
        }
        if complete or time.monotonic() - self.saved_at >= every:
            try:
                write_json(results, self.out / "detections.json")
                write_json(summary, self.out / "summary.json")
            except OSError as err:
                raise PredictError(f"--out {self.out}: cannot write there: {err}") from None
            self.saved_at = time.monotonic()
        return summary


def _check_writable(out: Path) -> None:
    """Raise ``PredictError`` if ``out`` cannot be made and written (checked without making
    it: an error found later, before the first image, also leaves no folder behind)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PredictError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PredictError(f"--out {out}: {existing} is not writable")


def _reason(err: Exception) -> str:
    """An error as one line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _drawn_path(out: Path, name: str) -> Path:
    """Where the drawing of the image named ``name`` goes: ``out/drawn/<name>.png``, with
    the parts of ``name`` that would leave that folder (a root, ``..``) dropped."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".", "..")]
    return (out / "drawn").joinpath(*parts).with_suffix(".png")


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


__all__ = ["Categories", "PredictError", "find_categories", "find_images", "predict_images"]
