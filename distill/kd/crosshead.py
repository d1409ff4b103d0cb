"""CrossKD's cross-head path (Wang et al., CVPR 2024): the student's head features handed to the
teacher's head.

The student's head features from its first ``k`` tower convs are handed to the *teacher's*
head, which runs its remaining convs (from its conv ``j`` on) and its output convs on them. Those
cross-head predictions are pulled towards the teacher's own predictions (the losses are in
``distill.losses.crosskd``), while the student's head is left to the ground truth alone (the
paper's point: the two targets no longer pull one head two ways).

    held_s = the k-th student tower conv's output before its activation (k 0: the FPN
             feature), (N, C_s, H_l, W_l) per level; held_t the same of the teacher at j
    x = align_scale(mapper(held_s), channel stats of held_t)
    x = relu(x) if j > 0
    cross_cls, cross_box = teacher.cls_logits(teacher.conv[j:](x)), teacher.bbox_reg(...)

As the reference implementation (CrossKD's ``crosskd_retinanet.py``: ``forward_crosskd_single``
holds ``conv(x, activate=False)``, ``reuse_teacher_head`` aligns, rectifies and runs the rest).
``mapper`` is a learnable 1x1 conv where the student's head is narrower than the teacher's (the
authors' advice); ``align_scale`` is their per-channel re-standardisation, over each process's
own batch (as the reference, per GPU: unlike the other KD terms, CrossKD's value with 2
processes of batch B is not exactly that of 1 process of batch 2B).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetHead

__all__ = [
    "BRANCHES",
    "CrossHead",
    "align_scale",
    "channel_stats",
    "held_tower_outputs",
    "tower_depth",
    "tower_width",
]

BRANCHES = ("cls", "reg")


def _branches(head: RetinaNetHead) -> dict[str, Any]:
    """{"cls": RetinaNetClassificationHead, "reg": RetinaNetRegressionHead} of ``head``."""
    return {"cls": head.classification_head, "reg": head.regression_head}


def tower_depth(head: RetinaNetHead) -> int:
    """Number of 3x3 conv blocks in each branch of a torchvision RetinaNet head."""
    return len(head.classification_head.conv)


def tower_width(head: RetinaNetHead, layer: int) -> int:
    """Channels of the tower's feature after ``layer`` blocks (``layer`` 0: the head's input)."""
    branch = head.classification_head
    if layer == 0:
        first = branch.conv[0][0] if len(branch.conv) else branch.cls_logits
        return int(first.in_channels)
    return int(branch.conv[layer - 1][0].out_channels)


def _activation(block: nn.Module) -> nn.Module:
    """The final activation of a tower block (torchvision's ``Conv2dNormActivation``: conv,
    norm, ``ReLU(inplace=True)``); a ``ValueError`` if the block does not end with a ReLU (the
    cross head rectifies the aligned features with ``F.relu``, standing in for it)."""
    last = block[-1] if isinstance(block, nn.Sequential) and len(block) > 0 else None
    if not isinstance(last, nn.ReLU):
        raise ValueError(
            "CrossKD holds a tower block's output before its activation and needs blocks that "
            f"end with an nn.ReLU (conv, norm, ReLU), got {type(block).__name__} ending with "
            f"{type(last).__name__}"
        )
    return last


@contextmanager
def held_tower_outputs(head: RetinaNetHead, layer: int) -> Iterator[dict[str, list[Tensor]]]:
    """While inside, record each branch's tower conv ``layer``'s output before its activation
    (the input of the block's final ReLU), one per level, as the reference holds
    ``conv(x, activate=False)``.

    Yields ``{"cls": [...], "reg": [...]}``, filled by the head's forward with (N, C, H_l, W_l)
    tensors in level order (the head runs its tower once per level). The ReLU works in place,
    so a forward pre-hook records a clone of its input: it keeps the negative values and, with
    grad enabled, passes gradients back to the conv and norm that made it. ``layer`` 0 records
    nothing: the tower's input is the FPN feature itself. A ``ValueError`` if the block does
    not end with a ReLU.
    """
    held: dict[str, list[Tensor]] = {branch: [] for branch in BRANCHES}
    activations = {}  # all checked before any hook is in place
    if layer > 0:
        activations = {n: _activation(b.conv[layer - 1]) for n, b in _branches(head).items()}
    hooks = [
        activation.register_forward_pre_hook(
            lambda _m, args, r=held[name].append: r(args[0].clone())
        )
        for name, activation in activations.items()
    ]
    try:
        yield held
    finally:
        for hook in hooks:
            hook.remove()


def _correction(x: Tensor) -> int:
    """Bessel's correction as the reference's ``std()``, except where a channel has a single
    value (batch 1 and a 1x1 level, e.g. P7 of a 128-px image): its std is then 0, not NaN."""
    return 1 if x.numel() // x.shape[1] > 1 else 0


def channel_stats(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (2, C) float32: per-channel mean and (unbiased) std over N, H, W."""
    flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)  # (C, N*H*W)
    return torch.stack([flat.mean(dim=1), flat.std(dim=1, correction=_correction(x))])


def align_scale(s: Tensor, t_stats: Tensor, eps: float = 1e-6) -> Tensor:
    """CrossKD's alignment: standardise each channel of ``s`` over (N, H, W), then give it the
    teacher's per-channel mean and std.

    s: (N, C, H, W); t_stats: (2, C) from ``channel_stats`` of the teacher's feature
    returns (N, C, H, W): ``(s - mean_s) / (std_s + eps) * std_t + mean_t`` per channel
    """
    if t_stats.shape != (2, s.shape[1]):
        raise ValueError(f"teacher stats {tuple(t_stats.shape)} do not fit {tuple(s.shape)}")
    dims = (0, 2, 3)
    mean = s.mean(dim=dims, keepdim=True)
    std = s.std(dim=dims, keepdim=True, correction=_correction(s))
    t_mean, t_std = (v.to(s.dtype).reshape(1, -1, 1, 1) for v in t_stats)
    return (s - mean) / (std + eps) * t_std + t_mean


def _anchor_layout(x: Tensor, per_anchor: int) -> Tensor:
    """torchvision's head layout: (N, A_loc * P, H, W) -> (N, H * W * A_loc, P)."""
    n, _, h, w = x.shape
    x = x.view(n, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2)
    return x.reshape(n, -1, per_anchor)


class CrossHead(nn.Module):
    """The cross-head path: the student's held tower features through the teacher's head.

    Holds the learnable 1x1 ``mappers`` (one per branch, shared by the levels as the head's
    convs are; none when the widths agree). The frozen teacher head is kept as a plain
    attribute, not a submodule: it is no parameter of the trainable module, not in its state,
    and DDP does not sync it; gradients flow through it to the student.
    """

    teacher_head: RetinaNetHead

    def __init__(
        self,
        teacher_head: RetinaNetHead,
        student_channels: int,
        layer: int,
        teacher_layer: int,
        branches: Sequence[str] = BRANCHES,
    ) -> None:
        super().__init__()
        depth = tower_depth(teacher_head)
        if not 0 <= teacher_layer <= depth:
            raise ValueError(
                f"distill.crosskd.teacher_layer {teacher_layer} is outside the teacher head's "
                f"0..{depth} tower convs"
            )
        unknown = set(branches) - set(BRANCHES)
        if unknown or not branches:
            raise ValueError(f"CrossHead branches must be some of {BRANCHES}, got {branches}")
        # only the branches whose loss is on: a mapper without a gradient would stall DDP
        self.branches = tuple(b for b in BRANCHES if b in branches)
        self.layer, self.teacher_layer = layer, teacher_layer
        t_channels = tower_width(teacher_head, teacher_layer)
        self.mappers = nn.ModuleDict()
        if student_channels != t_channels:
            for branch in self.branches:
                self.mappers[branch] = nn.Conv2d(student_channels, t_channels, kernel_size=1)
        object.__setattr__(self, "teacher_head", teacher_head)

    def forward(
        self, held: dict[str, Sequence[Tensor]], teacher_stats: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """held: {"cls"|"reg": per level (N, C_s, H_l, W_l)}, the student's tower features
        (``held_tower_outputs``: conv ``layer``'s output before its ReLU; the FPN features for
        ``layer`` 0); teacher_stats: {"cls"|"reg": (L, 2, C_t)}, ``channel_stats`` of the
        teacher's features held the same way at ``teacher_layer``, per level.
        returns, for each of ``branches``, the cross-head predictions with anchors ordered as
        the detectors' own outputs: {"cls": (N, A, K) class logits, "reg": (N, A, 4) deltas}"""
        teacher = _branches(self.teacher_head)
        outputs = {}
        for name in self.branches:
            branch = teacher[name]
            predictor, per_anchor = (
                (branch.cls_logits, branch.num_classes) if name == "cls" else (branch.bbox_reg, 4)
            )
            per_level = []
            for level, feature in enumerate(held[name]):
                x = self.mappers[name](feature) if name in self.mappers else feature
                x = align_scale(x, teacher_stats[name][level])
                if self.teacher_layer > 0:
                    x = F.relu(x)
                for block in branch.conv[self.teacher_layer :]:
                    x = block(x)
                per_level.append(_anchor_layout(predictor(x), per_anchor))
            outputs[name] = torch.cat(per_level, dim=1)
        return outputs
