"""``distill report``: what distillation changed, as one self-contained HTML page.

    distill report RUN_DIR... [--teacher RUN_DIR_OR_WEIGHTS] [--baseline RUN_DIR...] --out DIR

The runs are the students (a sweep directory adds its points, and its ``baseline`` point becomes
a baseline); the baselines are ``--baseline``, else the runs whose KD weights are all 0 (one per
seed); the teacher is ``--teacher``, else the students' ``teacher.weights``. With several
baselines, each student is compared with the one of its own ``train.seed``, and a recipe run on
several seeds gets its gain with confidence intervals (``distill.report.seeds``). The summary
numbers come from each run's ``metrics.json``. What a run does not record (COCOeval's precision
array, per-image matches) is computed here by evaluating each model's weights on the students'
validation set again with ``predict`` and ``COCOeval``; the training loop is unchanged.

Writes ``DIR/report.html`` (PNG figures embedded as base64: no network, no JavaScript) and the
same figures as PNG files beside it. The page is put together in ``distill.report.html``, the
figures are drawn in ``distill.report.figures`` and ``distill.report.detections``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from distill.config import Config, load_config, replace, to_dict
from distill.data import CocoDetection, build_dataset
from distill.device import inference_accelerator
from distill.evaluation.cost import measure
from distill.evaluation.evaluate import (
    category_names,
    coco_metrics,
    load_detector,
    metrics_of,
    predict,
    run_cocoeval,
    run_metrics,
)
from distill.fileio import write_text_atomic
from distill.kd import needs_teacher
from distill.models.retinanet import build_transform
from distill.report.html import build_page
from distill.report.model import Lineup, Model, ReportError, metric
from teachers import teacher_weights_missing

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Reading run directories
# ---------------------------------------------------------------------------------------------


def read_run(path: Path, role: str, overrides: list[str]) -> Model:
    """A finished run directory: its config.yaml, metrics.json and weights (if present)."""
    if not path.is_dir():
        raise ReportError(f"{path}: not a run directory")
    for name in ("config.yaml", "metrics.json"):
        if not (path / name).is_file():
            raise ReportError(
                f"{path} has no {name}: not a finished run (distill run writes it)"
                if name == "metrics.json"
                else f"{path} has no config.yaml: not a run directory"
            )
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except ValueError as err:
        raise ReportError(f"{path / 'metrics.json'}: not JSON ({err})") from None
    if not isinstance(metrics, dict) or "map" not in metrics:
        raise ReportError(f"{path / 'metrics.json'}: no COCO metrics in it")
    cfg = load_config(path / "config.yaml", overrides)
    kind = "teacher" if metrics.get("job") == "teacher" else "student"
    weights = path / ("teacher.pt" if kind == "teacher" else "student.pt")
    model = Model(path.name, role, kind, cfg, metrics, run_dir=path)
    if weights.is_file():
        model.weights = str(weights)
    else:
        model.notes.append(f"{path} has no {weights.name}: not evaluated again")
    return model


def is_plain(cfg: Config) -> bool:
    """A plain student: no KD term on (the teacher does not run)."""
    return not needs_teacher(cfg.distill)


def is_sweep(path: Path) -> bool:
    """A ``distill sweep`` output directory (its points are run directories inside it)."""
    return path.is_dir() and not (path / "metrics.json").exists() and (path / "sweep.csv").is_file()


def read_sweep(path: Path, overrides: list[str]) -> tuple[list[Model], list[dict[str, str]]]:
    """The points of a sweep directory (every sub-folder with a config.yaml) and its table."""
    with open(path / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    points = [
        read_run(sub, "student", overrides)
        for sub in sorted(path.iterdir())
        if (sub / "config.yaml").is_file()
    ]
    for point in points:
        point.name = f"{path.name}/{point.name}"
    return points, rows


def read_teacher(spec: str | None, like: Model, overrides: list[str]) -> Model | None:
    """``--teacher`` (a run directory or weights file), else the students' ``teacher.weights``.

    A weights file is built with the students' teacher section; its numbers come from the
    metrics.json beside it, or from evaluating it here.
    """

    explicit = spec is not None
    spec = spec if explicit else like.cfg.teacher.weights
    if not spec:
        return None
    path = Path(spec)
    if path.is_dir():
        model = read_run(path, "teacher", overrides)
        model.name = "teacher"
        if model.kind != "teacher":  # a student run as the reference: still its own arch
            model.notes.append(f"{path} is a {model.kind} run used as the teacher")
        return model
    cfg = replace(like.cfg, **{"teacher.weights": spec})
    if explicit and not path.is_file():
        raise ReportError(f"--teacher {spec}: no such run directory or weights file")
    if not explicit and teacher_weights_missing(cfg) is not None:
        like.notes.append(f"the students' teacher.weights {spec} does not exist: no teacher")
        return None
    metrics = run_metrics(path) if path.is_file() else None
    run_dir = path.parent if metrics is not None else None  # a train-teacher run: its logs too
    return Model("teacher", "teacher", "teacher", cfg, metrics, run_dir=run_dir, weights=spec)


def collect(
    paths: list[Path],
    teacher: str | None = None,
    baseline: Path | Sequence[Path] | None = None,
    overrides: list[str] | None = None,
) -> Lineup:
    """The students, baselines and teacher named on the command line (see the module doc)."""
    overrides = list(overrides or [])
    given = [baseline] if isinstance(baseline, Path) else list(baseline or [])
    bases = [read_run(path, "baseline", overrides) for path in given]
    students: list[Model] = []
    sweeps = []
    for path in paths:
        if is_sweep(path):
            points, rows = read_sweep(path, overrides)
            sweeps.append((path, rows))
            for point in points:
                if point.run_dir is not None and point.run_dir.name == "baseline" and not given:
                    point.role = "baseline"  # every sweep's own, one per seed
                    bases.append(point)
                else:
                    students.append(point)
        else:
            students.append(read_run(path, "student", overrides))
    notes = []
    if not bases:
        bases = plain_runs(students)
        for base in bases:
            base.role = "baseline"
            students.remove(base)
            notes.append(f"baseline: {base.run_dir} (no KD term on)")
        if not bases:
            notes.append("no baseline (give --baseline RUN_DIR): gains and gap closed are left out")
    if not students:
        raise ReportError("no student run to report on (give RUN_DIR or a sweep directory)")
    names = [m.name for m in [*students, *bases]]
    if len(set(names)) < len(names):  # same folder names in different places: full paths
        for m in [*students, *bases]:
            m.name = str(m.run_dir)
    teacher_model = read_teacher(teacher, students[0], overrides)
    if teacher_model is None:
        notes.append("no teacher (give --teacher): its columns and the gap closed are left out")
    return Lineup(students, bases, teacher_model, sweeps, notes)


def plain_runs(runs: list[Model]) -> list[Model]:
    """The baselines among ``runs`` when none is named: the plain students (no KD term on),
    if there is a distilled one beside them and no two are of the same seed."""
    plain = [m for m in runs if m.kind == "student" and is_plain(m.cfg)]
    seeds = {m.cfg.train.seed for m in plain}
    return plain if len(plain) < len(runs) and len(seeds) == len(plain) else []


# ---------------------------------------------------------------------------------------------
# Evaluating again: the precision array and per-image matches
# ---------------------------------------------------------------------------------------------


def evaluate_models(lineup: Lineup, precision: str | None = None) -> CocoDetection:
    """Predict with every model that has weights on the first student's validation set and run
    COCOeval (``Model.evaluator``), and measure params, GFLOPs and CPU latency (``Model.cost``).

    A model without metrics.json (a bare teacher weights file) gets the metrics of this
    evaluation; one whose metrics.json disagrees with it gets a note.
    """

    cfg = lineup.students[0].cfg
    accelerator = inference_accelerator(precision)  # --precision, never train.mixed_precision
    dataset = build_dataset(cfg.data, "val")
    names = category_names(dataset)
    costs: dict[str, dict[str, float]] = {}  # one measurement per architecture (sweep points)
    for model in lineup.models:
        if model.weights is None:
            continue
        log.info("evaluating %s (%s) on %s", model.name, model.weights, dataset.ann_path)
        detector = load_detector(model.cfg, model.kind, model.weights, dataset.num_categories + 1)
        detector.to(accelerator.device)
        transform = build_transform(model.cfg).to(accelerator.device)
        batch_size = cfg.eval.batch_size or cfg.data.batch_size
        results = predict(detector, transform, dataset, accelerator, batch_size)
        model.evaluator = run_cocoeval(dataset.coco, results, dataset.image_ids)
        model.evaluated = True
        again = (
            metrics_of(model.evaluator, names)
            if model.evaluator is not None
            else coco_metrics(dataset.coco, [], dataset.image_ids, names)
        )
        if model.metrics is None:
            model.metrics = again
            model.notes.append(f"{model.name}: metrics from evaluating {model.weights} here")
        elif abs(again["map"] - metric(model, "map")) > 1e-3:
            model.notes.append(
                f"{model.name}: evaluated here on {dataset.ann_path}, mAP {again['map']:.3f}; "
                f"its metrics.json says {metric(model, 'map'):.3f} (another validation set "
                "or precision?). The curves and detections are from this evaluation."
            )
        # weights change no cost; the architecture section, anchors and image size do
        arch = {**to_dict(getattr(model.cfg, model.kind)), "weights": None}
        key = repr((model.kind, arch, model.cfg.anchors, model.cfg.data.image_size))
        if key not in costs:
            costs[key] = measure(detector, model.cfg.data.image_size, warmup=1, iterations=3)
        model.cost = costs[key]
    return dataset


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def write_report(
    lineup: Lineup,
    out: Path,
    *,
    num_differ: int = 4,
    num_random: int = 2,
    min_score: float = 0.3,
    precision: str | None = None,
    resamples: int = 1000,
) -> Path:
    """Evaluate (in ``precision``, default no), draw every figure into ``out`` and write
    ``out/report.html``; returns its path. resamples: of the bootstrap over images of the gain
    over seeds (0: none)."""

    dataset = evaluate_models(lineup, precision)
    out.mkdir(parents=True, exist_ok=True)
    page = build_page(
        lineup,
        dataset,
        out,
        num_differ=num_differ,
        num_random=num_random,
        min_score=min_score,
        resamples=resamples,
    )
    path = out / "report.html"
    write_text_atomic(path, page)  # a stop mid-write keeps the previous report whole
    return path


def report_command(
    runs: list[Path],
    out: Path,
    teacher: str | None = None,
    baseline: Path | Sequence[Path] | None = None,
    overrides: list[str] | None = None,
    num_differ: int = 4,
    num_random: int = 2,
    min_score: float = 0.3,
    precision: str | None = None,
    resamples: int = 1000,
) -> Path:
    """``distill report``: collect, evaluate, draw and write; prints the page's path."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file: give a folder")
    if num_differ < 0 or num_random < 0 or resamples < 0:
        raise ReportError("--images, --random-images and --resamples must be >= 0")
    if not 0.0 <= min_score <= 1.0:
        raise ReportError(f"--min-score {min_score}: give a score in [0, 1]")
    lineup = collect(runs, teacher, baseline, overrides)
    path = write_report(
        lineup,
        out,
        num_differ=num_differ,
        num_random=num_random,
        min_score=min_score,
        precision=precision,
        resamples=resamples,
    )
    print(f"wrote {path}")
    return path
