"""``distill demo``: the built-in shapes benchmark end to end, on CPU within ~15 minutes.

1. generate the shapes dataset (if absent),
2. fit the schedule to the time budget (``--minutes``): time a few training steps of each model
   on this machine and shorten the reference schedule below if it would not fit,
3. train the teacher (or reuse ``OUT/teacher/teacher.pt``, or ``--teacher FILE``),
4. train the plain student and the distilled student on the same schedule,
5. print one table: teacher, student, student + KD: mAP, AP50, params, GFLOPs, latency.

The schedules are the shipped ``configs/shapes/*.yaml`` shortened to the demo's budget below.
Every number printed is measured in this run (or read from the reused teacher's metrics.json),
except the verdict's last sentence: it quotes the committed benchmark (``results/bench_kd.json``)
and says so, with that benchmark's date.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distill.config import Config, load_config, replace
from distill.data.shapes import BENCHMARK_TRAIN, generate_shapes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "shapes"
BENCH_KD = REPO / "results" / "bench_kd.json"

# The reference schedule: about a quarter of an hour on 2 CPU cores with native bf16 (the
# configs' mixed_precision auto), three times that in fp32 (README, "Observations"). Where it
# would not fit the time budget, every model's steps shrink by one factor.
DEMO_TRAIN, DEMO_VAL, DEMO_SIZE = 1000, 200, 128
TEACHER_STEPS = 600
STUDENT_STEPS = 500
WARMUP_STEPS = 100  # at the reference schedule; scaled with it
MINUTES = 15.0
TRAIN_SHARE = 0.8  # of the budget for training steps; the rest: evaluation, model builds, probe
MIN_STEPS = 20

log = logging.getLogger("distill.demo")
AGAIN = "run distill demo again (a finished teacher is reused)"  # after a stop


def reference_steps() -> dict[str, int]:
    return {"teacher": TEACHER_STEPS, "student": STUDENT_STEPS, "student + KD": STUDENT_STEPS}


def demo_configs(
    out: Path, data_root: Path, teacher_weights: Path, steps: Mapping[str, int] | None = None
) -> dict[str, Config]:
    """The three demo configs: the shipped shapes configs with the demo's data, schedule
    (``steps`` per model; the reference schedule by default) and dirs."""
    reference = reference_steps()
    steps = steps or reference

    def schedule(name: str) -> list[str]:
        warmup = max(1, round(WARMUP_STEPS * steps[name] / reference[name]))
        return [f"train.max_steps={steps[name]}", f"train.warmup_steps={warmup}"]

    common = [f"data.root={data_root}", "eval.every_epochs=0", "eval.images_logged=2"]
    teacher = load_config(
        CONFIGS / "teacher.yaml",
        [
            *common,
            *schedule("teacher"),
            "train.lr=0.0005",  # the rate the demo's short teacher schedule was measured with
            f"output.dir={out / 'teacher'}",
        ],
    )
    student_overrides = [*common, f"teacher.weights={teacher_weights}"]
    student = load_config(
        CONFIGS / "student.yaml",
        [*student_overrides, *schedule("student"), f"output.dir={out / 'student'}"],
    )
    distilled = load_config(
        CONFIGS / "distill.yaml",
        [*student_overrides, *schedule("student + KD"), f"output.dir={out / 'distill'}"],
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
    minutes: float = MINUTES,
) -> dict[str, Any]:
    """minutes: the time budget the schedule is fitted to (0: the reference schedule as is)."""
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
    reuse_teacher = teacher_weights.is_file()
    configs = demo_configs(out, data_root, teacher_weights)
    plan: dict[str, Any] = {"scale": 1.0, "steps": reference_steps(), "seconds": {}}
    if minutes > 0:
        names = [n for n in configs if not (reuse_teacher and n == "teacher")]
        seconds = probe_seconds({n: configs[n] for n in names})
        plan = plan_steps(seconds, minutes - (time.perf_counter() - start) / 60)
        log.info("%s", describe_plan(plan, minutes))
        configs = demo_configs(out, data_root, teacher_weights, plan["steps"])
    steps = plan["steps"]

    rows: dict[str, dict[str, Any]] = {}
    spent: dict[str, float] = {}
    if reuse_teacher:
        log.info("reusing the teacher in %s", teacher_weights)
        rows["teacher"] = run_metrics(teacher_weights) or {}
        spent["teacher"] = float("nan")
        teacher_run = f"teacher reused from {teacher_weights}"
    else:
        tic = time.perf_counter()
        rows["teacher"] = train(
            configs["teacher"], job="teacher", overwrite=True, resume_hint=AGAIN
        )
        spent["teacher"] = (time.perf_counter() - tic) / 60
        teacher_run = f"teacher {steps['teacher']} steps"
    for name in ("student", "student + KD"):
        tic = time.perf_counter()
        rows[name] = train(configs[name], job="student", overwrite=True, resume_hint=AGAIN)
        spent[name] = (time.perf_counter() - tic) / 60

    sizes = summarize(configs["student + KD"])
    size_of = {
        "teacher": sizes["teacher"],
        "student": sizes["student"],
        "student + KD": sizes["student"],
    }
    table = format_demo_table(rows, size_of, spent)
    print()
    print(table)
    print(
        f"\n{'cuda' if torch.cuda.is_available() else 'cpu'}, "
        f"total {(time.perf_counter() - start) / 60:.1f} min; {teacher_run}, "
        f"students {steps['student']} steps each (batch {configs['student'].data.batch_size}, "
        f"{configs['student'].data.image_size} px). Runs in {out}; "
        f"`tensorboard --logdir {out}` shows the curves and detections."
    )
    if plan["scale"] < 1:
        print(describe_plan(plan, minutes))
    print(verdict(rows, teacher_weights))
    return {"rows": rows, "sizes": size_of, "minutes": spent, "plan": plan}


def probe_seconds(configs: Mapping[str, Config], steps: int = 3) -> dict[str, float]:
    """Seconds per training step of each demo model on this machine: the median of ``steps``
    steps after one warm-up step, on one real batch, through the loop's own ``train_step`` (and
    ``teacher_forward`` for the distilled student). The teacher has random weights here: its
    cost does not depend on them."""
    from distill.build import build_accelerator, build_train_loader, build_trainee
    from distill.dense import build_transform
    from distill.train import teacher_forward, train_step

    seconds = {}
    with tempfile.TemporaryDirectory(prefix="distill-probe-") as scratch:
        for name, cfg in configs.items():
            job = "teacher" if name == "teacher" else "student"
            cfg = replace(
                cfg,
                **{"teacher.weights": None, "data.num_workers": 0, "output.dir": scratch},
            )
            accelerator = build_accelerator(cfg)
            train_set, loader = build_train_loader(accelerator, cfg)
            images, targets = next(iter(loader))
            transform = build_transform(cfg).to(accelerator.device)
            t, frozen = build_trainee(
                accelerator, cfg, job, train_set.num_categories + 1, steps + 1
            )
            if frozen is not None:
                frozen.to(accelerator.device)
            times = []
            for step in range(steps + 1):
                tic = time.perf_counter()
                image_list, batch_targets = transform(images, targets)
                teacher_out = None
                if frozen is not None:
                    teacher_out = teacher_forward(accelerator, frozen, image_list)
                train_step(accelerator, t, image_list, batch_targets, teacher_out, step, 0)
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize(accelerator.device)
                times.append(time.perf_counter() - tic)
            if t.writer is not None:
                t.writer.close()
            seconds[name] = statistics.median(times[1:])
    return seconds


def plan_steps(seconds: Mapping[str, float], minutes: float) -> dict[str, Any]:
    """The reference schedule of the models in ``seconds`` (seconds per step), shortened by one
    factor if its training steps would take more than ``TRAIN_SHARE`` of ``minutes``. Never
    longer than the reference: that is the schedule the demo was measured with."""
    reference = reference_steps()
    predicted = sum(reference[name] * s for name, s in seconds.items())
    budget = max(minutes, 0.0) * 60 * TRAIN_SHARE
    scale = min(1.0, budget / predicted) if predicted > 0 else 1.0
    steps = {name: min(n, max(MIN_STEPS, round(n * scale))) for name, n in reference.items()}
    return {"scale": scale, "steps": steps, "seconds": dict(seconds), "predicted": predicted}


def describe_plan(plan: Mapping[str, Any], minutes: float) -> str:
    per_step = ", ".join(f"{name} {s:.2f} s" for name, s in plan["seconds"].items())
    steps = plan["steps"]
    schedule = f"teacher {steps['teacher']}, students {steps['student']} steps"
    if plan["scale"] >= 1:
        return f"Budget {minutes:g} min: the reference schedule fits ({schedule}; {per_step})."
    return (
        f"Budget {minutes:g} min: the reference schedule ({TEACHER_STEPS}/{STUDENT_STEPS} steps) "
        f"would train for {plan['predicted'] / 60:.0f} min on this machine ({per_step} a step), "
        f"so it was shortened to {plan['scale']:.0%} of it: {schedule}. "
        "`distill demo --minutes 0` runs the reference schedule."
    )


def verdict(rows: dict[str, dict[str, Any]], teacher_weights: Path) -> str:
    """What the measured numbers show, and what the last full benchmark gave."""
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
        + benchmark_sentence(BENCH_KD)  # what the models of a long schedule give
    )


def benchmark_sentence(path: Path) -> str:
    """What the long teacher schedule gave in the last full ``scripts/bench_kd.py`` run, read
    from its committed JSON and labelled as such, with its date ("" when there is none)."""
    try:
        result = json.loads(path.read_text())
        if result.get("quick"):
            return ""
        models = result["models"]
        teacher, plain, kd = (models[k] for k in ("teacher", "student", "student + KD"))
        return (
            f" Not measured in this run: in the committed benchmark (results/{path.name}, run "
            f"{result['date'][:10]} on {result['machine']['cpu']}), a teacher trained for "
            f"{teacher['train_minutes']:.0f} min "
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
