"""Box KD (``distill.box``): the student's box regression pulled towards the teacher's on the
anchors the teacher is sure about (``distill.losses.logits.box_distill_loss``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from distill.config import BoxKDConfig, DistillConfig, register_choices
from distill.kd.base import Batch, KDTerm
from distill.losses.logits import BOX_KINDS, box_distill_loss, teacher_confidence
from distill.models.retinanet import DenseOutputs

__all__ = ["BoxKD"]

register_choices({"distill.box.kind": BOX_KINDS})


@dataclass(frozen=True)
class BoxKD(KDTerm):
    """``box_distill_loss`` on the anchors whose teacher max class probability is at least
    ``cfg.score_threshold`` (weight 1 there, 0 elsewhere)."""

    cfg: BoxKDConfig

    @classmethod
    def from_config(cls, cfg: DistillConfig) -> BoxKD | None:
        return cls(cfg.box) if cfg.box.weight > 0 else None

    def weights(self) -> dict[str, float]:
        return {"box": self.cfg.weight}

    def losses(
        self, student: DenseOutputs, teacher: DenseOutputs, batch: Batch
    ) -> dict[str, Tensor]:
        confidence = teacher_confidence(teacher.cls_logits)  # (N, A)
        selected = (confidence >= self.cfg.score_threshold).float()
        loss = box_distill_loss(
            student.bbox_regression,
            teacher.bbox_regression,
            student.anchors,
            selected,
            self.cfg.kind,
            batch.weight_sum(selected),
        )
        return {"box": loss}
