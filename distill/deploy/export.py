"""Export a RetinaNet (student or teacher) to ONNX: the graph and its PyTorch twin.

``DeployedDetector`` is the deployed model as a PyTorch module: it takes a float batch
(N, 3, H, W) in [0, 1] already resized by the caller, normalises and pads it as torchvision's
transform does, runs backbone + FPN + head, decodes the boxes with the anchors and applies
per-class non-maximum suppression, all in tensors of the batch (no Python loop over images),
so that ``torch.onnx.export`` gives one graph with dynamic N, H and W. ``RawDetector`` stops
before decoding: class logits, box deltas and anchors, for runtimes that do their own NMS.

Non-maximum suppression is the custom op ``distill::non_max_suppression``, whose semantics are
ONNX's ``NonMaxSuppression``: eagerly it runs torchvision's ``batched_nms``, in the graph it
becomes the ONNX operator.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import _topk_min
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms

from distill.deploy.onnx_runtime import ExportError, check_export, open_session, require_onnx
from distill.deploy.rebuild import find_weights, load_from_card
from distill.fileio import replace_durably, temporary_beside
from distill.models.card import card_path

OPSET = 18  # NonMaxSuppression (10+) and TopK with a k input: any opset >= 11; ORT 1.17+ runs 18
SIZE_DIVISIBLE = 32  # torchvision's transform pads every batch to a multiple of this


# --------------------------------------------------------------------------------------------
# Non-maximum suppression: ONNX's operator, with an eager twin
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("distill::non_max_suppression", mutates_args=())
def non_max_suppression(
    boxes: Tensor,
    scores: Tensor,
    max_per_class: int,
    iou_threshold: float,
    score_threshold: float,
) -> Tensor:
    """ONNX ``NonMaxSuppression`` (center_point_box=0) computed with torchvision's NMS.

    boxes: (B, M, 4) xyxy; scores: (B, C, M). Per image and class, the boxes scoring above
    ``score_threshold`` go through NMS (a box is dropped when its IoU with a kept, higher scoring
    box of the same class exceeds ``iou_threshold``), at most ``max_per_class`` are kept.
    Returns (S, 3) int64 rows (image, class, box), by image, class, then decreasing score.
    """
    rows = []
    for b in range(boxes.shape[0]):
        classes, idx = torch.nonzero(scores[b] > score_threshold, as_tuple=True)
        s = scores[b, classes, idx]
        keep = batched_nms(boxes[b, idx], s, classes, iou_threshold)  # by decreasing score
        keep = keep[torch.sort(classes[keep], stable=True).indices]  # by class, then score
        kept_classes = classes[keep]
        # rank of each kept box within its class: position minus the class's first position
        first = torch.searchsorted(kept_classes, kept_classes)
        rank = torch.arange(len(keep), device=boxes.device) - first
        keep, kept_classes = keep[rank < max_per_class], kept_classes[rank < max_per_class]
        image = torch.full_like(kept_classes, b)
        rows.append(torch.stack([image, kept_classes, idx[keep]], dim=1))
    if not rows:
        return torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)
    return torch.cat(rows).to(torch.int64)


# --------------------------------------------------------------------------------------------
# The deployed graph
# --------------------------------------------------------------------------------------------


class RawDetector(nn.Module):
    """Normalise, pad, backbone + FPN + head and anchors of a torchvision RetinaNet.

    forward(images (N, 3, H, W) floats in [0, 1]) -> (cls_logits (N, A, K),
    bbox_regression (N, A, 4) deltas for torchvision's BoxCoder with weights (1, 1, 1, 1),
    anchors (A, 4) xyxy in the input's pixels). A counts the anchors of the input padded to a
    multiple of 32 (the anchors of the padding included, as in PyTorch).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, detector: RetinaNet) -> None:
        super().__init__()
        self.detector = detector
        transform = detector.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, 3, 1, 1))

    def dense(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """(cls_logits, bbox_regression, anchors, anchors per level) of ``images``."""
        height, width = images.shape[-2], images.shape[-1]
        x = (images - self.mean) / self.std
        # pad bottom and right with zeros after normalising, as torchvision's batch_images
        pad_h = (SIZE_DIVISIBLE - height % SIZE_DIVISIBLE) % SIZE_DIVISIBLE
        pad_w = (SIZE_DIVISIBLE - width % SIZE_DIVISIBLE) % SIZE_DIVISIBLE
        x = F.pad(x, (0, pad_w, 0, pad_h))
        features_per_level = list(self.detector.backbone(x).values())
        head_outputs = self.detector.head(features_per_level)  # (N, A, K), (N, A, 4)
        # one image entry: the anchors depend on the padded size only, the same for every image
        image_list = ImageList(x, [(height, width)])
        anchors = self.detector.anchor_generator(image_list, features_per_level)
        per_location = self.detector.anchor_generator.num_anchors_per_location()[0]
        per_level = [f.shape[-2] * f.shape[-1] * per_location for f in features_per_level]
        return head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors[0], per_level

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cls_logits, bbox_regression, anchors, _ = self.dense(images)
        return cls_logits, bbox_regression, anchors


class DeployedDetector(RawDetector):
    """``RawDetector`` followed by torchvision's RetinaNet post-processing, batched.

    forward(images (N, 3, H, W) floats in [0, 1]) -> (boxes (N, D, 4) xyxy in the input's
    pixels, scores (N, D), labels (N, D) int64 head class indices, num_detections (N,) int64).
    Image n's detections are its first ``num_detections[n]`` rows, by decreasing score; the
    rows after them are padding (boxes 0, score 0, label -1). D = min(detections_per_img,
    candidates). The detections are those of the RetinaNet's own eval forward on the same
    (unresized) images: per level the ``topk_candidates`` best (anchor, class) scores above
    ``score_thresh``, per-class NMS at ``nms_thresh``, the ``detections_per_img`` best; then
    the background class (label 0) is dropped, as ``distill`` evaluation does.
    """

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        det = self.detector
        cls_logits, bbox_regression, anchors, per_level = self.dense(images)
        num_images, num_classes = cls_logits.shape[0], cls_logits.shape[-1]

        boxes_per_level, scores_per_level, labels_per_level = [], [], []
        for logits, deltas, level_anchors in zip(
            cls_logits.split(per_level, dim=1),
            bbox_regression.split(per_level, dim=1),
            anchors.split(per_level),
        ):
            scores = torch.sigmoid(logits).flatten(1)  # (N, A_l * K)
            # torchvision keeps the top k of the scores above the threshold; the top k of all
            # scores, the ones below the threshold dropped later, are the same set
            k = _topk_min(scores, det.topk_candidates, 1)
            scores, idx = scores.topk(k, dim=1)  # (N, k)
            anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
            deltas = deltas.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))  # (N, k, 4)
            boxes = det.box_coder.decode_single(
                deltas.reshape(-1, 4), level_anchors[anchor_idx.reshape(-1)]
            ).reshape(num_images, -1, 4)
            boxes_per_level.append(_clip(boxes, images))
            scores_per_level.append(scores)
            labels_per_level.append(idx % num_classes)
        boxes = torch.cat(boxes_per_level, dim=1)  # (N, M, 4)
        scores = torch.cat(scores_per_level, dim=1)  # (N, M)
        labels = torch.cat(labels_per_level, dim=1)  # (N, M)

        # per-class NMS: each candidate scores only in its own class's row
        classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1)
        class_scores = torch.where(labels.unsqueeze(1) == classes, scores.unsqueeze(1), -1.0)
        selected = non_max_suppression(
            boxes, class_scores, det.detections_per_img, det.nms_thresh, det.score_thresh
        )  # (S, 3): image, class, candidate
        ones = torch.ones_like(selected[:, 0], dtype=scores.dtype)
        kept = torch.zeros_like(scores).index_put((selected[:, 0], selected[:, 2]), ones)
        # the best detections_per_img of the kept ones, then without the background class
        d = _topk_min(scores, det.detections_per_img, 1)
        top_scores, top = torch.where(kept > 0, scores, -1.0).topk(d, dim=1)  # (N, D)
        top_labels = labels.gather(1, top)
        valid = (top_scores >= 0) & (top_labels > 0)
        # move the dropped ones behind the kept ones, in order: keys (dropped, rank) are distinct
        rank = torch.ones_like(top).cumsum(dim=1)  # 1..D
        _, order = (rank + (~valid).long() * top.shape[1]).topk(d, dim=1, largest=False)
        top = top.gather(1, order)
        valid = valid.gather(1, order)
        top_boxes = boxes.gather(1, top.unsqueeze(-1).expand(-1, -1, 4))
        out_boxes = torch.where(valid.unsqueeze(-1), top_boxes, 0.0)
        out_scores = torch.where(valid, scores.gather(1, top), 0.0)
        out_labels = torch.where(valid, labels.gather(1, top), -1)
        return out_boxes, out_scores, out_labels, valid.sum(dim=1)


def _clip(boxes: Tensor, images: Tensor) -> Tensor:
    """Boxes (..., 4) xyxy clipped to the images' (unpadded) height and width.

    torchvision's ``clip_boxes_to_image`` takes the size as Python ints, which the ONNX tracer
    records as constants: the size is taken from the images' shape as a tensor here instead.
    """
    size = torch._shape_as_tensor(images)[-2:].to(boxes.dtype)  # (H, W)
    x = boxes[..., 0::2].clamp(min=0).minimum(size[1])
    y = boxes[..., 1::2].clamp(min=0).minimum(size[0])
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


# --------------------------------------------------------------------------------------------
# Writing the ONNX file
# --------------------------------------------------------------------------------------------

DETECTION_OUTPUTS = ("boxes", "scores", "labels", "num_detections")
RAW_OUTPUTS = ("cls_logits", "bbox_regression", "anchors")


@torch.onnx.symbolic_helper.parse_args("v", "v", "i", "f", "f")
def _nms_symbolic(
    g: Any, boxes: Any, scores: Any, max_per_class: int, iou: float, score: float
) -> Any:
    """``distill::non_max_suppression`` as ONNX's NonMaxSuppression (TorchScript exporter)."""
    return g.op(
        "NonMaxSuppression",
        boxes,
        scores,
        g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
        g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32)),
        g.op("Constant", value_t=torch.tensor([score], dtype=torch.float32)),
    )


torch.onnx.register_custom_op_symbolic("distill::non_max_suppression", _nms_symbolic, OPSET)


def export_onnx(
    detector: RetinaNet, out: str | os.PathLike[str], metadata: dict[str, Any], raw: bool = False
) -> Path:
    """Write ``detector`` (eval mode, detection settings set) as ONNX to ``out``.

    The graph is ``DeployedDetector`` (or ``RawDetector`` with ``raw``), traced by torch's
    TorchScript-based exporter at opset ``OPSET`` with dynamic batch, height and width.
    ``metadata`` (JSON-serialisable) goes into the model's metadata under the key "distill",
    with the graph's inputs, outputs and opset added. Returns the path written.

    Why not the dynamo exporter (torch's default since 2.9): torch.export cannot keep height
    and width dynamic through the padding to a multiple of 32 (its guards on the size of the
    P3-P7 grids, where a 128 px image has a 1x1 P7, specialise them), and on 2 CPU cores it took
    230 s for the smallest student against 11 s here; torchvision's detection code (anchors,
    box decoding) records shapes as graph operations for this exporter.
    """
    onnx = require_onnx()[0]
    out = Path(out)
    module = (RawDetector if raw else DeployedDetector)(detector).eval()
    outputs = RAW_OUTPUTS if raw else DETECTION_OUTPUTS
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}}
    if raw:
        dynamic |= {
            "cls_logits": {0: "batch", 1: "anchors"},
            "bbox_regression": {0: "batch", 1: "anchors"},
            "anchors": {0: "anchors"},
        }
    else:
        dynamic |= {name: {0: "batch", 1: "detections"} for name in outputs[:3]}
        dynamic["num_detections"] = {0: "batch"}
    # An example whose batch and grids are all larger than 1 (P7 2x2), so that nothing in the
    # trace can take a size of 1 for a constant, and small: tracing runs it.
    example = torch.rand(2, 3, 160, 192)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the legacy exporter's deprecation notice, and tracer notes on shape arithmetic that
        # is recorded as graph operations (checked by the ONNX Runtime comparison)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            module,
            (example,),
            str(out),
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=list(outputs),
            dynamic_axes=dynamic,
        )
    model = onnx.load(str(out))
    meta = {
        **metadata,
        "opset": OPSET,
        "graph": "raw" if raw else "detections",
        "input": {
            "name": "images",
            "shape": ["N", 3, "H", "W"],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "resize": "by the caller, before the graph: " + resize_rule(metadata),
        },
        "outputs": list(outputs),
    }
    entries = {"distill": json.dumps(meta), **_readable_metadata(meta)}
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    return out


def resize_rule(card: dict[str, Any]) -> str:
    """The resize a caller applies before the graph, in words, from the card's resize."""
    lo, hi = card["resize"]["min_size"], card["resize"]["max_size"]
    return (
        f"scale by min({lo} / shorter side, {hi} / longer side) (the shorter side becomes {lo} "
        f"px unless the longer side would exceed {hi} px), bilinear, as torchvision's "
        "GeneralizedRCNNTransform; boxes are in the resized image's pixels"
    )


def _readable_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """Flat entries beside the JSON, for tools that show metadata keys (Netron, onnx.load)."""
    names = {int(c["label"]): str(c["name"]) for c in meta.get("categories", [])}
    post = meta.get("postprocess", {})
    entries = {
        "opset": str(meta["opset"]),
        "graph": meta["graph"],
        "input": "images: float32 (N, 3, H, W), RGB in [0, 1]",
        "resize": meta["input"]["resize"],
        "class_names": json.dumps({str(k): v for k, v in sorted(names.items())}),
    }
    for key in ("score_threshold", "nms_threshold", "detections_per_image", "topk_candidates"):
        if key in post:
            entries[key] = str(post[key])
    return entries


def export_command(
    path: str | os.PathLike[str],
    model: str = "student",
    fmt: str = "onnx",
    out: str | os.PathLike[str] | None = None,
    raw: bool = False,
) -> Path:
    """``distill export``: the model of a run directory or weights file (with its card) to
    ONNX, then the ONNX Runtime check. The graph is written under a temporary name beside
    ``out`` and moved into place only once the check passes: a failure or a stop leaves the
    previous export (if any) as it was, and no temporary file. ExportError (naming the file)
    for a mismatch, an error of ONNX Runtime, or an ``out`` that is the weights, their card or
    a directory."""

    if fmt != "onnx":
        raise ValueError(f"--format {fmt}: unknown format; known: onnx")
    require_onnx()  # before building anything
    weights = find_weights(path, model)
    target = Path(out) if out is not None else weights.with_suffix(".onnx")
    for taken, what in ((weights, "the weights file"), (card_path(weights), "their card")):
        if target.resolve() == taken.resolve():
            raise ExportError(f"--out {target} is {what}: give another .onnx file path")
    if target.is_dir():
        raise ExportError(f"--out {target} is a directory: give a .onnx file path")
    detector, card, weights = load_from_card(weights, model)
    with temporary_beside(target) as tmp:
        export_onnx(detector, tmp, card, raw=raw)
        try:
            parity = check_export(open_session(tmp), detector, card, raw)
        except ExportError as err:
            raise ExportError(f"{target} not written: {err}") from None
        except Exception as err:  # ONNX Runtime raises its own types (Fail, InvalidArgument)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(
                f"{target} not written: ONNX Runtime failed on it: {reason}"
            ) from None
        replace_durably(tmp, target)
    kind = "class logits, box deltas and anchors" if raw else "detections after NMS"
    print(
        f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, opset {OPSET}, {kind}) from "
        f"{weights}\n{parity.summary()}\ninput: float32 (N, 3, H, W) RGB in [0, 1], resized by "
        f"the caller: {resize_rule(card)}"
    )
    return target
