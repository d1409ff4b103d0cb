"""Running an exported model with ONNX Runtime: sessions, metadata, and the parity check.

    session = open_session("student.onnx")
    meta = read_metadata(session)                # the card, opset, input and outputs
    detections = run_detections(session, batch)  # per image {"boxes", "scores", "labels"}

``check_export`` is what ``distill export`` runs after writing: ONNX Runtime against PyTorch
on images of two sizes in batches of 1 and 3.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet

from distill.models.retinanet import dense_forward, eval_mode


class ExportError(RuntimeError):
    """An export that cannot be made or does not match PyTorch; the message says why."""


class MissingExtraError(ImportError):
    """onnx / onnxruntime are not installed; the message names the extra that installs them."""


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or a MissingExtraError naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise MissingExtraError(
            f"ONNX export needs the packages onnx and onnxruntime ({err.name} is missing): "
            "install the 'export' extra, pip install -e '.[export]'"
        ) from None
    return onnx, onnxruntime


def native_sizes(card: dict[str, Any]) -> list[tuple[int, int]]:
    """Two (H, W) that the card's resize leaves unchanged (scale 1): a square and a wider one."""
    lo, hi = card["resize"]["min_size"], card["resize"]["max_size"]
    if hi > lo:
        return [(lo, lo), (lo, min(hi, lo + lo // 4))]
    return [(lo, lo), (lo - lo // 4, lo)]  # the longer side is lo = hi: scale 1


# The tolerances of the parity check (issue: raw within 1e-4; boxes 1e-2 px, scores 1e-4).
RAW_TOL = 1e-4
BOX_TOL = 1e-2
SCORE_TOL = 1e-4


def open_session(
    path: str | os.PathLike[str], threads: int | None = None, spinning: bool = False
) -> Any:
    """An ONNX Runtime CPU session of ``path`` (``threads``: intra-op threads, None: ORT's).

    spinning: ORT's default, threads busy-wait between operators: lowest latency, but on a
    shared CPU the spinning burns the cores other work needs, so it is off unless timed.
    """
    ort = require_onnx()[1]
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own types for a file that is not a model
        raise ExportError(f"{path}: ONNX Runtime cannot load it ({err})") from None


def read_metadata(session: Any, path: str | os.PathLike[str] = "this ONNX model") -> dict[str, Any]:
    """The "distill" metadata of an exported model (the card plus opset, input, outputs);
    errors name ``path``."""
    meta = session.get_modelmeta().custom_metadata_map
    if "distill" not in meta:
        raise ExportError(f"{path} was not exported by distill (no 'distill' metadata)")
    try:
        result = json.loads(meta["distill"])
    except ValueError as err:
        raise ExportError(f"{path}: its 'distill' metadata is not JSON: {err}") from None
    if not isinstance(result, dict):
        raise ExportError(f"{path}: its 'distill' metadata is not a JSON object")
    return result


def run_detections(session: Any, images: Tensor) -> list[dict[str, Tensor]]:
    """Detections of a detections graph on ``images`` (N, 3, H, W) in [0, 1], per image
    {"boxes" (D, 4) xyxy in the input's pixels, "scores" (D,), "labels" (D,)}."""
    boxes, scores, labels, counts = session.run(None, {"images": images.numpy()})
    return [
        {
            "boxes": torch.from_numpy(boxes[i, :n]),
            "scores": torch.from_numpy(scores[i, :n]),
            "labels": torch.from_numpy(labels[i, :n]),
        }
        for i, n in enumerate(counts.tolist())
    ]


@dataclass
class Parity:
    """Largest differences between ONNX Runtime and PyTorch over the checked batches."""

    batches: list[str] = field(default_factory=list)  # "3x3x64x64", ...
    raw: dict[str, float] = field(default_factory=dict)  # output -> max abs difference
    box: float = 0.0  # px, over matched detections
    score: float = 0.0
    detections: int = 0  # compared detections (PyTorch's count)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = f"ONNX Runtime vs PyTorch on {len(self.batches)} batches ({', '.join(self.batches)})"
        if self.raw:
            parts = ", ".join(f"{k} {v:.2e}" for k, v in self.raw.items())
            return f"{head}: largest |difference| {parts} (tolerance {RAW_TOL:g})"
        return (
            f"{head}: {self.detections} detections, same count per image: "
            f"{'no' if any('count' in p for p in self.problems) else 'yes'}; largest "
            f"|difference| box {self.box:.2e} px (tolerance {BOX_TOL:g}), score "
            f"{self.score:.2e} (tolerance {SCORE_TOL:g})"
        )


def check_export(
    session: Any, detector: RetinaNet, card: dict[str, Any], raw: bool, seed: int = 0
) -> Parity:
    """Compare ONNX Runtime with PyTorch on random images of ``native_sizes(card)`` (sizes that
    the card's resize leaves as they are), in batches of 1 and 3.

    PyTorch is torchvision's own RetinaNet: its eval forward for detections (label 0, the
    background column, dropped as distill's evaluation does), the transform and dense forward
    for raw outputs. Raises ExportError, with the largest differences, on a mismatch.
    """
    generator = torch.Generator().manual_seed(seed)
    parity = Parity()
    for height, width in native_sizes(card):
        for batch in (1, 3):
            images = torch.rand(batch, 3, height, width, generator=generator)
            parity.batches.append(f"{batch}x3x{height}x{width}")
            if raw:
                _compare_raw(session, detector, images, parity)
            else:
                _compare_detections(session, detector, images, parity)
    bad = [f"{k} {v:.2e}" for k, v in parity.raw.items() if not v <= RAW_TOL]
    if bad:
        parity.problems.append(f"raw outputs differ by more than {RAW_TOL:g}: {', '.join(bad)}")
    if parity.problems:
        raise ExportError(
            "the ONNX model does not match PyTorch: " + "; ".join(parity.problems[:5])
        )
    return parity


def _compare_raw(session: Any, detector: RetinaNet, images: Tensor, parity: Parity) -> None:
    got = session.run(None, {"images": images.numpy()})
    with torch.no_grad(), eval_mode(detector):
        image_list, _ = detector.transform(list(images))
        dense = dense_forward(detector, image_list)
    want = (dense.cls_logits, dense.bbox_regression, dense.anchors[0])
    for name, g, w in zip(("cls_logits", "bbox_regression", "anchors"), got, want):
        if tuple(g.shape) != tuple(w.shape):
            parity.problems.append(f"{name}: shape {tuple(g.shape)}, PyTorch {tuple(w.shape)}")
            continue
        diff = float(np.abs(g - w.numpy()).max()) if g.size else 0.0
        parity.raw[name] = max(parity.raw.get(name, 0.0), diff)


def _compare_detections(session: Any, detector: RetinaNet, images: Tensor, parity: Parity) -> None:
    got = run_detections(session, images)
    with torch.no_grad(), eval_mode(detector):
        want = detector(list(images))
    for i, (g, w) in enumerate(zip(got, want)):
        keep = w["labels"] > 0
        w = {k: v[keep] for k, v in w.items()}
        parity.detections += len(w["scores"])
        if len(g["scores"]) != len(w["scores"]):
            parity.problems.append(
                f"image {i} of {tuple(images.shape)}: {len(g['scores'])} detections, "
                f"PyTorch {len(w['scores'])} (count)"
            )
            continue
        box, score, unmatched = match_detections(g, w)
        parity.box, parity.score = max(parity.box, box), max(parity.score, score)
        if unmatched:
            parity.problems.append(
                f"image {i} of {tuple(images.shape)}: {unmatched} detections have no PyTorch "
                f"twin (same label, box within {BOX_TOL:g} px, score within {SCORE_TOL:g})"
            )


def match_detections(got: dict[str, Tensor], want: dict[str, Tensor]) -> tuple[float, float, int]:
    """(largest box difference in px, largest score difference, unmatched count) when each of
    ``got``'s detections is paired with a distinct one of ``want`` with the same label.

    Detections come by decreasing score, but equal scores (flat image regions, padding) may
    come in either order, so each is paired with the closest unpaired twin rather than by
    position; a pair further apart than the tolerances counts as unmatched.
    """
    free = torch.ones(len(want["scores"]), dtype=torch.bool)
    box_max = score_max = 0.0
    unmatched = 0
    for j in range(len(got["scores"])):
        same = free & (want["labels"] == got["labels"][j])
        if not same.any():
            unmatched += 1
            continue
        box = (want["boxes"] - got["boxes"][j]).abs().amax(dim=1)
        score = (want["scores"] - got["scores"][j]).abs()
        cost = torch.where(same, box / BOX_TOL + score / SCORE_TOL, torch.inf)
        k = int(cost.argmin())
        free[k] = False
        box_max, score_max = max(box_max, float(box[k])), max(score_max, float(score[k]))
        if not (box[k] <= BOX_TOL and score[k] <= SCORE_TOL):
            unmatched += 1
    return box_max, score_max, unmatched


def detect_onnx(session: Any, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """Detections of an exported detections graph on images (3, H, W) in [0, 1] of any size,
    in each image's own pixels: what ``distill predict`` gets from PyTorch.

    Each image is resized as the model's metadata says (torchvision's transform, the resize
    that PyTorch applies before the model) and run at batch 1; the boxes are scaled back with
    torchvision's ``resize_boxes``.
    """
    from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

    meta = read_metadata(session)
    if meta.get("graph") != "detections":
        raise ExportError("this ONNX model is a --raw export: it has no detections to predict")
    resize = meta["resize"]
    transform = GeneralizedRCNNTransform(resize["min_size"], resize["max_size"], [0.0], [1.0])
    transform.eval()
    results = []
    for image in images:
        resized, _ = transform.resize(image)
        det = run_detections(session, resized.unsqueeze(0).contiguous())[0]
        det["boxes"] = resize_boxes(det["boxes"], resized.shape[-2:], image.shape[-2:])
        results.append(det)
    return results
