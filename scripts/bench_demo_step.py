"""What a training step of each demo model costs on this host, for the levers that could make the
demo cheaper (issue 34): image size, batch size, the teacher's head (v1 or v2). Each row times
the demo's own configs (configs/demo/*.yaml with the row's changes) through ``distill demo``'s
probe (the loop's ``train_step``; the distilled student's includes the teacher forward), the
median of ``--steps`` steps after one warm-up, on a small copy of the demo's task at the row's
size. ``train.mixed_precision`` stays ``auto``: bf16 where native, fp32 elsewhere.

    python scripts/bench_demo_step.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python scripts/bench_demo_step.py \\
        --out results/bench_demo_step-avx2.json      # an AVX2-only host, imitated

"reference min" is what the demo's reference schedule (teacher 500 steps, students 600 in
lockstep) would train for at these step costs; the demo's budget leaves 0.85 x 15 = 12.75 min
for training. Writes ``results/bench_demo_step.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path
from typing import Any

from distill.config import replace
from distill.data.shapes import generate_shapes
from distill.device import native_bf16
from distill.experiments import demo
from distill.experiments.machine import instruction_set_caps, machine, publish

REPO = Path(__file__).resolve().parents[1]
# row -> (image size, config changes); the first row is the demo as it is
ROWS: dict[str, tuple[int, dict[str, Any]]] = {
    "96 px, batch 8, v2 head (the demo)": (96, {}),
    "96 px, batch 8, v1 head": (96, {"teacher.arch": "retinanet_resnet50_fpn"}),
    "96 px, batch 4, v2 head": (96, {"data.batch_size": 4}),
    "64 px, batch 8, v2 head": (64, {}),
    "64 px, batch 4, v2 head": (64, {"data.batch_size": 4}),
}


def reference_minutes(seconds: dict[str, float]) -> float:
    """Training minutes of the demo's reference schedule at these seconds per step."""
    return demo.reference_seconds(seconds) / 60


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
        seconds = demo.probe_seconds(configs, steps=args.steps)
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
