"""CrossKD (Wang et al., CVPR 2024; ``distill.crosskd``): the student's head features after its
first ``layer`` tower convs run through the teacher's head from its conv ``teacher_layer`` on,
and those cross-head predictions are distilled towards the teacher's.

Three places, one term: the teacher's forward gives the channel statistics of its tower conv
(``TowerStats``), the trainable module holds the student's tower conv output and runs the cross
head (``CrossKDModule``, ``distill.kd.crosshead``), and the two losses compare the
cross-head predictions with the teacher's (``distill.losses.crosskd``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet

from distill.config import Config, ConfigError
from distill.kd.base import Batch, KDTerm, TermModule
from distill.kd.crosshead import (
    BRANCHES,
    CrossHead,
    channel_stats,
    held_tower_outputs,
    tower_depth,
    tower_width,
)
from distill.losses.crosskd import crosskd_box_loss, kd_quality_focal_loss, match_anchors
from distill.models.retinanet import DenseOutputs

__all__ = ["CrossKD", "CrossKDConfig", "CrossKDModule", "TowerStats"]

# the cross head's branch -> the name of its predictions in the outputs' extras and of its loss
_OUTPUTS = {"cls": "crosskd/cls_logits", "reg": "crosskd/bbox_regression"}
_LOSSES = {"cls": "crosskd_cls", "reg": "crosskd_box"}


def _stats_key(branch: str, layer: int) -> str:
    """The teacher's ``extras`` key of a branch's tower statistics at ``layer``."""
    return f"crosskd/{branch}/{layer}"


@dataclass(frozen=True)
class CrossKDConfig:
    """CrossKD (Wang et al., CVPR 2024): the student's head features after its first ``layer``
    tower convs run through the teacher's head from its conv ``teacher_layer`` on, and those
    cross-head predictions are distilled towards the teacher's."""

    cls_weight: float = 0.0  # quality-focal KD of the cross-head classification
    box_weight: float = 0.0  # GIoU of the cross-head boxes, weighted by the teacher's score
    # student tower convs before the hand-over (0: the FPN features); null: one before the last
    # (student.head_convs - 1: CrossKD's reused_teacher_head_idx=3 of four-conv heads), filled in
    # when the config is read
    layer: int | None = None
    teacher_layer: int | None = None  # teacher tower convs skipped; null: the same as layer
    beta: float = 1.0  # exponent of the quality-focal weight |sigmoid(s) - sigmoid(t)|^beta


def default_layer(head_convs: int) -> int:
    """``distill.crosskd.layer`` when null: the student's tower conv before its last one (3 of
    four, CrossKD's ``reused_teacher_head_idx=3``), 0 for a head without tower convs."""
    return max(head_convs - 1, 0)


@dataclass(frozen=True)
class CrossKD(KDTerm):
    """Two weighted losses, ``crosskd_cls`` (``kd_quality_focal_loss``) and ``crosskd_box``
    (``crosskd_box_loss``), of the cross-head predictions vs the teacher's, without the anchors
    in the matcher's ignore zone, both divided by the batch's foreground anchors (floored at 1
    per image, averaged over processes; ``match_anchors``, one matcher pass, without the anchors
    whose centre lies in the batch's padding, outside the image's own size). A branch whose
    weight is 0 is not built: its mapper would get no gradient and stall DDP."""

    name: ClassVar[str] = "crosskd"
    config_class: ClassVar[type] = CrossKDConfig
    weight_keys: ClassVar[tuple[str, ...]] = ("cls_weight", "box_weight")
    non_negative: ClassVar[tuple[str, ...]] = ("layer", "teacher_layer", "beta")

    cfg: CrossKDConfig

    @classmethod
    def resolve(cls, section: Any, cfg: Config) -> Any:
        if section.layer is not None:
            return section
        return replace(section, layer=default_layer(cfg.student.head_convs))

    def weights(self) -> dict[str, float]:
        weights = {"crosskd_cls": self.cfg.cls_weight, "crosskd_box": self.cfg.box_weight}
        return {name: weight for name, weight in weights.items() if weight > 0}

    def weight_key(self, loss: str) -> str:
        key = {"crosskd_cls": "cls_weight", "crosskd_box": "box_weight"}[loss]
        return f"distill.{self.name}.{key}"

    @property
    def layer(self) -> int:
        """The student tower convs before the hand-over (``layer``; a config read by
        ``load_config`` has it filled in, ``CrossKD.resolve``)."""
        if self.cfg.layer is None:
            raise ValueError(
                "distill.crosskd.layer is null: fill it in (distill.config.resolve_defaults, "
                "as load_config does) before building CrossKD"
            )
        return self.cfg.layer

    @property
    def teacher_layer(self) -> int:
        """The teacher tower convs skipped (``teacher_layer``, or ``layer`` when null)."""
        layer = self.cfg.teacher_layer
        return self.layer if layer is None else layer

    def build(self, student: RetinaNet, teacher: RetinaNet, seed: int) -> CrossKDModule:
        layer, depth = self.layer, tower_depth(student.head)
        if layer > depth:
            raise ConfigError(
                f"distill.crosskd.layer {layer} is beyond the {depth} tower convs of the "
                f"student's head (student.head_convs)"
            )
        teacher_layer, depth = self.teacher_layer, tower_depth(teacher.head)
        if teacher_layer > depth:
            which = "teacher_layer" if self.cfg.teacher_layer is not None else "layer"
            raise ConfigError(
                f"distill.crosskd.{which} {teacher_layer} is beyond the {depth} tower convs of "
                "the teacher's head"
            )
        branches = [b for b in BRANCHES if _LOSSES[b] in self.weights()]
        width = tower_width(student.head, layer)
        return CrossKDModule(CrossHead(teacher.head, width, layer, teacher_layer, branches))

    def teacher_probes(self) -> tuple[TowerStats]:
        return (TowerStats(self.teacher_layer),)

    def losses(
        self, student: DenseOutputs, teacher: DenseOutputs, batch: Batch
    ) -> dict[str, Tensor]:
        weights = self.weights()
        wanted = [_OUTPUTS[b] for b in BRANCHES if _LOSSES[b] in weights]
        if any(key not in student.extras for key in wanted):
            raise ValueError(f"CrossKD needs the cross-head predictions {wanted} (student.extras)")
        boxes = [target["boxes"] for target in batch.targets]
        # scalar, (N, A); anchors in the batch's padding take no part (mmdet's valid flags)
        foreground, valid = match_anchors(student.anchors, boxes, batch.image_sizes)
        foreground = batch.mean(foreground)
        losses = {}
        if "crosskd_cls" in weights:
            losses["crosskd_cls"] = kd_quality_focal_loss(
                student.extras[_OUTPUTS["cls"]],
                teacher.cls_logits,
                self.cfg.beta,
                valid,
                foreground,
            )
        if "crosskd_box" in weights:
            losses["crosskd_box"] = crosskd_box_loss(
                student.extras[_OUTPUTS["reg"]],
                teacher.bbox_regression,
                student.anchors,
                teacher.cls_logits,
                valid,
                foreground,
            )
        return losses


@dataclass(frozen=True)
class TowerStats:
    """CrossKD's probe of the teacher's forward: per level, the channel statistics of each
    branch's tower conv ``layer``'s output before its activation (``held_tower_outputs``;
    ``layer`` 0: the FPN features), as ``extras["crosskd/<branch>/<layer>"]`` (L, 2, C_t).
    CrossKD aligns the student's features, held before the activation too, to them."""

    layer: int

    @contextmanager
    def watch(self, teacher: RetinaNet) -> Iterator[Callable[[DenseOutputs], dict[str, Tensor]]]:
        with held_tower_outputs(teacher.head, self.layer) as held:
            yield lambda out: self._stats(held, out)

    def _stats(self, held: dict[str, list[Tensor]], out: DenseOutputs) -> dict[str, Tensor]:
        stats = {}
        for branch in BRANCHES:
            features = held[branch] if self.layer > 0 else list(out.features.values())
            stats[_stats_key(branch, self.layer)] = torch.stack(
                [channel_stats(f) for f in features]
            )
        return stats


class CrossKDModule(TermModule):
    """CrossKD's part of the trainable module: the ``cross_head`` (its 1x1 mappers, then the
    frozen teacher head, which is not part of this module's parameters)."""

    def __init__(self, cross_head: CrossHead) -> None:
        super().__init__()
        self.cross_head = cross_head

    def watch(self, detector: RetinaNet) -> AbstractContextManager[dict[str, list[Tensor]]]:
        """Records the student's tower conv ``layer``'s output, before its ReLU, as its head
        runs (nothing for ``layer`` 0: the towers' input is the FPN features)."""
        return held_tower_outputs(detector.head, self.cross_head.layer)

    def forward(
        self, out: DenseOutputs, teacher: DenseOutputs | None, held: dict[str, list[Tensor]]
    ) -> None:
        """Adds to ``out.extras`` the cross-head predictions of the branches whose loss is on:
        ``"crosskd/cls_logits"`` (N, A, K) and ``"crosskd/bbox_regression"`` (N, A, 4).

        teacher: the teacher's outputs, with ``TowerStats``'s ``"crosskd/<branch>/<j>"``
        (L, 2, C_t) in their ``extras`` (j: the cross head's ``teacher_layer``)."""
        j = self.cross_head.teacher_layer
        keys = {branch: _stats_key(branch, j) for branch in BRANCHES}
        if teacher is None or any(key not in teacher.extras for key in keys.values()):
            raise ValueError(
                f"CrossKD's cross head needs the teacher's tower statistics {list(keys.values())}"
                " (teacher_forward given this run's config)"
            )
        if self.cross_head.layer == 0:  # the towers' input: the FPN features
            held = {branch: list(out.features.values()) for branch in BRANCHES}
        stats = {branch: teacher.extras[key] for branch, key in keys.items()}
        for branch, prediction in self.cross_head(held, stats).items():
            out.extras[_OUTPUTS[branch]] = prediction
