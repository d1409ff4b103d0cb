"""Box KD (``distill.box``): the student's box regression pulled towards the teacher's on the
anchors the teacher is sure about (``distill.losses.logits.box_distill_loss``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from distill.kd.base import Batch, KDTerm
from distill.losses.logits import (
    BOX_KINDS,
    anchors_inside,
    box_distill_loss,
    teacher_confidence,
)
from distill.models.retinanet import DenseOutputs

__all__ = ["BoxKD", "BoxKDConfig"]


@dataclass(frozen=True)
class BoxKDConfig:
    kind: str = "l1"  # l1 | giou
    weight: float = 0.0
    # anchors whose teacher max class probability is at least this take part
    score_threshold: float = 0.3


@dataclass(frozen=True)
class BoxKD(KDTerm):
    """``box_distill_loss`` on the anchors whose teacher max class probability is at least
    ``cfg.score_threshold`` (weight 1 there, 0 elsewhere, and 0 in the batch's padding:
    ``anchors_inside``), divided by the number of those anchors over the batch of every
    process (``Batch.weight_sum``)."""

    name: ClassVar[str] = "box"
    config_class: ClassVar[type] = BoxKDConfig
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"kind": BOX_KINDS}

    cfg: BoxKDConfig

    def weights(self) -> dict[str, float]:
        return {"box": self.cfg.weight}

    def losses(
        self, student: DenseOutputs, teacher: DenseOutputs, batch: Batch
    ) -> dict[str, Tensor]:
        confidence = teacher_confidence(teacher.cls_logits)  # (N, A)
        inside = anchors_inside(student.anchors, batch.image_sizes)  # (N, A): not the padding
        selected = ((confidence >= self.cfg.score_threshold) & inside).float()
        loss = box_distill_loss(
            student.bbox_regression,
            teacher.bbox_regression,
            student.anchors,
            selected,
            self.cfg.kind,
            batch.weight_sum(selected),
        )
        return {"box": loss}
