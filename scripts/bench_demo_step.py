"""What a training step of each demo model costs on this host, for the levers that could make the
demo cheaper (issue 34): image size, batch size, the teacher's head (v1 or v2). Each row times
the demo's own configs (configs/demo/*.yaml with the row's changes) through the loop's
``train_step`` (the distilled student's includes the teacher forward), each model alone, the
median of ``--steps`` steps after one warm-up, on a small copy of the demo's task at the row's
size. (The demo itself plans with what its runs cost as they train, the students in lockstep:
``distill.experiments.costs``.) ``train.mixed_precision`` stays ``auto``: bf16 where native,
fp32 elsewhere.

    python scripts/bench_demo_step.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python scripts/bench_demo_step.py \\
        --out results/bench_demo_step-avx2.json      # an AVX2-only host, imitated

"reference min" is what the demo's reference schedule (teacher 500 steps, students 600 in
lockstep) would train for at these step costs. Writes ``results/bench_demo_step.json`` and
prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distill.config import Config, replace
from distill.data.shapes import generate_shapes
from distill.device import native_bf16
from distill.engine.build import build_accelerator, build_train_loader, build_trainee
from distill.engine.step import teacher_forward, train_step
from distill.experiments import demo
from distill.experiments.machine import instruction_set_caps, machine, publish
from distill.models.retinanet import build_transform

REPO = Path(__file__).resolve().parents[1]
# row -> (image size, config changes); the first row is the demo as it is
ROWS: dict[str, tuple[int, dict[str, Any]]] = {
    "96 px, batch 8, v2 head (the demo)": (96, {}),
    "96 px, batch 8, v1 head": (96, {"teacher.arch": "retinanet_resnet50_fpn"}),
    "96 px, batch 4, v2 head": (96, {"data.batch_size": 4}),
    "64 px, batch 8, v2 head": (64, {}),
    "64 px, batch 4, v2 head": (64, {"data.batch_size": 4}),
}


def probe_seconds(configs: Mapping[str, Config], steps: int = 3) -> dict[str, float]:
    """Seconds per training step of each demo model alone: the median of ``steps`` steps after
    one warm-up step, on one real batch, through the loop's own ``train_step`` (and
    ``teacher_forward`` for the distilled student, so that the two students' sum is the cost of
    one lockstep step). The teacher has random weights here: its cost does not depend on them."""

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
                if frozen is not None:  # the distilled student
                    teacher_out = teacher_forward(accelerator, frozen, image_list, [t.terms])
                train_step(accelerator, t, image_list, batch_targets, teacher_out, step, 0)
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize(accelerator.device)
                times.append(time.perf_counter() - tic)
            if t.writer is not None:
                t.writer.close()
            seconds[name] = statistics.median(times[1:])
    return seconds


def reference_seconds(seconds: Mapping[str, float]) -> float:
    """Seconds the reference schedule of the models in ``seconds`` trains for, at those seconds
    per step."""
    reference = demo.reference_steps()
    return sum(reference[name] * s for name, s in seconds.items())


def reference_minutes(seconds: dict[str, float]) -> float:
    """Training minutes of the demo's reference schedule at these seconds per step."""
    return reference_seconds(seconds) / 60


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    rows = {}
    for name, (size, changes) in ROWS.items():
        data = args.data / f"{size}px"
        generate_shapes(
            data, num_train=64, num_val=8, size=size, seed=0, difficulty=demo.DEMO_DIFFICULTY
        )
        configs = {
            model: replace(cfg, **{"data.image_size": size, **changes})
            for model, cfg in demo.demo_configs(args.data / "runs", data, Path("unused.pt")).items()
        }
        seconds = probe_seconds(configs, steps=args.steps)
        rows[name] = {
            "image_size": size,
            "changes": changes,
            "seconds": seconds,
            "reference_minutes": reference_minutes(seconds),
        }
        print(f"{name}: " + ", ".join(f"{m} {s:.3f} s" for m, s in seconds.items()), flush=True)
    return {
        "rows": rows,
        "precision": "bf16" if native_bf16() else "fp32",  # what `auto` chose here
        "steps": args.steps,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [
                *instruction_set_caps(),
                "python scripts/bench_demo_step.py",
                *map(shlex.quote, argv),
            ]
        ),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"Seconds a training step ({result['precision']}, median of {result['steps']}):\n",
        "| demo models at | teacher | student | student + KD | reference schedule (min) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        s = row["seconds"]
        lines.append(
            f"| {name} | {s['teacher']:.3f} | {s['student']:.3f} | {s['student + KD']:.3f} "
            f"| {row['reference_minutes']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "runs" / "bench_demo_step")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_demo_step.json")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up")
    args = parser.parse_args(argv)
    result = run(args, argv)
    publish(result, args.out, format_table(result))
    return result


if __name__ == "__main__":
    main()
