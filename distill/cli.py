"""The ``distill`` command.

    distill data shapes OUT [--train N --val N --size PX --seed S --difficulty PRESET]
    distill data stats ROOT [--ann train.json]
    distill train-teacher CONFIG [--set key=value ...] [--resume RUN_DIR]
    distill run CONFIG [--set key=value ...] [--resume RUN_DIR]
    distill eval CONFIG --weights FILE [--model student|teacher] [--out FILE]
    distill summary CONFIG [--json]
    distill demo [--out DIR --data DIR --teacher FILE --minutes M --record FILE]

Each sub-command is a thin layer over a library function; errors a user can fix (a missing
file, a bad config key) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from distill.checkpoint import CheckpointError
from distill.config import ConfigError, load_config
from distill.data.coco import DatasetError
from distill.data.shapes import BENCHMARK_TRAIN, BENCHMARK_VAL, generate_shapes


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )


FALLBACK_HELP = "if the last checkpoint is missing or corrupt, resume from the previous whole one"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", description="Knowledge distillation for dense object detectors."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make or inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    shapes = data_sub.add_parser("shapes", help="generate the built-in shapes benchmark")
    shapes.add_argument("out", type=Path)
    shapes.add_argument("--train", type=int, default=BENCHMARK_TRAIN, help="training images")
    shapes.add_argument("--val", type=int, default=BENCHMARK_VAL, help="validation images")
    shapes.add_argument("--size", type=int, default=128, help="image side in pixels")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--difficulty", default="easy", choices=["easy", "medium", "hard", "demo"])
    stats = data_sub.add_parser("stats", help="print statistics of a COCO-format dataset")
    stats.add_argument("root", type=Path)
    stats.add_argument("--ann", action="append", default=None, help="annotation file(s) in ROOT")
    stats.add_argument("--images", default="images", help="image folder in ROOT")

    teacher = sub.add_parser("train-teacher", help="train the teacher architecture (no KD)")
    _add_config_args(teacher)
    teacher.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR")
    teacher.add_argument("--resume-fallback", action="store_true", help=FALLBACK_HELP)

    run = sub.add_parser("run", help="train a student, distilled from the teacher")
    _add_config_args(run)
    run.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR")
    run.add_argument("--resume-fallback", action="store_true", help=FALLBACK_HELP)

    ev = sub.add_parser("eval", help="COCO mAP of a student and/or teacher checkpoint")
    _add_config_args(ev)
    ev.add_argument("--weights", action="append", required=True, metavar="FILE")
    ev.add_argument(
        "--model",
        action="append",
        choices=["student", "teacher"],
        default=None,
        help="which architecture each --weights is (default student); repeat to compare",
    )
    ev.add_argument("--out", type=Path, default=None, help="write the metrics as JSON")

    summ = sub.add_parser("summary", help="params, GFLOPs and latency of teacher and student")
    _add_config_args(summ)
    summ.add_argument("--json", action="store_true")

    sweep = sub.add_parser("sweep", help="grid over config keys")
    _add_config_args(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    sweep.add_argument("--with-baseline", action="store_true")
    sweep.add_argument("--sequential", action="store_true")

    demo = sub.add_parser("demo", help="distillation end to end on CPU in ~15 min (the demo task)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--data", type=Path, default=Path("data/shapes-demo"))
    demo.add_argument("--teacher", type=Path, default=None, help="reuse this teacher.pt")
    demo.add_argument(
        "--minutes",
        type=float,
        default=15.0,
        help="time budget: the schedule shrinks to fit it on this machine (0: the reference "
        "schedule, 1000 teacher and 600 student steps)",
    )
    demo.add_argument(
        "--record", type=Path, default=None, metavar="FILE", help="also write the result as JSON"
    )
    return parser


def _last_line(err: Exception) -> str:
    """The message; for an error raised in a DataLoader worker, without the worker's traceback
    (torch puts it in the message): its last line, the error itself."""
    text = str(err)
    return text.rstrip().splitlines()[-1] if "Original Traceback" in text else text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distill.train import NonFiniteLoss, TrainingStopped
    from distill.weights import WeightsError

    try:
        return _dispatch(args)
    except (
        ConfigError,
        UserError,
        DatasetError,
        CheckpointError,
        WeightsError,
        FileNotFoundError,
        FileExistsError,
    ) as err:
        print(f"distill: error: {_last_line(err)}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # a signal: the state is saved, --resume continues
        print(f"distill: {err}", file=sys.stderr)
        return 3
    except NonFiniteLoss as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data" and args.data_command == "shapes":
        generate_shapes(
            args.out,
            num_train=args.train,
            num_val=args.val,
            size=args.size,
            seed=args.seed,
            difficulty=args.difficulty,
        )
        from distill.data.stats import format_stats

        print(format_stats(args.out, ["train.json", "val.json"], "images"))
        return 0
    if args.command == "data" and args.data_command == "stats":
        from distill.data.stats import format_stats

        print(format_stats(args.root, args.ann or ["train.json", "val.json"], args.images))
        return 0
    if args.command == "summary":
        from distill.summary import format_summary, summarize

        cfg = load_config(args.config, args.overrides)
        result = summarize(cfg)
        if args.json:
            import json

            print(json.dumps(result, indent=2))
        else:
            print(format_summary(result))
        return 0
    if args.command in ("train-teacher", "run"):
        from distill.train import train

        cfg = load_config(args.config, args.overrides)
        job = "teacher" if args.command == "train-teacher" else "student"
        train(cfg, job=job, resume=args.resume, fallback=args.resume_fallback)
        return 0
    if args.command == "eval":
        from distill.evaluate import eval_command

        cfg = load_config(args.config, args.overrides)
        models = args.model or ["student"] * len(args.weights)
        if len(models) != len(args.weights):
            raise UserError("give one --model per --weights (or none: all are students)")
        eval_command(cfg, list(zip(models, args.weights)), out=args.out)
        return 0
    if args.command == "sweep":
        from distill.sweep import sweep_command

        cfg = load_config(args.config, args.overrides)
        sweep_command(
            cfg,
            args.grid,
            with_baseline=args.with_baseline,
            sequential=args.sequential,
            config_path=args.config,
            overrides=args.overrides,
        )
        return 0
    if args.command == "demo":
        from distill.demo import demo

        if args.teacher is not None and not args.teacher.is_file():
            raise UserError(f"--teacher {args.teacher}: no such file (a teacher.pt to reuse)")
        if not args.minutes >= 0:  # also NaN
            raise UserError(f"--minutes {args.minutes}: give a budget >= 0 (0: no budget)")
        if args.record is not None and (args.record.is_dir() or not args.record.parent.is_dir()):
            raise UserError(f"--record {args.record}: give a .json file path in an existing folder")
        demo(
            out=args.out,
            data_root=args.data,
            teacher=args.teacher,
            minutes=args.minutes,
            record=args.record,
        )
        return 0
    raise AssertionError(args)


if __name__ == "__main__":
    raise SystemExit(main())
