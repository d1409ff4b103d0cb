"""The ``distill`` command.

    distill data shapes OUT [--train N --val N --size PX --seed S --difficulty PRESET]
    distill data stats ROOT [--ann train.json]
    distill train-teacher CONFIG [--set key=value ...] [--resume RUN_DIR]
    distill run CONFIG [--set key=value ...] [--resume RUN_DIR] [--no-check | --force]
    distill check CONFIG [--set key=value ...] [--sample N] [--out FILE]
    distill eval CONFIG --weights FILE [--model student|teacher] [--out FILE]
    distill eval RUN_DIR_OR_WEIGHTS [--model student|teacher] [--out FILE]
    distill predict CONFIG --weights FILE [--model student|teacher] INPUT... --out DIR [--draw]
                    [--score-thresh X] [--draw-thresh Y] [--precision P] [--batch-size N]
    distill predict RUN_DIR_OR_WEIGHTS [--model student|teacher] INPUT... --out DIR [...]
    distill predict --onnx FILE INPUT... --out DIR [...]
    distill export RUN_DIR_OR_WEIGHTS [--model student|teacher] [--format onnx] [--out FILE]
                   [--raw]
    distill summary CONFIG [--json] [--no-deploy]
    distill demo [--out DIR --data DIR --teacher FILE --minutes M --record FILE]
    distill report RUN_DIR... [--teacher RUN_DIR_OR_WEIGHTS] [--baseline RUN_DIR] --out DIR

Each sub-command is a thin layer over a library function; errors a user can fix (a missing
file, a bad config key) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.config import Config, ConfigError, load_config
from distill.data.coco import DatasetError
from distill.data.shapes import (
    BENCHMARK_TRAIN,
    BENCHMARK_VAL,
    DEMO_DATA,
    DEMO_OUT,
    generate_shapes,
)
from distill.engine.checkpoint import CheckpointError
from distill.fileio import FileFormatError, write_text_atomic


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def _add_config_args(p: argparse.ArgumentParser, help: str = "YAML config file") -> None:
    p.add_argument("config", type=Path, help=help)
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
    run.add_argument(
        "--no-check",
        action="store_true",
        help="skip the checks of the setup before training (see distill check)",
    )
    run.add_argument(
        "--force", action="store_true", help="train even if a check of the setup fails"
    )

    chk = sub.add_parser(
        "check", help="before a run: teacher, classes, shapes and KD magnitudes on your data"
    )
    _add_config_args(chk)
    chk.add_argument(
        "--sample",
        type=int,
        default=50,
        metavar="N",
        help="validation images the teacher's mAP is measured on (0: skip that check)",
    )
    chk.add_argument(
        "--out", type=Path, default=None, help="the JSON file (default: OUTPUT_DIR/check.json)"
    )

    ev = sub.add_parser("eval", help="COCO mAP of a student and/or teacher checkpoint")
    _add_config_args(ev)
    ev.add_argument(
        "--weights",
        action="append",
        default=None,
        metavar="FILE",
        help="weights to evaluate with CONFIG (not needed when CONFIG is a run directory or a "
        "weights file: the run's config.yaml beside it names the validation set)",
    )
    ev.add_argument(
        "--model",
        action="append",
        choices=["student", "teacher"],
        default=None,
        help="which architecture each --weights is (default student); repeat to compare",
    )
    ev.add_argument("--out", type=Path, default=None, help="write the metrics as JSON")
    _add_precision_arg(ev)

    pred = sub.add_parser("predict", help="detections of a model on your own images")
    _add_config_args(
        pred, help="YAML config (with --weights), a run directory, a weights file or an .onnx"
    )
    pred.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="weights file (a teacher's may also be a torchvision name); not needed when CONFIG "
        "is a run directory or a weights file with its card",
    )
    pred.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="FILE",
        help="run a model written by distill export with ONNX Runtime, in place of CONFIG",
    )
    pred.add_argument("--model", choices=["student", "teacher"], default="student")
    pred.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders (JPEG, PNG)"
    )
    pred.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="writes DIR/detections.json"
    )
    pred.add_argument(
        "--draw", action="store_true", help="also write each image with its boxes to DIR/drawn/"
    )
    pred.add_argument(
        "--score-thresh",
        type=float,
        default=None,
        metavar="X",
        help="lowest score kept (default: the config's eval.score_threshold)",
    )
    pred.add_argument(
        "--draw-thresh",
        type=float,
        default=0.3,
        metavar="Y",
        help="lowest score drawn with --draw (default 0.3)",
    )
    _add_precision_arg(pred)
    pred.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="images of one size per forward (default 1: each image's detections are exactly "
        "torchvision's model([image]); more is faster on a GPU, equal to the last bits)",
    )

    exp = sub.add_parser(
        "export", help="a trained model to ONNX, checked against PyTorch with ONNX Runtime"
    )
    exp.add_argument("path", type=Path, metavar="RUN_DIR_OR_WEIGHTS")
    exp.add_argument("--model", choices=["student", "teacher"], default="student")
    exp.add_argument("--format", dest="fmt", default="onnx", help="onnx (the only one)")
    exp.add_argument("--out", type=Path, default=None, help="default: the weights' name, .onnx")
    exp.add_argument(
        "--raw",
        action="store_true",
        help="export class logits, box deltas and anchors instead of detections after NMS",
    )

    summ = sub.add_parser("summary", help="params, GFLOPs and latency of teacher and student")
    _add_config_args(summ)
    summ.add_argument("--json", action="store_true")
    summ.add_argument(
        "--no-deploy",
        action="store_true",
        help="skip the ONNX export and the deployed-graph latencies (PyTorch, ONNX Runtime)",
    )

    sweep = sub.add_parser("sweep", help="grid over config keys")
    _add_config_args(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    sweep.add_argument("--with-baseline", action="store_true")
    sweep.add_argument("--sequential", action="store_true")

    demo = sub.add_parser("demo", help="distillation end to end on CPU in ~15 min (the demo task)")
    demo.add_argument("--out", type=Path, default=DEMO_OUT, help="where the runs go")
    demo.add_argument(
        "--data", type=Path, default=DEMO_DATA, help="where the demo's task is made (once)"
    )
    demo.add_argument("--teacher", type=Path, default=None, help="reuse this teacher.pt")
    demo.add_argument(
        "--minutes",
        type=float,
        default=15.0,
        help="time budget: the schedule shrinks to fit it on this machine (0: the reference "
        "schedule, 500 teacher and 600 student steps)",
    )
    demo.add_argument(
        "--record", type=Path, default=None, metavar="FILE", help="also write the result as JSON"
    )
    _add_report_parser(sub)
    return parser


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="HTML report: teacher, plain and distilled students")
    rep.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="runs or sweep dirs")
    rep.add_argument("--teacher", default=None, metavar="RUN_DIR_OR_WEIGHTS")
    rep.add_argument("--baseline", type=Path, default=None, metavar="RUN_DIR")
    rep.add_argument("--out", type=Path, required=True, metavar="DIR")
    rep.add_argument("--images", type=int, default=4, help="images where the models differ most")
    rep.add_argument("--random-images", type=int, default=2, help="images chosen at random")
    rep.add_argument("--min-score", type=float, default=0.3, help="score of a drawn detection")
    rep.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a key of every run's config")  # fmt: skip
    _add_precision_arg(rep)


def _add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """``--precision`` of an inference command: its own, not the config's training precision."""
    parser.add_argument(
        "--precision",
        choices=["no", "fp16", "bf16", "auto"],
        default=None,
        help="inference precision (default no: float32, as torchvision's published numbers); "
        "the config's train.mixed_precision is a training setting and is not used",
    )


def _last_line(err: Exception) -> str:
    """The message; for an error raised in a DataLoader worker, without the worker's traceback
    (torch puts it in the message): its last line, the error itself."""
    text = str(err)
    return text.rstrip().splitlines()[-1] if "Original Traceback" in text else text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_onnx_first(list(sys.argv[1:] if argv is None else argv)))
    # imported here, not at the top: keeps the CLI's start-up fast
    from distill.deploy.onnx_runtime import ExportError, MissingExtraError
    from distill.deploy.predict import PredictError
    from distill.engine.loop import NonFiniteLoss, TrainingStopped
    from distill.models.weights import WeightsError

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
        MissingExtraError,
        PredictError,
        FileFormatError,
    ) as err:
        print(f"distill: error: {_last_line(err)}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # a signal: the state is saved, --resume continues
        print(f"distill: {err}", file=sys.stderr)
        return 3
    except (NonFiniteLoss, ExportError) as err:
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
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.data.stats import format_stats

        print(format_stats(args.out, ["train.json", "val.json"], "images"))
        return 0
    if args.command == "data" and args.data_command == "stats":
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.data.stats import format_stats

        print(format_stats(args.root, args.ann or ["train.json", "val.json"], args.images))
        return 0
    if args.command == "summary":
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.deploy.latency import format_deployed, summarize_deployed
        from distill.evaluation.cost import summarize

        cfg = load_config(args.config, args.overrides)
        result = summarize(cfg) if args.no_deploy else summarize_deployed(cfg)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(format_deployed(result))
        return 0
    if args.command == "check":
        if args.sample < 0:
            raise UserError(f"--sample {args.sample}: give a number of images >= 0")
        cfg = load_config(args.config, args.overrides)
        found = _check(cfg, args.sample)
        out = args.out or Path(cfg.output.dir) / "check.json"
        if int(os.environ.get("RANK", "0")) == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, json.dumps(found, indent=2) + "\n")
        return 1 if found["failed"] else 0
    if args.command in ("train-teacher", "run"):
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.engine.loop import train

        cfg = load_config(args.config, args.overrides)
        job = "teacher" if args.command == "train-teacher" else "student"
        report: dict[str, Any] | None = None
        if job == "student" and args.resume is None and not args.no_check:
            report = _check(cfg, 0)  # written to the run's check.json once it has started
            if report["failed"] and not args.force:
                raise UserError(
                    f"{', '.join(report['failed'])}: a check of the setup failed (above): fix "
                    "it, or add --force to train anyway"
                )
        train(cfg, job=job, resume=args.resume, fallback=args.resume_fallback, check=report)
        return 0
    if args.command == "eval":
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.evaluation.evaluate import eval_command

        if _names_weights(args):
            cfg, args.weights = _run_config(args)
        elif not args.weights:
            raise UserError("--weights FILE: required with a config (or give a run directory)")
        else:
            cfg = load_config(args.config, args.overrides)
        models = args.model or ["student"] * len(args.weights)
        if len(models) != len(args.weights):
            raise UserError("give one --model per --weights (or none: all are students)")
        eval_command(cfg, list(zip(models, args.weights)), out=args.out, precision=args.precision)
        return 0
    if args.command == "predict":
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.deploy.predict import predict_images

        for flag, value in (
            ("--score-thresh", args.score_thresh),
            ("--draw-thresh", args.draw_thresh),
        ):
            if value is not None and not 0 <= value <= 1:  # also NaN
                raise UserError(f"{flag} {value}: give a score between 0 and 1")
        if args.batch_size < 1:
            raise UserError(f"--batch-size {args.batch_size}: give a number of images >= 1")
        cfg, weights, inputs = _predict_source(args)
        summary = predict_images(
            cfg,
            weights,
            inputs,
            args.out,
            kind=args.model,
            draw=args.draw,
            score_threshold=args.score_thresh,
            draw_threshold=args.draw_thresh,
            onnx=args.onnx,
            precision=args.precision,
            batch_size=args.batch_size,
        )
        if summary["predicted"] == 0:
            first = summary["failed"][0]
            others = f" and {len(summary['failed']) - 1} more" if len(summary["failed"]) > 1 else ""
            print(
                f"distill: error: none of the {summary['images']} images could be predicted: "
                f"{first['file']}: {first['reason']}{others} (all in {args.out / 'summary.json'})",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.command == "export":
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.deploy.export import export_command

        if args.fmt != "onnx":
            raise UserError(f"--format {args.fmt}: unknown format; known: onnx")
        export_command(args.path, args.model, args.fmt, args.out, args.raw)
        return 0
    if args.command == "sweep":
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.experiments.sweep import sweep_command

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
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.experiments.demo import demo

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
    if args.command == "report":
        # imported here, not at the top: keeps the CLI's start-up fast
        from distill.report.collect import report_command
        from distill.report.model import ReportError

        try:
            report_command(
                args.runs, args.out, args.teacher, args.baseline, args.overrides,
                args.images, args.random_images, args.min_score, args.precision,
            )  # fmt: skip
        except ReportError as err:
            raise UserError(str(err)) from None
        return 0
    raise AssertionError(args)


def _check(cfg: Config, sample: int) -> dict[str, Any]:
    """The checks of ``distill check``; prints their table (on the main process of a launch)
    and returns them as ``check.json`` holds them: findings, the failed checks' names, sample."""
    # imported here, not at the top: keeps the CLI's start-up fast
    from distill.engine.preflight import check_setup, failures, format_findings

    findings = check_setup(cfg, sample)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_findings(findings), file=sys.stderr)
    return {
        "findings": [dataclasses.asdict(f) for f in findings],
        "failed": [f.check for f in failures(findings)],
        "sample": sample,
    }


def _onnx_first(argv: list[str]) -> list[str]:
    """``predict --onnx FILE INPUT...``: FILE takes CONFIG's place (argparse cannot leave a
    positional out in the middle of options), ``predict FILE.onnx INPUT...`` is the same."""
    if argv[:1] == ["predict"] and "--onnx" in argv[:-1]:
        i = argv.index("--onnx")
        return ["predict", argv[i + 1], *argv[1:i], *argv[i + 2 :]]
    return argv


def _names_weights(args: argparse.Namespace) -> bool:
    """Whether CONFIG is a run directory or a weights file rather than a YAML config; then
    --weights must not name the weights a second time."""
    if not (args.config.is_dir() or args.config.suffix not in (".yaml", ".yml")):
        return False
    if args.weights:
        raise UserError(f"--weights: {args.config} already names the weights; drop one")
    return True


def _run_config(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """``distill eval RUN_DIR_OR_WEIGHTS``: the run's config.yaml (it names the validation set)
    and the weights file."""
    # imported here, not at the top: keeps the CLI's start-up fast
    from distill.deploy.rebuild import find_weights

    kind = (args.model or ["student"])[0]
    weights = find_weights(args.config, kind)
    config = weights.parent / "config.yaml"
    if not config.is_file():
        raise UserError(
            f"{weights}: evaluation needs the validation set, and there is no config.yaml beside "
            f"it; give a config: distill eval CONFIG --weights {weights}"
        )
    return load_config(config, args.overrides), [str(weights)]


def _predict_source(args: argparse.Namespace) -> tuple[Config, str, list[Path]]:
    """(config, weights, inputs) of ``distill predict``: CONFIG is a YAML config (with
    --weights), a run directory or a weights file with its card; with --onnx there is none."""
    # imported here, not at the top: keeps the CLI's start-up fast
    from distill.deploy.rebuild import card_config

    if args.config.suffix == ".onnx":
        if args.precision is not None:
            raise UserError(
                f"--precision {args.precision}: {args.config} runs in ONNX Runtime in the "
                "precision it was exported in; --precision is for PyTorch weights"
            )
        args.onnx = args.config
        return Config(), "", args.inputs
    if _names_weights(args):
        if args.overrides:
            raise UserError("--set changes a YAML config; give one instead of a run directory")
        cfg, weights = card_config(args.config, args.model)
        return cfg, str(weights), args.inputs
    if args.weights is None:
        raise UserError("--weights FILE: required with a config (or give a run directory)")
    return load_config(args.config, args.overrides), args.weights, args.inputs


if __name__ == "__main__":
    raise SystemExit(main())
