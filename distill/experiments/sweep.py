"""``distill sweep``: a grid over config keys, trained in lockstep on one teacher forward.

    distill sweep configs/shapes/distill.yaml --with-baseline \
        --grid distill.logit.temperature=1,2,4,8

The grid is the Cartesian product of the ``--grid`` keys. Each point gets its own run directory
(``<output.dir>/<point name>``) with its resolved ``config.yaml``, ``student.pt`` and
``metrics.json``. When the grid changes only ``distill.*`` keys, the students train in
**lockstep**: one data loader, one shared transform and one teacher forward per batch feed all of
them (``train_group``), and each ends with the weights a separate ``distill run`` would give.
Otherwise, or with ``--sequential``, the points run one after the other. Running the same
command again resumes an interrupted sweep where it stopped.

Outputs in ``<output.dir>``: ``sweep.csv``, ``sweep.md`` (best row marked), ``sweep.png`` and
TensorBoard hparams under ``tb_hparams/``.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState

from distill.config import (
    Config,
    ConfigError,
    TrainConfig,
    load_config,
    override,
    parse_value,
    value_text,
)
from distill.engine.checkpoint import has_checkpoint
from distill.engine.loop import train, train_group
from distill.evaluation.evaluate import run_metrics
from distill.kd import weight_keys

log = logging.getLogger(__name__)

BASELINE = "baseline"


def plain_overrides() -> list[str]:
    """The overrides that make a config's plain student: every registered KD weight 0."""
    return [f"{key}=0" for key in weight_keys()]


@dataclass(frozen=True)
class Point:
    name: str  # run directory name inside the sweep directory
    values: dict[str, Any]  # swept key -> value (empty for the baseline)
    cfg: Config


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    """``["a.b=1,2", "c=[1, 2],[3]"]`` -> ``[("a.b", [1, 2]), ("c", [[1, 2], [3]])]``.

    Values are split on commas outside brackets and read as YAML scalars or lists.
    """
    grid: list[tuple[str, list[Any]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise ConfigError(f"--grid {item!r} must look like key.path=v1,v2,...")
        if key.strip().startswith("output."):
            raise ConfigError(
                f"--grid {item!r}: a point's output.dir is the sweep's output.dir/<point name>"
            )
        values = []
        for part in _split_top_level(text):
            if not part:
                raise ConfigError(f"--grid {item!r}: an empty value (nothing between commas)")
            try:
                values.append(parse_value(part))
            except yaml.YAMLError as err:
                raise ConfigError(f"--grid {item!r}: cannot read value {part!r}: {err}") from None
        if key.strip() in (k for k, _ in grid):
            raise ConfigError(f"--grid key {key.strip()} given twice")
        grid.append((key.strip(), values))
    if not grid:
        raise ConfigError("give at least one --grid key=v1,v2,...")
    return grid


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return parts


def make_points(
    config_path: Path, overrides: list[str], grid: list[tuple[str, list[Any]]], with_baseline: bool
) -> list[Point]:
    """One resolved config per grid point (+ the baseline), each with its own output.dir."""
    base = load_config(config_path, overrides)
    sweep_dir = Path(base.output.dir)
    points = []
    keys = [k for k, _ in grid]
    for combo in itertools.product(*(values for _, values in grid)):
        values = dict(zip(keys, combo))
        name = "_".join(f"{k.split('.')[-1]}={value_text(v)}" for k, v in values.items())
        name = name.replace("/", "-").replace(" ", "")
        point_overrides = [override(k, v) for k, v in values.items()]
        cfg = load_config(
            config_path, [*overrides, *point_overrides, override("output.dir", sweep_dir / name)]
        )
        points.append(Point(name, values, cfg))
    if len({p.name for p in points}) != len(points):
        raise ConfigError(f"grid values give duplicate run names: {[p.name for p in points]}")
    if with_baseline:
        cfg = load_config(
            config_path,
            [*overrides, *plain_overrides(), override("output.dir", sweep_dir / BASELINE)],
        )
        points.append(Point(BASELINE, {}, cfg))
    return points


def is_lockstep(grid: list[tuple[str, list[Any]]], train: TrainConfig | None = None) -> bool:
    """Lockstep is possible when only distillation settings change between points, and not
    with fp16 (Accelerate keeps one grad scaler, which the students would share)."""
    fp16 = train is not None and train.mixed_precision == "fp16"
    return not fp16 and all(key.startswith("distill.") for key, _ in grid)


def sweep_command(
    cfg: Config,
    grid_items: list[str],
    with_baseline: bool = False,
    sequential: bool = False,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the sweep and write its report; returns one row per point."""

    if config_path is None:
        raise ConfigError("distill sweep needs the config file path")
    overrides = list(overrides or [])
    grid = parse_grid(grid_items)
    points = make_points(config_path, overrides, grid, with_baseline)
    sweep_dir = Path(cfg.output.dir)
    todo = [p for p in points if not (Path(p.cfg.output.dir) / "metrics.json").is_file()]
    if len(todo) < len(points):
        log.info(
            "sweep %s: %d of %d points already done",
            sweep_dir,
            len(points) - len(todo),
            len(points),
        )
    hint = "resume by running the same distill sweep command again"
    if todo and is_lockstep(grid, cfg.train) and not sequential:
        resume = has_checkpoint(sweep_dir)
        log.info(
            "lockstep: %d students on one teacher forward%s",
            len(todo),
            " (resuming)" if resume else "",
        )
        train_group([p.cfg for p in todo], "student", sweep_dir, resume=resume, resume_hint=hint)
    else:
        for point in todo:
            run_dir = Path(point.cfg.output.dir)
            resume_dir = run_dir if has_checkpoint(run_dir) else None
            train(point.cfg, job="student", resume=resume_dir, resume_hint=hint)
    rows = collect_rows(points, grid)
    if PartialState().is_main_process:  # under accelerate launch: one report, not one each
        write_report(sweep_dir, rows, [k for k, _ in grid], teacher_reference(cfg))
    return rows


def collect_rows(points: list[Point], grid: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    rows = []
    for point in points:
        metrics = json.loads((Path(point.cfg.output.dir) / "metrics.json").read_text())
        row: dict[str, Any] = {"run": point.name}
        for key, _ in grid:
            row[key] = point.values.get(key, "")
        for key in ("map", "ap50", "aps", "apm", "apl"):
            row[key] = metrics.get(key, float("nan"))
        rows.append(row)
    return rows


def teacher_reference(cfg: Config) -> float | None:
    """The teacher's mAP from the ``metrics.json`` beside its weights (written by train-teacher)."""

    metrics = run_metrics(Path(cfg.teacher.weights)) if cfg.teacher.weights else None
    value = metrics.get("map") if metrics else None
    return float(value) if value is not None else None


def write_report(
    sweep_dir: Path, rows: list[dict[str, Any]], keys: list[str], teacher_map: float | None
) -> None:
    """sweep.csv, sweep.md, sweep.png and TensorBoard hparams in ``sweep_dir``."""
    baseline = next((r["map"] for r in rows if r["run"] == BASELINE), None)
    for row in rows:
        row["gain"] = row["map"] - baseline if baseline is not None else float("nan")
        gap = (teacher_map - baseline) if teacher_map is not None and baseline is not None else 0.0
        row["gap_closed"] = row["gain"] / gap if gap > 0 else float("nan")
    points = [r for r in rows if r["run"] != BASELINE]
    best = max(points, key=lambda r: r["map"])["run"] if points else None

    columns = ["run", *keys, "map", "ap50", "aps", "apm", "apl", "gain", "gap_closed"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, "best"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**{c: row[c] for c in columns}, "best": row["run"] == best})

    def fmt(value: Any, column: str = "") -> str:
        if isinstance(value, float) and column not in keys:  # a metric
            return "–" if math.isnan(value) else f"{value:.3f}"
        return f"{value:g}" if isinstance(value, float) else str(value)  # a value as swept

    lines = [
        f"# Sweep: {sweep_dir}",
        "",
        f"teacher mAP: {'unknown' if teacher_map is None else fmt(teacher_map)}; "
        f"plain student mAP: {'not run' if baseline is None else fmt(baseline)}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        mark = " **(best)**" if row["run"] == best else ""
        lines.append("| " + " | ".join(fmt(row[c], c) for c in columns) + " |" + mark)
    (sweep_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot(sweep_dir / "sweep.png", points, keys, teacher_map, baseline)
    _hparams(sweep_dir, rows, keys)
    log.info("wrote %s", sweep_dir / "sweep.md")
    print("\n".join(lines))


def _plot(
    path: Path,
    rows: list[dict[str, Any]],
    keys: list[str],
    teacher: float | None,
    baseline: float | None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"text.parse_math": False}):  # values as given: a "$" is no math
        x_key, other = keys[0], keys[1:]
        fig, ax = plt.subplots(figsize=(6, 4))
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(value_text(row[k]) for k in other), []).append(row)
        numeric = all(
            isinstance(r[x_key], int | float) and not isinstance(r[x_key], bool) for r in rows
        )
        for combo, members in groups.items():
            members = sorted(members, key=lambda r: r[x_key]) if numeric else members
            xs = [r[x_key] if numeric else value_text(r[x_key]) for r in members]
            label = (
                ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(other, combo)) or "student + KD"
            )
            ax.plot(xs, [r["map"] for r in members], marker="o", label=label)
        if teacher is not None:
            ax.axhline(teacher, color="black", linestyle="--", label="teacher")
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle=":", label="plain student")
        if numeric and all(r[x_key] > 0 for r in rows) and len({r[x_key] for r in rows}) > 2:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_ylabel("COCO mAP")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _hparams(sweep_dir: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(sweep_dir / "tb_hparams"))
    for row in rows:
        hparams = {
            k: (row[k] if isinstance(row[k], int | float | str | bool) else value_text(row[k]))
            for k in keys
        }
        metrics = {f"hparam/{m}": float(row[m]) for m in ("map", "ap50", "aps", "apm", "apl")}
        writer.add_hparams(hparams, metrics, run_name=row["run"])
    writer.close()
