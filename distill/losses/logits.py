"""Head distillation: per-anchor soft labels and box regression toward the teacher.

Teacher and student share one anchor set, so anchor ``a`` of the student is anchor ``a`` of the
teacher and every loss here compares tensors of the same shape element by element.

Conventions shared by every loss in ``distill.losses``:

- computed in float32 with autocast switched off, whatever dtype the inputs arrive in, so they
  stay finite under fp16/bf16 mixed precision (logits of +-50 at any temperature);
- teacher tensors are detached: the teacher is a constant, it never receives a gradient;
- reduced with means over anchors (or positions), never sums, so the value does not depend on
  the batch size or the image size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss

__all__ = [
    "BOX_KINDS",
    "LOGIT_KINDS",
    "WEIGHT_EPS",
    "anchors_inside",
    "autocast_off",
    "box_distill_loss",
    "soft_label_loss",
    "teacher_confidence",
    "weighted_anchor_mean",
]

LOGIT_KINDS = ("bce", "kl")
BOX_KINDS = ("l1", "giou")
# Floor for the sum of anchor weights: all-zero weights give a loss of 0 instead of 0/0.
WEIGHT_EPS = 1e-6

# RetinaNet's own coder (torchvision builds it with these weights), so decoded boxes are the
# boxes the detector would output.
_BOX_CODER = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


def autocast_off(x: Tensor) -> torch.autocast:
    """Context that disables autocast on ``x``'s device, so a loss really runs in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def anchors_inside(
    anchors: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]] | None
) -> Tensor:
    """The anchors that lie in their image rather than in the batch's padding.

    anchors: per image (A, 4) xyxy in the padded batch's frame
    image_sizes: per image, its own (h, w) at the top left of the padded batch
        (``ImageList.image_sizes``), or None: every image fills the batch
    returns: (N, A) bool on the anchors' device, True where the anchor's centre lies inside its
    image (``cx < w`` and ``cy < h``): mmdetection's ``valid_flags``, which leave the others out
    of the targets and the normaliser. Every KD term that weights anchors multiplies its
    weights by it.
    """
    if image_sizes is not None and len(image_sizes) != len(anchors):
        raise ValueError(f"{len(image_sizes)} image sizes for {len(anchors)} images of anchors")
    inside = []
    for i, image_anchors in enumerate(anchors):
        if image_sizes is None:
            inside.append(image_anchors.new_ones(image_anchors.shape[0], dtype=torch.bool))
            continue
        h, w = image_sizes[i]  # Python numbers: no copy to the device, no sync
        cx = (image_anchors[:, 0] + image_anchors[:, 2]) / 2
        cy = (image_anchors[:, 1] + image_anchors[:, 3]) / 2
        inside.append((cx < w) & (cy < h))
    return torch.stack(inside)


def weighted_anchor_mean(
    per_anchor: Tensor, weights: Tensor | None = None, normaliser: Tensor | None = None
) -> Tensor:
    """Mean over anchors, optionally weighted.

    per_anchor: (N, A) loss per anchor, float32
    weights:    (N, A) non-negative anchor weights (treated as constants), or None
    normaliser: scalar to divide by instead of ``sum_{n,a} w[n,a]``: with several processes,
                the mean over processes of their local sums (mmdetection's reduced
                ``avg_factor``), so that the gradient, averaged by DDP, is the one of the
                whole batch on one process

    Without weights: ``sum_{n,a} l[n,a] / (N * A)``.
    With weights:    ``sum_{n,a} w[n,a] * l[n,a] / max(sum_{n,a} w[n,a], WEIGHT_EPS)``,
    one normaliser for the whole batch, so repeating a sample leaves the value unchanged and
    anchors with weight 0 do not contribute; all-zero weights give 0.
    """
    if weights is None:
        # mean() of an empty tensor is NaN; an empty batch contributes nothing instead.
        return per_anchor.mean() if per_anchor.numel() > 0 else per_anchor.sum()
    if weights.shape != per_anchor.shape:
        raise ValueError(
            f"anchor weights have shape {tuple(weights.shape)}, "
            f"expected {tuple(per_anchor.shape)} (N, A)"
        )
    w = weights.detach().float()
    total_weight = w.sum() if normaliser is None else normaliser.detach().float()
    return (per_anchor * w).sum() / total_weight.clamp_min(WEIGHT_EPS)


def teacher_confidence(teacher_logits: Tensor) -> Tensor:
    """The teacher's max class probability per anchor.

    teacher_logits: (N, A, K) sigmoid class logits -> (N, A) float32, detached:
    ``conf[n, a] = max_k sigmoid(t[n, a, k])`` (at temperature 1).
    """
    with autocast_off(teacher_logits):
        # sigmoid is monotonic: sigmoid of the max logit is the max probability, K times cheaper.
        return torch.sigmoid(teacher_logits.detach().float().amax(dim=-1))


def soft_label_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    kind: str = "bce",
    weights: Tensor | None = None,
    normaliser: Tensor | None = None,
) -> Tensor:
    """Distil the teacher's class scores at temperature T, anchor by anchor.

    student_logits, teacher_logits: (N, A, K) class logits, any float dtype
    weights: (N, A) per-anchor weights (e.g. ``teacher_confidence``) or None
    normaliser: what to divide by instead of ``sum(weights)`` (``weighted_anchor_mean``)
    returns: scalar float32

    ``kind="bce"`` (RetinaNet's per-class sigmoids): with q = sigmoid(s/T), p = sigmoid(t/T),
    per (anchor, class) the binary KL divergence

        l[n,a,k] = T^2 * [BCE(q, p) - H(p)] = T^2 * [p log(p/q) + (1-p) log((1-p)/(1-q))],

    which is 0 when s = t and has gradient ``dl/ds = T * (sigmoid(s/T) - sigmoid(t/T))``.
    Both terms are ``binary_cross_entropy_with_logits`` (log-sigmoids), finite for any logits.

    ``kind="kl"``: a softmax over the K classes plus an implicit background logit 0 (appended
    after dividing by T), i.e. over K+1 scores, with P = softmax([t/T, 0]), Q = softmax([s/T, 0]):

        l[n,a,k] = T^2 * P_k * (log P_k - log Q_k),  k = 1..K+1 (background included).

    Reduction (both kinds): sum over classes, then ``weighted_anchor_mean`` over anchors:
    ``loss = sum_{n,a} w[n,a] * sum_k l[n,a,k] / max(sum_{n,a} w[n,a], eps)``, or
    ``sum_{n,a,k} l[n,a,k] / (N * A)`` without weights. The T^2 factor keeps the gradient
    magnitude comparable across temperatures (Hinton et al. 2015).
    """
    if kind not in LOGIT_KINDS:
        raise ValueError(f"unknown logit KD kind {kind!r}; expected one of {LOGIT_KINDS}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must both be (N, A, K)"
        )
    with autocast_off(student_logits):
        s = student_logits.float() / temperature
        t = teacher_logits.detach().float() / temperature
        if kind == "bce":
            p = torch.sigmoid(t)
            cross = F.binary_cross_entropy_with_logits(s, p, reduction="none")
            entropy = F.binary_cross_entropy_with_logits(t, p, reduction="none")
            per_class = cross - entropy
        else:
            background = s.new_zeros((*s.shape[:-1], 1))
            log_q = F.log_softmax(torch.cat([s, background], dim=-1), dim=-1)
            log_p = F.log_softmax(torch.cat([t, background], dim=-1), dim=-1)
            per_class = F.kl_div(log_q, log_p, reduction="none", log_target=True)
        per_anchor = per_class.sum(dim=-1) * temperature**2  # (N, A, K[+1]) -> (N, A)
        return weighted_anchor_mean(per_anchor, weights, normaliser)


def box_distill_loss(
    student_deltas: Tensor,
    teacher_deltas: Tensor,
    anchors: list[Tensor] | Tensor,
    weights: Tensor,
    kind: str = "l1",
    normaliser: Tensor | None = None,
) -> Tensor:
    """Regress the student's boxes toward the teacher's, on the anchors selected by ``weights``.

    student_deltas, teacher_deltas: (N, A, 4) box deltas (dx, dy, dw, dh) w.r.t. the anchors
    anchors: list over images of (A, 4) xyxy anchors, or one (N, A, 4) tensor
    weights: (N, A) anchor weights, e.g. ``(teacher_confidence(t) >= 0.3).float()``
    normaliser: what to divide by instead of ``sum(weights)`` (``weighted_anchor_mean``)
    returns: scalar float32

    ``kind="l1"``:   ``l[n,a] = sum_{j=1..4} |s[n,a,j] - t[n,a,j]|`` on the raw deltas.
    ``kind="giou"``: decode both with RetinaNet's ``BoxCoder(weights=(1, 1, 1, 1))`` and
    ``l[n,a] = 1 - GIoU(box_s[n,a], box_t[n,a])`` (``torchvision.ops.generalized_box_iou_loss``).

    Reduction: ``loss = sum_{n,a} w[n,a] * l[n,a] / max(sum_{n,a} w[n,a], eps)``, so it is 0
    when no anchor is selected.
    """
    if kind not in BOX_KINDS:
        raise ValueError(f"unknown box KD kind {kind!r}; expected one of {BOX_KINDS}")
    if student_deltas.shape != teacher_deltas.shape or student_deltas.shape[-1:] != (4,):
        raise ValueError(
            f"student deltas {tuple(student_deltas.shape)} and teacher deltas "
            f"{tuple(teacher_deltas.shape)} must both be (N, A, 4)"
        )
    with autocast_off(student_deltas):
        s = student_deltas.float()
        t = teacher_deltas.detach().float()
        if kind == "l1":
            per_anchor = (s - t).abs().sum(dim=-1)  # (N, A, 4) -> (N, A)
        else:
            anchor_boxes = torch.stack(list(anchors)) if isinstance(anchors, list) else anchors
            anchor_boxes = anchor_boxes.detach().float().reshape(-1, 4)  # (N*A, 4)
            if anchor_boxes.shape[0] != s.shape[0] * s.shape[1]:
                raise ValueError(
                    f"{anchor_boxes.shape[0]} anchors for deltas of shape {tuple(s.shape)}"
                )
            boxes_s = _BOX_CODER.decode_single(s.reshape(-1, 4), anchor_boxes)  # (N*A, 4)
            boxes_t = _BOX_CODER.decode_single(t.reshape(-1, 4), anchor_boxes)
            per_anchor = generalized_box_iou_loss(boxes_s, boxes_t).reshape(s.shape[:2])
        return weighted_anchor_mean(per_anchor, weights, normaliser)
