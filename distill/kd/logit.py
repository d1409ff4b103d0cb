"""Soft-label logit KD (``distill.logit``): per anchor, the student's class logits against the
teacher's at a temperature (``distill.losses.logits.soft_label_loss``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from distill.kd.base import Batch, KDTerm
from distill.losses.logits import (
    LOGIT_KINDS,
    anchors_inside,
    soft_label_loss,
    teacher_confidence,
)
from distill.models.retinanet import DenseOutputs

__all__ = ["ANCHOR_WEIGHTINGS", "LogitKD", "LogitKDConfig"]

ANCHOR_WEIGHTINGS = ("none", "teacher_max")


@dataclass(frozen=True)
class LogitKDConfig:
    kind: str = "bce"  # bce | kl
    weight: float = 0.0
    temperature: float = 4.0
    # per-anchor weighting: none | teacher_max (teacher's max class probability)
    anchor_weighting: str = "teacher_max"


@dataclass(frozen=True)
class LogitKD(KDTerm):
    """``soft_label_loss`` at ``cfg.temperature``, anchors weighted by the teacher's max class
    probability (``anchor_weighting: teacher_max``) or uniformly (``none``), and divided by the
    sum of those weights over the batch of every process (``Batch.weight_sum``). Anchors whose
    centre lies in the batch's padding (``anchors_inside``) have weight 0: a portrait image
    batched with a landscape one has the loss it has alone."""

    name: ClassVar[str] = "logit"
    config_class: ClassVar[type] = LogitKDConfig
    positive: ClassVar[tuple[str, ...]] = ("temperature",)
    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "kind": LOGIT_KINDS,
        "anchor_weighting": ANCHOR_WEIGHTINGS,
    }

    cfg: LogitKDConfig

    def weights(self) -> dict[str, float]:
        return {"logit": self.cfg.weight}

    def losses(
        self, student: DenseOutputs, teacher: DenseOutputs, batch: Batch
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        if cfg.anchor_weighting not in ANCHOR_WEIGHTINGS:
            raise ValueError(
                f"unknown distill.logit.anchor_weighting {cfg.anchor_weighting!r}; "
                f"expected one of {ANCHOR_WEIGHTINGS}"
            )
        # (N, A): 1 for the anchors inside their image, 0 for those in the batch's padding
        anchor_weights = anchors_inside(student.anchors, batch.image_sizes).float()
        if cfg.anchor_weighting == "teacher_max":
            anchor_weights = anchor_weights * teacher_confidence(teacher.cls_logits)
        loss = soft_label_loss(
            student.cls_logits,
            teacher.cls_logits,
            cfg.temperature,
            cfg.kind,
            anchor_weights,
            batch.weight_sum(anchor_weights),
        )
        return {"logit": loss}
