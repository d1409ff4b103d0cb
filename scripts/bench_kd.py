"""The distillation benchmark: does KD close the teacher-student gap on the shapes benchmark?

    python scripts/bench_kd.py                  # trains (or reuses) the teacher, then students
    python scripts/bench_kd.py --teacher FILE   # a teacher.pt made by `distill train-teacher`
    python scripts/bench_kd.py --quick          # a 64 px smoke run of the whole pipeline

1. the shapes dataset with a fixed dataset seed (generated if absent);
2. the teacher: ``--teacher FILE``, or ``OUT/teacher/teacher.pt`` from an earlier run, or trained
   now with ``configs/shapes/teacher.yaml``;
3. for every run seed, the plain student (``configs/shapes/student.yaml``) and the distilled
   student (``configs/shapes/distill.yaml``) on the same schedule, plus, for the first seed only,
   the ``ABLATIONS`` (each term of the recipe alone, MGD alone, CrossKD + CWD and the recipe
   without CrossKD).
   The models of one seed train in **lockstep** (``train_group``: one data stream, one teacher
   forward per batch), and each ends with the weights a separate ``distill run`` gives, so
   grouping changes the cost, not the result;
4. ``results/bench_kd.json`` and a markdown table: mAP (mean ± std over seeds; a model trained
   once, the teacher and the ablations, has no std), AP50, APs/m/l, params, GFLOPs, and gap
   closed = (KD − plain) / (teacher − plain), from the seed means;
5. ``results/bench_kd.png`` (per-class and per-size AP of teacher, plain and KD student, seed
   means) and the ``distill report`` of the first seed's runs in ``OUT/report/report.html``.

    python scripts/bench_kd.py --figure         # results/bench_kd.png again from the JSON

``train_minutes`` of a model is the wall time of its lockstep group divided by the group's size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from distill.config import Config, load_config, override
from distill.data.shapes import BENCHMARK_TRAIN, BENCHMARK_VAL, generate_shapes
from distill.engine.checkpoint import (
    CheckpointError,
    TeacherMismatchError,
    find_checkpoint,
    has_checkpoint,
)
from distill.engine.loop import train, train_group
from distill.evaluation.cost import summarize
from distill.evaluation.evaluate import evaluate_checkpoints, run_metrics
from distill.experiments.goals import Goal, check_goals
from distill.experiments.machine import machine, publish
from distill.kd import weight_keys
from distill.report.collect import report_command
from distill.report.figures import bench_figure

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "shapes"
METRICS = ("map", "ap50", "aps", "apm", "apl")


def only(*keep: str) -> list[str]:
    """Overrides of the default recipe that switch off every KD weight but those in ``keep``."""
    return [f"{key}=0" for key in weight_keys() if key not in keep]


# the recipe's feature term is CWD: its weight is CWD's own
FEATURE, LOGIT, BOX = "distill.feature.cwd.weight", "distill.logit.weight", "distill.box.weight"
CROSSKD = ("distill.crosskd.cls_weight", "distill.crosskd.box_weight")
# A term the recipe does not use, at the weight its sweep chose (the sweeps' figures:
# docs/recipes.md, "Shapes recipe").
MGD = ["distill.feature.kind=mgd", "distill.feature.mgd.weight=1.0e-8"]
# Rows of the first seed only, as overrides of configs/shapes/distill.yaml (the default recipe:
# CWD + soft labels + box KD + CrossKD): each of its terms alone, MGD alone, CrossKD beside the
# feature term, and the recipe without CrossKD (the default before CrossKD joined it).
ABLATIONS = {
    "feature KD only": only(FEATURE),
    "logit KD only": only(LOGIT),
    "box KD only": only(BOX),
    "MGD only": [*only(), *MGD],
    "CrossKD only": only(*CROSSKD),
    "CrossKD + CWD": only(FEATURE, *CROSSKD),
    "student + KD without CrossKD": only(FEATURE, LOGIT, BOX),
}

QUICK = [
    "data.image_size=64",
    "data.batch_size=4",
    "data.num_workers=0",
    "train.max_steps=3",
    "train.warmup_steps=1",
    "eval.images_logged=0",
]

# The goals: name -> (label, comparison, bound); "met" when value <= / >= bound.
GOALS: dict[str, Goal] = {
    "teacher_map": ("teacher mAP", ">=", 0.50),
    "teacher_train_minutes": ("teacher training (min)", "<=", 90.0),
    "gflops_ratio": ("student / teacher GFLOPs", "<=", 0.2),
    "student_train_minutes": ("student training per model in its lockstep group (min)", "<=", 10.0),
    "teacher_minus_plain": ("teacher mAP − plain student mAP", ">=", 0.08),
    "gap_closed": ("gap closed by KD (mean over seeds)", ">=", 0.5),
    "kd_beats_plain_every_seed": ("KD beats the plain student on every seed (1 = yes)", ">=", 1.0),
    "benchmark_minutes": ("benchmark wall time once the teacher exists (min)", "<=", 60.0),
}

log = logging.getLogger("bench_kd")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "shapes")
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "bench_kd")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_kd.json")
    parser.add_argument("--teacher", type=Path, default=None, help="an existing teacher.pt")
    parser.add_argument("--seeds", default="0,1,2", help="run seeds, comma-separated")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra overrides for every config (teacher and students)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny data and 3 steps: a smoke run")
    parser.add_argument("--figure", action="store_true",
                        help="only draw the figure (.png beside --out) from --out")  # fmt: skip
    return parser.parse_args(argv)


def make_data(root: Path, quick: bool) -> None:
    """The benchmark's shapes task in ``root`` (``quick``: 32 + 8 images of 64 px). Made if absent,
    kept if complete; one made with other arguments is refused (FileExistsError)."""
    size = 64 if quick else 128
    num_train, num_val = (32, 8) if quick else (BENCHMARK_TRAIN, BENCHMARK_VAL)
    generate_shapes(root, num_train=num_train, num_val=num_val, size=size, seed=0)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    overrides = [override("data.root", args.data), *(QUICK if args.quick else []), *args.overrides]
    make_data(args.data, args.quick)

    teacher_weights = args.teacher or args.out_dir / "teacher" / "teacher.pt"
    if not teacher_weights.is_file():
        cfg = load_config(
            CONFIGS / "teacher.yaml", [*overrides, override("output.dir", teacher_weights.parent)]
        )
        run_dir = teacher_weights.parent  # an interrupted teacher run goes on where it stopped
        train(cfg, job="teacher", resume=run_dir if has_checkpoint(run_dir) else None)
    teacher_metrics = _teacher_metrics(teacher_weights, overrides)
    teacher_minutes = _teacher_minutes(teacher_weights, teacher_metrics)  # as its run measured
    students_start = time.perf_counter()

    per_model: dict[str, list[dict[str, Any]]] = {}
    run_dirs: dict[str, list[str]] = {}
    minutes: dict[str, list[float]] = {}
    for i, seed in enumerate(seeds):
        common = [*overrides, override("teacher.weights", teacher_weights), f"train.seed={seed}"]
        cfgs = {
            "student": load_config(
                CONFIGS / "student.yaml", [*common, _dir(args, "student", seed)]
            ),
            "student + KD": load_config(
                CONFIGS / "distill.yaml", [*common, _dir(args, "distill", seed)]
            ),
        }
        if i == 0:  # one-term ablations, first seed only
            for name, extra in ABLATIONS.items():
                slug = "-".join(name.lower().replace("+", " ").split()[:3])
                cfgs[name] = load_config(
                    CONFIGS / "distill.yaml", [*common, *extra, _dir(args, slug, seed)]
                )
        group_dir = args.out_dir / f"group_seed{seed}"
        results = _train_or_resume(list(cfgs.values()), group_dir)
        for (name, cfg), metrics in zip(cfgs.items(), results):
            per_model.setdefault(name, []).append(metrics)
            run_dirs.setdefault(name, []).append(_repo_relative(cfg.output.dir))
            # the group's training time (over all sessions, if resumed), shared by its models
            minutes.setdefault(name, []).append(metrics["train_minutes"] / len(cfgs))

    sizes = summarize(load_config(CONFIGS / "distill.yaml", overrides))
    models: dict[str, Any] = {
        "teacher": {
            **{
                k: spread([teacher_metrics[k]]) if k == "map" else teacher_metrics[k]
                for k in METRICS
            },
            "per_class": teacher_metrics.get("per_class", {}),
            "params": sizes["teacher"]["params"],
            "gflops": sizes["teacher"]["gflops"],
            "train_minutes": teacher_minutes,
            "weights": str(teacher_weights),
        }
    }
    for name, runs in per_model.items():
        maps = [r["map"] for r in runs]
        models[name] = {
            "map": spread(maps),
            **{k: statistics.fmean(r[k] for r in runs) for k in METRICS if k != "map"},
            "per_class": {
                c: statistics.fmean(r["per_class"][c] for r in runs) for c in runs[0]["per_class"]
            },
            "map_per_seed": maps,
            "params": sizes["student"]["params"],
            "gflops": sizes["student"]["gflops"],
            "train_minutes": statistics.fmean(minutes[name]),
            "run_dirs": run_dirs[name],
        }
    teacher_map = teacher_metrics["map"]
    plain, kd = models["student"]["map"]["mean"], models["student + KD"]["map"]["mean"]
    gap = teacher_map - plain
    beats = [
        k > p
        for k, p in zip(models["student + KD"]["map_per_seed"], models["student"]["map_per_seed"])
    ]
    gap_closed = (kd - plain) / gap if gap > 0 else float("nan")
    benchmark_minutes = (time.perf_counter() - students_start) / 60
    values = {
        "teacher_map": teacher_map,
        "teacher_train_minutes": teacher_minutes,
        "gflops_ratio": sizes["ratio"]["gflops"],
        "student_train_minutes": max(
            m["train_minutes"] for name, m in models.items() if name != "teacher"
        ),
        "teacher_minus_plain": gap,
        "gap_closed": gap_closed,
        "kd_beats_plain_every_seed": float(all(beats)),
        "benchmark_minutes": benchmark_minutes,
    }
    return {
        "models": models,
        "gap_closed": gap_closed,
        "kd_beats_plain_every_seed": all(beats),
        "benchmark_minutes": benchmark_minutes,
        "goals": check_goals(GOALS, values),
        "seeds": seeds,
        "quick": bool(args.quick),
        "machine": machine(),  # cores, usable and physical ones, torch threads, bf16
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/bench_kd.py" + ("" if not argv else " " + shlex.join(argv)),
    }


def spread(values: list[float]) -> dict[str, Any]:
    """Mean of ``values`` and the number of runs; the (population) std only where there are
    several runs: one run measures no spread."""
    result: dict[str, Any] = {"mean": statistics.fmean(values), "runs": len(values)}
    if len(values) > 1:
        result["std"] = statistics.pstdev(values)
    return result


def _train_or_resume(cfgs: list[Config], group_dir: Path) -> list[dict[str, Any]]:
    """An interrupted (or finished) group resumes only if its checkpoint was made against this
    teacher; one made against another, or too old to say, is trained again from the start."""
    try:
        checkpoint = find_checkpoint(group_dir)
        made_with = json.loads((checkpoint / "progress.json").read_text()).get("teacher_digest")
    except (CheckpointError, OSError, ValueError):
        return train_group(cfgs, "student", group_dir, overwrite=True)  # its own folder
    if made_with is None:
        print(f"{checkpoint} records no teacher: training {group_dir.name} again", flush=True)
        return train_group(cfgs, "student", group_dir, overwrite=True)
    try:
        return train_group(cfgs, "student", group_dir, resume=True)
    except TeacherMismatchError as err:
        print(f"{err}: training {group_dir.name} again", flush=True)
        return train_group(cfgs, "student", group_dir, overwrite=True)


def _repo_relative(path: str) -> str:
    """``path`` relative to the repository if inside it (no machine's folders in results/)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def _dir(args: argparse.Namespace, name: str, seed: int) -> str:
    return override("output.dir", args.out_dir / f"{name}_seed{seed}")


def _teacher_metrics(weights: Path, overrides: list[str]) -> dict[str, Any]:
    """The teacher's val metrics: its run's metrics.json, or evaluated now (as ``distill eval``)."""
    metrics = run_metrics(weights)
    if metrics is None:
        cfg = load_config(CONFIGS / "teacher.yaml", overrides)
        metrics = evaluate_checkpoints(cfg, [("teacher", str(weights))])[1][0][1]
    return metrics


def _teacher_minutes(weights: Path, metrics: dict[str, Any]) -> float:
    """Training wall time of the teacher: its metrics.json, else (older runs) its file times."""
    if "train_minutes" in metrics:
        return float(metrics["train_minutes"])
    config = weights.parent / "config.yaml"  # written when its run started (or last resumed)
    if config.is_file() and weights.is_file():
        return (weights.stat().st_mtime - config.stat().st_mtime) / 60
    return float("nan")


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per model, mAP as mean ± std over seeds (no ± for a single run)."""
    lines = [
        "| model | mAP | AP50 | APs | APm | APl | params (M) | GFLOPs | train (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["models"].items():
        mean, std = m["map"]["mean"], m["map"].get("std")  # no std: a single run
        cells = [f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"]
        cells += [f"{m[k]:.3f}" for k in ("ap50", "aps", "apm", "apl")]
        minutes = m["train_minutes"]  # nan: not recorded (a teacher file without its run)
        cells += [f"{m['params'] / 1e6:.2f}", f"{m['gflops']:.2f}",
                  "–" if math.isnan(minutes) else f"{minutes:.1f}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Gap closed by the default KD recipe: {result['gap_closed']:.0%} "
        f"(seeds {result['seeds']}; KD beats the plain student on every seed: "
        f"{'yes' if result['kd_beats_plain_every_seed'] else 'no'})."
    )
    goals = result.get("goals", {})  # results written before the goals were recorded have none
    if goals:
        lines += ["", "| goal | measured | target | met? |", "|---|---:|---|---|"]
        for name, g in goals.items():
            label = GOALS[name][0] if name in GOALS else name
            met = "yes" if g["met"] else "no"
            value = "not recorded" if math.isnan(g["value"]) else f"{g['value']:.3f}"
            lines.append(f"| {label} | {value} | {g['goal']} | {met} |")
    return "\n".join(lines)


def report_runs(result: dict[str, Any]) -> tuple[list[Path], Path, Path]:
    """What ``distill report`` compares for a result: the first seed's distilled students
    (default recipe first, then the ablations), its plain student and the teacher weights."""
    models = result["models"]
    students = [REPO / m["run_dirs"][0] for name, m in models.items()
                if name not in ("teacher", "student")]  # fmt: skip
    return students, REPO / models["student"]["run_dirs"][0], Path(models["teacher"]["weights"])


def write_figures(result: dict[str, Any], figure: Path, report_dir: Path | None) -> None:
    """``figure`` (per-class and per-size AP of teacher, plain and KD) and, with ``report_dir``,
    the ``distill report`` of the first seed's runs there."""
    bench_figure(result, figure)
    print(f"wrote {figure}")
    if report_dir is not None:
        students, baseline, teacher = report_runs(result)
        report_command(students, report_dir, teacher=str(teacher), baseline=baseline)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    figure = args.out.with_suffix(".png")
    if args.figure:  # from the JSON of the last run; no training, no report
        if not args.out.is_file():
            sys.exit(f"bench_kd: error: {args.out} not found: run the benchmark first")
        result = json.loads(args.out.read_text())
        try:
            write_figures(result, figure, None)
        except ValueError as err:  # written before results had per-class AP
            sys.exit(f"bench_kd: error: {args.out}: {err}")
        return result
    try:
        result = run(args, argv)
    except FileExistsError as err:  # --data holds another dataset: nothing is overwritten
        sys.exit(f"bench_kd: error: {err}")
    publish(result, args.out, format_table(result))
    write_figures(result, figure, args.out_dir / "report")
    return result


if __name__ == "__main__":
    main()
