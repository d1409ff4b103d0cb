"""CrossKD's losses (Wang et al., CVPR 2024): the cross-head predictions
(``distill.kd.crosshead``) pulled towards the teacher's own.

    valid[n, a] = 0 in the matcher's ignore zone (IoU 0.4-0.5), else 1
    avg = sum_n max(foreground anchors of image n, 1)
    crosskd_cls = sum valid * kd_quality_focal(cross_cls, teacher_cls) / avg
    crosskd_box = sum valid * conf_t * (1 - GIoU(decode(cross_box), decode(teacher_box))) / avg

As the reference implementation (CrossKD's ``crosskd_retinanet.py``:
``pred_mimicking_loss_single`` weights both terms by mmdet's ``label_weights`` and divides by
``avg_factor``).

One deliberate difference: the normaliser ``avg`` is averaged over processes (the CrossKD term,
``distill.kd.crosskd``) as this project's other anchor-weighted terms are, where the reference
divides each GPU's sum by its own ``avg_factor``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from distill.losses.logits import (
    anchors_inside,
    autocast_off,
    box_distill_loss,
    teacher_confidence,
    weighted_anchor_mean,
)

__all__ = [
    "crosskd_box_loss",
    "kd_quality_focal_loss",
    "match_anchors",
    "safe_pow",
]

# RetinaNet's matcher (torchvision builds it with these): IoU >= 0.5 foreground, < 0.4 background
_MATCHER = Matcher(0.5, 0.4, allow_low_quality_matches=True)


def match_anchors(
    anchors: Sequence[Tensor],
    boxes_per_image: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> tuple[Tensor, Tensor]:
    """RetinaNet's matcher, once per image: the CrossKD terms' normaliser and anchor mask.

    anchors: per image (A, 4) xyxy; boxes_per_image: per image (M_i, 4) xyxy, same frame
    image_sizes: per image, its own (h, w) in the padded batch (``ImageList.image_sizes``), or
        None (no padding). An anchor whose centre lies outside it, in the batch's padding
        (``anchors_inside``), is neither matched nor valid: mmdet gives such anchors (outside
        its ``valid_flags``) label weight 0 and assigns only the others
    returns ``(foreground, valid)`` on the anchors' device:
      foreground: float32 scalar, ``sum_n max(F_n, 1)`` with ``F_n`` image ``n``'s anchors
        matched to a box (IoU >= 0.5, or a box's best anchor): the reference's ``avg_factor``
        (mmdet's ``SamplingResult.num_pos`` is floored at 1 per image)
      valid: (N, A) float32, 0 for the anchors in the matcher's ignore zone (IoU in [0.4, 0.5),
        ``Matcher.BETWEEN_THRESHOLDS``) and those in the padding, 1 for the other foreground and
        background anchors: mmdet's ``label_weights`` of a RetinaHead. An image without boxes:
        all its anchors inside the image are valid.

    On a GPU the matcher's low-quality matches wait for the device once per image (a
    ``nonzero``), as torchvision's own RetinaNet loss does.
    """
    inside_per_image = anchors_inside(anchors, image_sizes)  # (N, A)
    foreground = anchors[0].new_zeros((), dtype=torch.float32)
    valid = []
    for image_anchors, boxes, inside in zip(anchors, boxes_per_image, inside_per_image):
        if boxes.numel() == 0:  # all background (the matcher refuses an image without boxes)
            foreground = foreground + 1.0
            valid.append(inside.float())
            continue
        iou = box_iou(boxes.float(), image_anchors.float())  # (M, A)
        iou = torch.where(inside, iou, -1.0)  # padding anchors: never matched, never a best
        matched = _MATCHER(iou)  # (A,) index or < 0
        foreground = foreground + (matched >= 0).sum().float().clamp_min(1.0)
        valid.append(((matched != Matcher.BETWEEN_THRESHOLDS) & inside).float())
    return foreground, torch.stack(valid)


def safe_pow(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent`` for ``x >= 0`` whose gradient is finite where ``x`` is 0.

    torch's derivative of ``x ** b`` at 0 is infinite for ``0 < b < 1``, and NaN after the chain
    rule through ``|.|`` (inf * 0): here it is 0 there, as it already is for ``b >= 1``. Values
    are torch's everywhere (``0 ** b`` = 0 for ``b > 0``, 1 for ``b = 0``).
    """
    if exponent == 0:
        return torch.ones_like(x)
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).pow(exponent), 0.0)


def kd_quality_focal_loss(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, valid: Tensor, normaliser: Tensor
) -> Tensor:
    """CrossKD's classification KD: quality focal loss with the teacher's probabilities as
    soft targets.

    student_logits, teacher_logits: (N, A, K) sigmoid class logits
    valid: (N, A) anchor weights, 0 to leave an anchor out (``match_anchors``'s ignore zone)
    normaliser: scalar, e.g. ``match_anchors``'s foreground count (floored at 1)
    returns ``sum_{n,a} valid[n,a] * sum_k BCE(s, p_t) * |sigmoid(s) - p_t|^beta / normaliser``,
    float32, with ``p_t = sigmoid(t)``; 0 where the student's probability equals the teacher's.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same (N, A, K) shape"
        )
    with autocast_off(student_logits):
        s = student_logits.float()
        p_t = torch.sigmoid(teacher_logits.detach().float())
        bce = F.binary_cross_entropy_with_logits(s, p_t, reduction="none")
        # safe_pow: a finite gradient where the probabilities are equal, for beta in (0, 1) too
        gap = (torch.sigmoid(s) - p_t).abs()
        per_anchor = (bce * safe_pow(gap, beta)).sum(dim=-1)  # (N, A)
        return weighted_anchor_mean(per_anchor, valid, normaliser.clamp_min(1.0))


def crosskd_box_loss(
    cross_deltas: Tensor,
    teacher_deltas: Tensor,
    anchors: list[Tensor] | Tensor,
    teacher_logits: Tensor,
    valid: Tensor,
    normaliser: Tensor,
) -> Tensor:
    """CrossKD's box KD:
    ``sum_{n,a} valid[n,a] * conf_t[n,a] * (1 - GIoU(box_s, box_t)) / normaliser``.

    cross_deltas, teacher_deltas: (N, A, 4) deltas, decoded on ``anchors`` with RetinaNet's
    coder; teacher_logits: (N, A, K), ``conf_t = max_k sigmoid(t)``; valid: (N, A), 0 to leave
    an anchor out (the reference zeroes ``conf_t`` where mmdet's label weight is 0);
    normaliser as ``kd_quality_focal_loss``. Returns a float32 scalar.
    """
    if valid.shape != teacher_logits.shape[:2]:
        raise ValueError(
            f"anchor mask {tuple(valid.shape)} does not fit logits {tuple(teacher_logits.shape)}"
        )
    weights = teacher_confidence(teacher_logits) * valid.detach().float()  # (N, A)
    return box_distill_loss(
        cross_deltas, teacher_deltas, anchors, weights, "giou", normaliser.clamp_min(1.0)
    )
