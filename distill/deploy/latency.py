"""What deploying a model costs: the deployed graph (ONNX export, the same graph in PyTorch
eager and in ONNX Runtime) timed on this CPU, beside ``distill.evaluation.cost``'s summary."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection import RetinaNet

from distill.config import Config
from distill.deploy.export import DeployedDetector, export_onnx
from distill.deploy.onnx_runtime import MissingExtraError, open_session, require_onnx
from distill.evaluation import cost
from distill.evaluation.cost import align_rows, format_summary, median_ms, summary_models
from distill.models.card import make_card
from distill.models.retinanet import set_postprocess
from distill.models.weights import save_state_dict_file

log = logging.getLogger(__name__)

DEPLOY_METRICS = ("pytorch_ms", "onnxruntime_ms", "weights_mb", "onnx_mb")


def summarize_deployed(cfg: Config, *, warmup: int = 2, iterations: int = 5) -> dict[str, Any]:
    """``summarize`` and, for each model, the deployed graph's cost (``deploy_latency``) as
    "deploy" {pytorch_ms, onnxruntime_ms, weights_mb, onnx_mb, threads}, with the ratio of its
    ms and MB; without onnx/onnxruntime installed, a warning names the extra and the summary
    comes without it."""
    result = cost.summarize(
        cfg, warmup=warmup, iterations=iterations
    )  # by module: tests replace it
    try:
        require_onnx()
    except MissingExtraError as err:
        log.warning("no deployment latency: %s", err)
        return result
    _, teacher, student = summary_models(cfg)
    with tempfile.TemporaryDirectory(prefix="distill-summary-") as workdir:
        for name, model in (("teacher", teacher), ("student", student)):
            set_postprocess(model, cfg.eval)
            card = make_card(cfg, name, result["num_classes"], [])
            result[name]["deploy"] = deploy_latency(
                model, card, result["image_size"], workdir, name, warmup, iterations
            )
    t, s = result["teacher"]["deploy"], result["student"]["deploy"]
    result["ratio"]["deploy"] = {k: s[k] / t[k] for k in DEPLOY_METRICS}
    return result


def format_deployed(result: dict[str, Any]) -> str:
    """``format_summary``'s table, then the deployment table where the result has one."""
    if "deploy" not in result["student"]:
        return format_summary(result)
    return "\n".join([format_summary(result), "", format_deploy(result)])


def format_deploy(result: dict[str, Any]) -> str:
    """The deployment table of ``summarize_deployed``."""
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
    return "\n".join([*align_rows(rows), note])


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
        eager = median_ms(lambda: module(image), warmup, iterations)
    feed = {"images": image.numpy()}
    runtime = median_ms(lambda: session.run(None, feed), warmup, iterations)
    return {
        "pytorch_ms": eager,
        "onnxruntime_ms": runtime,
        "weights_mb": weights.stat().st_size / 1e6,
        "onnx_mb": onnx_file.stat().st_size / 1e6,
        "threads": threads,
    }
