"""``distill summary``: size, compute and CPU latency of the teacher and the student.

Numbers depend on the architectures only, so both models are built with random weights: the
summary works before any teacher is trained and without a network.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from distill.config import Config, resize_bounds
from distill.models.retinanet import dense_forward
from students import build_student
from teachers import build_teacher, teacher_weights_missing

log = logging.getLogger(__name__)

DEFAULT_NUM_CLASSES = 7  # the built-in shapes benchmark: 6 shapes + background
METRICS = ("params", "gflops", "latency_ms")


def summarize(cfg: Config, *, warmup: int = 2, iterations: int = 5) -> dict[str, Any]:
    """Params, GFLOPs and median CPU latency of teacher and student, and student / teacher.

    GFLOPs: backbone + FPN + head (no transform, no post-processing) on one
    square image of the side the shared resize gives a square (min of ``resize_bounds``),
    counted by FlopCounterMode (a multiply-add is 2 FLOPs).
    latency_ms: median wall time of that forward on the CPU at batch 1, after ``warmup`` runs.
    Returns {"teacher": {params, gflops, latency_ms}, "student": {...}, "ratio": {...},
    "image_size": int, "num_classes": int}. (The deployed graph's cost:
    ``distill.deploy.latency.summarize_deployed``.)
    """
    missing = teacher_weights_missing(cfg)
    if missing is not None:
        log.warning(
            "teacher weights %s do not exist yet (distill train-teacher writes them); "
            "the summary does not need them",
            missing,
        )
    num_classes, teacher, student = summary_models(cfg)
    size = min(resize_bounds(cfg.data))  # a square image is resized to this side
    result: dict[str, Any] = {"image_size": size, "num_classes": num_classes}
    for name, model in (("teacher", teacher), ("student", student)):
        result[name] = measure(model, size, warmup, iterations)
    result["ratio"] = {k: result["student"][k] / result["teacher"][k] for k in METRICS}
    return result


def summary_models(cfg: Config) -> tuple[int, RetinaNet, RetinaNet]:
    """(number of classes, teacher, student) of ``cfg``'s architectures, in eval mode, with
    random weights: weights change no number the summary reports, and not loading them avoids
    downloads."""
    num_classes = _num_classes(cfg)
    cfg = dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(cfg.teacher, weights=None, backbone_weights=None),
        student=dataclasses.replace(cfg.student, weights=None, backbone_weights=None),
    )
    # frozen=False: the same architecture, without build_teacher's random-weights warning.
    teacher = build_teacher(cfg, num_classes, frozen=False).eval()
    student = build_student(cfg, num_classes).eval()
    return num_classes, teacher, student


def measure(model: RetinaNet, size: int, warmup: int = 2, iterations: int = 5) -> dict[str, Any]:
    """{params, gflops, latency_ms} of ``model`` on one ``size`` x ``size`` image (see
    ``summarize``); the model is put in eval mode on the CPU for it."""
    model = model.eval().cpu()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": _gflops(model, size),
        "latency_ms": _latency_ms(model, size, warmup, iterations),
    }


def format_summary(result: dict[str, Any]) -> str:
    """A small aligned table of ``summarize``'s result."""
    rows = [
        ("", "params (M)", "GFLOPs", "CPU ms/img"),
        *(
            (
                name,
                f"{result[name]['params'] / 1e6:.2f}",
                f"{result[name]['gflops']:.2f}",
                f"{result[name]['latency_ms']:.1f}",
            )
            for name in ("teacher", "student")
        ),
        (
            "student/teacher",
            f"{result['ratio']['params']:.3f}",
            f"{result['ratio']['gflops']:.3f}",
            f"{result['ratio']['latency_ms']:.3f}",
        ),
    ]
    lines = align_rows(rows)
    size = result.get("image_size")
    note = f"batch 1, {size}x{size} input, backbone + FPN + head; latency: median on CPU"
    return "\n".join([*lines, note])


def align_rows(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]


def _num_classes(cfg: Config) -> int:
    """len(categories) + 1 from the training annotations, or DEFAULT_NUM_CLASSES without them."""
    path = Path(cfg.data.root) / cfg.data.train
    if not path.is_file():
        log.warning(
            "%s not found: assuming DEFAULT_NUM_CLASSES = %d (background included)",
            path,
            DEFAULT_NUM_CLASSES,
        )
        return DEFAULT_NUM_CLASSES
    with path.open() as f:
        categories = json.load(f).get("categories", [])
    return len(categories) + 1


def _probe(size: int) -> ImageList:
    return ImageList(torch.rand(1, 3, size, size), [(size, size)])


def _gflops(model: RetinaNet, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        dense_forward(model, _probe(size))
    return counter.get_total_flops() / 1e9


def _latency_ms(model: RetinaNet, size: int, warmup: int, iterations: int) -> float:
    images = _probe(size)
    with torch.inference_mode():
        return median_ms(lambda: dense_forward(model, images), warmup, iterations)


def median_ms(run: Callable[[], object], warmup: int, iterations: int) -> float:
    """Median wall time of ``run()`` in ms over ``iterations`` calls after ``warmup`` calls."""
    times = []
    for i in range(warmup + iterations):
        start = time.perf_counter()
        run()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))
