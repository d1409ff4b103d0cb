"""``distill demo``: the built-in shapes benchmark end to end, on CPU within ~15 minutes.

1. generate the shapes dataset (if absent),
2. train the teacher (or reuse ``OUT/teacher/teacher.pt``, or ``--teacher FILE``),
3. train the plain student and the distilled student on the same schedule,
4. print one table: teacher, student, student + KD: mAP, AP50, params, GFLOPs, latency.

The schedules are the shipped ``configs/shapes/*.yaml`` shortened to the demo's budget below;
every number printed is measured in this run (or read from the reused teacher's metrics.json).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from distill.config import Config, load_config, replace
from distill.data.shapes import BENCHMARK_TRAIN, generate_shapes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "shapes"
BENCH_KD = REPO / "results" / "bench_kd.json"

# Budget on 2 CPU cores with native bf16 (the configs' mixed_precision auto). Steps, not
# minutes, so that results are reproducible; CPUs without native bf16 train in fp32, slower.
DEMO_TRAIN, DEMO_VAL, DEMO_SIZE = 1000, 200, 128
TEACHER_STEPS = 600
STUDENT_STEPS = 500

log = logging.getLogger("distill.demo")


def demo_configs(out: Path, data_root: Path, teacher_weights: Path) -> dict[str, Config]:
    """The three demo configs: the shipped shapes configs with the demo's data, budget and dirs."""
    common = [f"data.root={data_root}", "eval.every_epochs=0", "eval.images_logged=2"]
    teacher = load_config(
        CONFIGS / "teacher.yaml",
        [
            *common,
            f"train.max_steps={TEACHER_STEPS}",
            "train.warmup_steps=100",
            "train.lr=0.0005",  # the rate the demo's short teacher schedule was measured with
            f"output.dir={out / 'teacher'}",
        ],
    )
    student_overrides = [
        *common,
        f"train.max_steps={STUDENT_STEPS}",
        "train.warmup_steps=100",
        f"teacher.weights={teacher_weights}",
    ]
    student = load_config(
        CONFIGS / "student.yaml", [*student_overrides, f"output.dir={out / 'student'}"]
    )
    distilled = load_config(
        CONFIGS / "distill.yaml", [*student_overrides, f"output.dir={out / 'distill'}"]
    )
    # same schedule for both students: epochs large enough that max_steps decides
    epochs = {"train.epochs": 1000}
    return {
        "teacher": replace(teacher, **epochs),
        "student": replace(student, **epochs),
        "student + KD": replace(distilled, **epochs),
    }


def demo(
    out: Path = Path("runs/demo"),
    data_root: Path = Path("data/shapes-demo"),
    teacher: Path | None = None,
) -> dict[str, Any]:
    from distill.evaluate import run_metrics
    from distill.summary import summarize
    from distill.train import train

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    start = time.perf_counter()
    if not (data_root / "train.json").is_file():
        log.info("generating the shapes dataset in %s", data_root)
        generate_shapes(data_root, num_train=DEMO_TRAIN, num_val=DEMO_VAL, size=DEMO_SIZE, seed=0)
    teacher_weights = teacher or out / "teacher" / "teacher.pt"
    configs = demo_configs(out, data_root, teacher_weights)

    rows: dict[str, dict[str, Any]] = {}
    minutes: dict[str, float] = {}
    if teacher_weights.is_file():
        log.info("reusing the teacher in %s", teacher_weights)
        rows["teacher"] = run_metrics(teacher_weights) or {}
        minutes["teacher"] = float("nan")
        teacher_run = f"teacher reused from {teacher_weights}"
    else:
        tic = time.perf_counter()
        rows["teacher"] = train(configs["teacher"], job="teacher")
        minutes["teacher"] = (time.perf_counter() - tic) / 60
        teacher_run = f"teacher {TEACHER_STEPS} steps"
    for name in ("student", "student + KD"):
        tic = time.perf_counter()
        rows[name] = train(configs[name], job="student")
        minutes[name] = (time.perf_counter() - tic) / 60

    sizes = summarize(configs["student + KD"])
    size_of = {
        "teacher": sizes["teacher"],
        "student": sizes["student"],
        "student + KD": sizes["student"],
    }
    table = format_demo_table(rows, size_of, minutes)
    print()
    print(table)
    print(
        f"\n{'cuda' if torch.cuda.is_available() else 'cpu'}, "
        f"total {(time.perf_counter() - start) / 60:.1f} min; {teacher_run}, "
        f"students {STUDENT_STEPS} steps each (batch {configs['student'].data.batch_size}, "
        f"{configs['student'].data.image_size} px). Runs in {out}; "
        f"`tensorboard --logdir {out}` shows the curves and detections."
    )
    print(verdict(rows, teacher_weights))
    return {"rows": rows, "sizes": size_of, "minutes": minutes}


def verdict(rows: dict[str, dict[str, Any]], teacher_weights: Path) -> str:
    """One plain sentence on what the measured numbers show."""
    teacher = rows["teacher"].get("map", float("nan"))
    plain, kd = rows["student"]["map"], rows["student + KD"]["map"]
    if not teacher > plain:
        shipped = load_config(CONFIGS / "teacher.yaml")
        steps = shipped.train.epochs * (BENCHMARK_TRAIN // shipped.data.batch_size)
        return (
            f"\nThe teacher (mAP {teacher:.3f}) is not better than the plain student "
            f"({plain:.3f}): a ResNet50-FPN trained from random weights for a few minutes on "
            "2 CPU cores has not converged yet, so there is nothing to distil. Train it longer, "
            "once, e.g. "
            f"`distill train-teacher configs/shapes/teacher.yaml` ({steps} steps), and rerun with "
            f"`distill demo --teacher runs/shapes/teacher/teacher.pt` (here: {teacher_weights})."
            + benchmark_sentence(BENCH_KD)
        )
    gap = teacher - plain
    return (
        f"\nDistillation moved the student from mAP {plain:.3f} to {kd:.3f} "
        f"({(kd - plain) / gap:+.0%} of the {gap:.3f} gap to the teacher)."
    )


def benchmark_sentence(path: Path) -> str:
    """What the long teacher schedule gave in the last full ``scripts/bench_kd.py`` run, read
    from its committed JSON ("" when there is none)."""
    try:
        result = json.loads(path.read_text())
        if result.get("quick"):
            return ""
        models = result["models"]
        teacher, plain, kd = (models[k] for k in ("teacher", "student", "student + KD"))
        return (
            f" In the last full benchmark ({path.name}, {result['machine']['cpu']}, "
            f"{result['date'][:10]}), a teacher trained for {teacher['train_minutes']:.0f} min "
            f"reached mAP {teacher['map']['mean']:.3f}, and distillation moved the student from "
            f"{plain['map']['mean']:.3f} to {kd['map']['mean']:.3f} ({result['gap_closed']:.0%} "
            f"of the gap, mean of seeds {result['seeds']})."
        )
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def format_demo_table(
    rows: dict[str, dict[str, Any]], sizes: dict[str, dict[str, Any]], minutes: dict[str, float]
) -> str:
    lines = [
        "| model | mAP | AP50 | params (M) | GFLOPs | latency (ms) | train (min) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, metrics in rows.items():
        size = sizes[name]
        m = metrics.get("map", float("nan"))
        ap50 = metrics.get("ap50", float("nan"))
        lines.append(
            f"| {name} | {m:.3f} | {ap50:.3f} | {size['params'] / 1e6:.2f} | {size['gflops']:.2f} "
            f"| {size['latency_ms']:.1f} | {minutes[name]:.1f} |"
        )
    return "\n".join(lines)
