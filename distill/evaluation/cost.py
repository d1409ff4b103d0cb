"""``distill summary``: size, compute and CPU latency of the teacher and the student.

Numbers depend on the architectures only, so both models are built with random weights: the
summary works before any teacher is trained and without a network.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from distill.config import Config, resize_bounds
from distill.deploy.export import DeployedDetector, export_onnx
from distill.deploy.onnx_runtime import MissingExtraError, open_session, require_onnx
from distill.models.card import make_card
from distill.models.retinanet import dense_forward, set_postprocess
from distill.models.weights import save_state_dict_file
from students import build_student
from teachers import build_teacher, teacher_weights_missing

log = logging.getLogger(__name__)

DEFAULT_NUM_CLASSES = 7  # the built-in shapes benchmark: 6 shapes + background
METRICS = ("params", "gflops", "latency_ms")
DEPLOY_METRICS = ("pytorch_ms", "onnxruntime_ms", "weights_mb", "onnx_mb")


def summarize(
    cfg: Config, *, warmup: int = 2, iterations: int = 5, deploy: bool = False
) -> dict[str, Any]:
    """Params, GFLOPs and median CPU latency of teacher and student, and student / teacher.

    GFLOPs: backbone + FPN + head (no transform, no post-processing) on one
    square image of the side the shared resize gives a square (min of ``resize_bounds``),
    counted by FlopCounterMode (a multiply-add is 2 FLOPs).
    latency_ms: median wall time of that forward on the CPU at batch 1, after ``warmup`` runs.
    Returns {"teacher": {params, gflops, latency_ms}, "student": {...}, "ratio": {...},
    "image_size": int, "num_classes": int}.
    deploy: also export both models to ONNX and time the deployed graph (``deploy_latency``):
    each model gets "deploy" {pytorch_ms, onnxruntime_ms, weights_mb, onnx_mb, threads} and
    the ratio its ms and MB; without onnx/onnxruntime installed, a warning names the extra.
    """

    num_classes = _num_classes(cfg)
    missing = teacher_weights_missing(cfg)
    if missing is not None:
        log.warning(
            "teacher weights %s do not exist yet (distill train-teacher writes them); "
            "the summary does not need them",
            missing,
        )
    # Weights change no number reported here; not loading them avoids downloads.
    cfg = dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(cfg.teacher, weights=None, backbone_weights=None),
        student=dataclasses.replace(cfg.student, weights=None, backbone_weights=None),
    )
    # frozen=False: the same architecture, without build_teacher's random-weights warning.
    teacher = build_teacher(cfg, num_classes, frozen=False).eval()
    student = build_student(cfg, num_classes).eval()

    size = min(resize_bounds(cfg.data))  # a square image is resized to this side
    result: dict[str, Any] = {"image_size": size, "num_classes": num_classes}
    for name, model in (("teacher", teacher), ("student", student)):
        result[name] = measure(model, size, warmup, iterations)
    result["ratio"] = {k: result["student"][k] / result["teacher"][k] for k in METRICS}
    if deploy:
        _add_deploy(result, cfg, {"teacher": teacher, "student": student}, warmup, iterations)
    return result


def measure(model: RetinaNet, size: int, warmup: int = 2, iterations: int = 5) -> dict[str, Any]:
    """{params, gflops, latency_ms} of ``model`` on one ``size`` x ``size`` image (see
    ``summarize``); the model is put in eval mode on the CPU for it."""
    model = model.eval().cpu()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": _gflops(model, size),
        "latency_ms": _latency_ms(model, size, warmup, iterations),
    }


def _add_deploy(
    result: dict[str, Any],
    cfg: Config,
    models: dict[str, RetinaNet],
    warmup: int,
    iterations: int,
) -> None:

    try:
        require_onnx()
    except MissingExtraError as err:
        log.warning("no deployment latency: %s", err)
        return
    with tempfile.TemporaryDirectory(prefix="distill-summary-") as workdir:
        for name, model in models.items():
            set_postprocess(model, cfg.eval)
            card = make_card(cfg, name, result["num_classes"], [])
            result[name]["deploy"] = deploy_latency(
                model, card, result["image_size"], workdir, name, warmup, iterations
            )
    t, s = result["teacher"]["deploy"], result["student"]["deploy"]
    result["ratio"]["deploy"] = {k: s[k] / t[k] for k in DEPLOY_METRICS}


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
    lines = _align(rows)
    size = result.get("image_size")
    note = f"batch 1, {size}x{size} input, backbone + FPN + head; latency: median on CPU"
    if "deploy" not in result["student"]:
        return "\n".join([*lines, note])
    return "\n".join([*lines, note, "", format_deploy(result)])


def format_deploy(result: dict[str, Any]) -> str:
    """The deployment table of ``summarize(..., deploy=True)``."""
    rows: list[tuple[str, ...]] = [("", "PyTorch ms", "ONNX Runtime ms", "weights MB", "ONNX MB")]
    for name in ("teacher", "student"):
        d = result[name]["deploy"]
        rows.append((name, *(f"{d[k]:.1f}" for k in DEPLOY_METRICS)))
    rows.append(
        ("student/teacher", *(f"{result['ratio']['deploy'][k]:.3f}" for k in DEPLOY_METRICS))
    )
    size, threads = result["image_size"], result["student"]["deploy"]["threads"]
    note = (
        f"deployed graph (normalise, backbone + FPN + head, box decoding, NMS), CPU, batch 1, "
        f"{size}x{size}, {threads} thread{'s' * (threads != 1)}; median after warm-up; "
        "weights: the .pt state dict"
    )
    return "\n".join([*_align(rows), note])


def _align(rows: Sequence[Sequence[str]]) -> list[str]:
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
        return _median_ms(lambda: dense_forward(model, images), warmup, iterations)


def _median_ms(run: Callable[[], object], warmup: int, iterations: int) -> float:
    """Median wall time of ``run()`` in ms over ``iterations`` calls after ``warmup`` calls."""
    times = []
    for i in range(warmup + iterations):
        start = time.perf_counter()
        run()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def deploy_latency(
    detector: RetinaNet,
    card: dict[str, Any],
    size: int,
    workdir: str | os.PathLike[str],
    name: str,
    warmup: int = 2,
    iterations: int = 10,
) -> dict[str, Any]:
    """What deploying ``detector`` costs on this CPU, at batch 1 on a ``size`` square image.

    The model is saved to ``workdir/{name}.pt`` (plain state dict) and exported to
    ``workdir/{name}.onnx``; the same deployed graph (normalise, backbone + head, decoding,
    NMS) is timed in PyTorch eager and in ONNX Runtime, each with torch's thread count, as the
    median of ``iterations`` runs after ``warmup``. Returns {"pytorch_ms", "onnxruntime_ms",
    "weights_mb", "onnx_mb", "threads"}.
    """

    workdir = Path(workdir)
    weights, onnx_file = workdir / f"{name}.pt", workdir / f"{name}.onnx"
    save_state_dict_file(detector.state_dict(), weights)
    export_onnx(detector, onnx_file, card)
    threads = torch.get_num_threads()
    session = open_session(onnx_file, threads=threads, spinning=True)  # ORT's default
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    module = DeployedDetector(detector).eval()
    with torch.inference_mode():
        eager = _median_ms(lambda: module(image), warmup, iterations)
    feed = {"images": image.numpy()}
    runtime = _median_ms(lambda: session.run(None, feed), warmup, iterations)
    return {
        "pytorch_ms": eager,
        "onnxruntime_ms": runtime,
        "weights_mb": weights.stat().st_size / 1e6,
        "onnx_mb": onnx_file.stat().st_size / 1e6,
        "threads": threads,
    }
