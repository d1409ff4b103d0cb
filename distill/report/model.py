"""What the report compares: the models (runs or teacher weights), the lineup, and the gain and
share of the gap that every table computes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools.cocoeval import COCOeval

from distill.config import Config

log = logging.getLogger(__name__)

SIZES = ("aps", "apm", "apl")


class ReportError(ValueError):
    """A run directory or argument the report cannot use; the message names it."""


@dataclass
class Model:
    """One column of the report: a run (or a teacher weights file) and what was measured."""

    name: str
    role: str  # "teacher" | "baseline" | "student"
    kind: str  # the architecture section it is built from: "teacher" | "student"
    cfg: Config
    metrics: dict[str, Any] | None  # its metrics.json; None: evaluated here
    run_dir: Path | None = None
    weights: str | None = None  # a file, or a torchvision weights name for the teacher
    evaluator: COCOeval | None = None  # filled by evaluate_models (None: no detections)
    evaluated: bool = False
    cost: dict[str, float] = field(default_factory=dict)  # params, gflops, latency_ms
    notes: list[str] = field(default_factory=list)

    @property
    def tb_dir(self) -> Path | None:
        """Its TensorBoard log folder, if it has event files."""
        tb = self.run_dir / "tb" if self.run_dir is not None else None
        return tb if tb is not None and any(tb.glob("**/events.out.tfevents.*")) else None


@dataclass
class Lineup:
    """Everything the report compares."""

    students: list[Model]
    baselines: list[Model]  # plain students; several: one per seed (``baseline_of``)
    teacher: Model | None
    sweeps: list[tuple[Path, list[dict[str, str]]]]  # (sweep dir, rows of its sweep.csv)
    notes: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[Model]:
        """Teacher, baselines, then the students: the order of every table and legend."""
        head = [self.teacher] if self.teacher is not None else []
        return [*head, *self.baselines, *self.students]

    @property
    def baseline(self) -> Model | None:
        """The baseline of the best student (``distilled``): the per-class order and the
        detections compare with it."""
        return self.baseline_of(self.distilled) if self.students else None

    def baseline_of(self, student: Model) -> Model | None:
        """The baseline a student's gain is measured against: the only one, or among several
        (one per seed) the one of the student's ``train.seed`` (None if there is none)."""
        if len(self.baselines) <= 1:
            return self.baselines[0] if self.baselines else None
        seed = student.cfg.train.seed
        return next((b for b in self.baselines if b.cfg.train.seed == seed), None)

    @property
    def distilled(self) -> Model:
        """The distilled student the per-class order and the detections follow: the best mAP."""
        return max(self.students, key=lambda m: metric(m, "map"))


def metric(model: Model, key: str, per_class: str | None = None) -> float:
    """A metric of ``model``, or the AP of class ``per_class``: nan when it has none, or when
    COCO says -1 (no ground truth of that size or class)."""
    value = (model.metrics or {}).get(key)
    if per_class is not None:
        value = value.get(per_class) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) and value >= 0 else float("nan")


def gain_and_gap(
    student: Model, baseline: Model | None, teacher: Model | None, key: str
) -> tuple[float, float]:
    """(student − baseline, share of the teacher − baseline gap closed) for metric ``key``;
    nan where a model is missing or the teacher is not ahead of the baseline."""
    if baseline is None:
        return float("nan"), float("nan")
    gain = metric(student, key) - metric(baseline, key)
    gap = metric(teacher, key) - metric(baseline, key) if teacher is not None else float("nan")
    return gain, (gain / gap if gap > 0 else float("nan"))
