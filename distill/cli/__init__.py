"""The ``distill`` command.

    distill data shapes OUT [--train N --val N --size PX --seed S --difficulty PRESET]
    distill data stats ROOT [--ann train.json]
    distill data convert yolo|voc SOURCE OUT [--split S] [--classes A,B] [--copy] [--overwrite]
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
    distill sweep CONFIG --grid KEY=V1,V2,... [--with-baseline] [--sequential]
    distill search CONFIG --space KEY=LOW..HIGH[:log] ... --rungs S1,S2,... [--trials N]
                   [--storage URL --study NAME --seed S --out DIR --group N --confirm S]
                   [--no-prune]
    distill demo [--out DIR --data DIR --teacher FILE --minutes M --record FILE]
    distill report RUN_DIR... [--teacher RUN_DIR_OR_WEIGHTS] [--baseline RUN_DIR...] --out DIR

Each command is a handler, ``_<command>(args) -> int``, registered with its parser in
``build_parser`` (the arguments are declared in ``distill.cli.args``): a thin layer over a library
function. Errors a user can fix (a missing file, a bad config key) are printed as one line and
exit with status 2.

Project modules are imported at the top, except those that load TensorBoard (all that import
``distill.engine.build``) or matplotlib (``distill.report.collect``): at the top they add 0.7-1.1 s
(x1.16-1.22) to ``distill --help`` on a 2-core CPU. Each such import says which it loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distill.cli import args as cli_args
from distill.config import Config, ConfigError, load_config
from distill.data.coco import DatasetError
from distill.data.convert import convert_dataset
from distill.data.shapes import generate_shapes
from distill.data.stats import format_stats
from distill.deploy import latency
from distill.deploy.export import export_command
from distill.deploy.onnx_runtime import ExportError, MissingExtraError
from distill.deploy.predict import PredictError, predict_images
from distill.deploy.rebuild import card_config, find_weights
from distill.device import process_state
from distill.engine.checkpoint import CheckpointError
from distill.evaluation import cost  # by module: tests replace cost.summarize
from distill.evaluation.evaluate import eval_command
from distill.fileio import FileFormatError, write_text_atomic
from distill.models.weights import WeightsError
from distill.report.model import ReportError

Handler = Callable[[argparse.Namespace], int]


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_onnx_first(list(sys.argv[1:] if argv is None else argv)))
    # after parsing: --help and usage errors skip it
    # lazy: loads TensorBoard (through distill.engine.build), ~0.3 s of start-up
    from distill.engine.loop import NonFiniteLoss, TrainingStopped

    handler: Handler = args.handler
    try:
        return handler(args)
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


def build_parser() -> argparse.ArgumentParser:
    """The parser; each command's parser holds its handler as the default of ``args.handler``."""
    parser = argparse.ArgumentParser(
        prog="distill", description="Knowledge distillation for dense object detectors."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = cli_args.add_data(sub)
    cli_args.add_data_shapes(data).set_defaults(handler=_data_shapes)
    cli_args.add_data_stats(data).set_defaults(handler=_data_stats)
    cli_args.add_data_convert(data).set_defaults(handler=_data_convert)
    cli_args.add_train_teacher(sub).set_defaults(handler=_train_teacher)
    cli_args.add_run(sub).set_defaults(handler=_run)
    cli_args.add_check(sub).set_defaults(handler=_check_command)
    cli_args.add_eval(sub).set_defaults(handler=_eval)
    cli_args.add_predict(sub).set_defaults(handler=_predict)
    cli_args.add_export(sub).set_defaults(handler=_export)
    cli_args.add_summary(sub).set_defaults(handler=_summary)
    cli_args.add_sweep(sub).set_defaults(handler=_sweep)
    cli_args.add_search(sub).set_defaults(handler=_search)
    cli_args.add_demo(sub).set_defaults(handler=_demo)
    cli_args.add_report(sub).set_defaults(handler=_report)
    return parser


def _last_line(err: Exception) -> str:
    """The message; for an error raised in a DataLoader worker, without the worker's traceback
    (torch puts it in the message): its last line, the error itself."""
    text = str(err)
    return text.rstrip().splitlines()[-1] if "Original Traceback" in text else text


def _data_shapes(args: argparse.Namespace) -> int:
    generate_shapes(
        args.out,
        num_train=args.train,
        num_val=args.val,
        size=args.size,
        seed=args.seed,
        difficulty=args.difficulty,
    )
    print(format_stats(args.out, ["train.json", "val.json"], "images"))
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    print(format_stats(args.root, args.ann or ["train.json", "val.json"], args.images))
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    classes = args.classes.split(",") if args.classes else None
    written = convert_dataset(
        args.format, args.source, args.out, splits=args.splits, classes=classes,
        copy_images=args.copy, overwrite=args.overwrite,
    )  # fmt: skip
    print(format_stats(args.out, [p.name for p in written], "images"))
    return 0


def _train_teacher(args: argparse.Namespace) -> int:
    # lazy: loads TensorBoard (through distill.engine.build), ~0.3 s of start-up
    from distill.engine.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, job="teacher", resume=args.resume, fallback=args.resume_fallback)
    return 0


def _run(args: argparse.Namespace) -> int:
    # lazy: loads TensorBoard (through distill.engine.build), ~0.3 s of start-up
    from distill.engine.loop import train
    from distill.engine.preflight import RUN_SAMPLE

    cfg = load_config(args.config, args.overrides)
    report: dict[str, Any] | None = None
    if args.resume is None and not args.no_check:
        # the teacher's mAP on a few images, unless a distill check of the same teacher and
        # data left its verdict in the run directory
        report = _check(cfg, RUN_SAMPLE, reuse=Path(cfg.output.dir) / "check.json")
        if report["failed"] and not args.force:
            raise UserError(
                f"{', '.join(report['failed'])}: a check of the setup failed (above): fix "
                "it, or add --force to train anyway"
            )
    train(cfg, job="student", resume=args.resume, fallback=args.resume_fallback, check=report)
    return 0


def _check_command(args: argparse.Namespace) -> int:
    if args.sample < 0:
        raise UserError(f"--sample {args.sample}: give a number of images >= 0")
    cfg = load_config(args.config, args.overrides)
    found = _check(cfg, args.sample)
    out = args.out or Path(cfg.output.dir) / "check.json"
    if process_state().is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(found, indent=2) + "\n")
    # a launcher stops every process when one exits with an error: none leaves before the file
    # is written
    process_state().wait_for_everyone()
    return 1 if found["failed"] else 0


def _check(cfg: Config, sample: int, reuse: Path | None = None) -> dict[str, Any]:
    """The checks of ``distill check``, run once (on the main process of a launch, the others
    wait); prints their table there and returns them as ``check.json`` holds them."""
    # lazy: loads TensorBoard (through distill.engine.build), ~0.3 s of start-up
    from distill.engine.preflight import Finding, check_once, format_findings

    report = check_once(cfg, sample, reuse)
    if process_state().is_main_process:
        print(format_findings([Finding(**f) for f in report["findings"]]), file=sys.stderr)
    return report


def _eval(args: argparse.Namespace) -> int:
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


def _run_config(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """``distill eval RUN_DIR_OR_WEIGHTS``: the run's config.yaml (it names the validation set)
    and the weights file."""
    weights = find_weights(args.config, (args.model or ["student"])[0])
    config = weights.parent / "config.yaml"
    if not config.is_file():
        raise UserError(
            f"{weights}: evaluation needs the validation set, and there is no config.yaml beside "
            f"it; give a config: distill eval CONFIG --weights {weights}"
        )
    return load_config(config, args.overrides), [str(weights)]


def _predict(args: argparse.Namespace) -> int:
    for flag, value in (("--score-thresh", args.score_thresh), ("--draw-thresh", args.draw_thresh)):
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


def _onnx_first(argv: list[str]) -> list[str]:
    """``predict --onnx FILE INPUT...``: FILE takes CONFIG's place (argparse cannot leave a
    positional out in the middle of options), ``predict FILE.onnx INPUT...`` is the same."""
    if argv[:1] == ["predict"] and "--onnx" in argv[:-1]:
        i = argv.index("--onnx")
        return ["predict", argv[i + 1], *argv[1:i], *argv[i + 2 :]]
    return argv


def _predict_source(args: argparse.Namespace) -> tuple[Config, str, list[Path]]:
    """(config, weights, inputs) of ``distill predict``: CONFIG is a YAML config (with
    --weights), a run directory or a weights file with its card; with --onnx there is none."""
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


def _names_weights(args: argparse.Namespace) -> bool:
    """Whether CONFIG is a run directory or a weights file rather than a YAML config; then
    --weights must not name the weights a second time."""
    if not (args.config.is_dir() or args.config.suffix not in (".yaml", ".yml")):
        return False
    if args.weights:
        raise UserError(f"--weights: {args.config} already names the weights; drop one")
    return True


def _export(args: argparse.Namespace) -> int:
    if args.fmt != "onnx":
        raise UserError(f"--format {args.fmt}: unknown format; known: onnx")
    export_command(args.path, args.model, args.fmt, args.out, args.raw)
    return 0


def _summary(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    result = cost.summarize(cfg) if args.no_deploy else latency.summarize_deployed(cfg)
    print(json.dumps(result, indent=2) if args.json else latency.format_deployed(result))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    # lazy: loads TensorBoard (through distill.engine.build), ~0.3 s of start-up
    from distill.experiments.sweep import sweep_command

    sweep_command(
        load_config(args.config, args.overrides),
        args.grid,
        with_baseline=args.with_baseline,
        sequential=args.sequential,
        config_path=args.config,
        overrides=args.overrides,
    )
    return 0


def _search(args: argparse.Namespace) -> int:
    # lazy: loads TensorBoard (through distill.engine.build) and optuna, ~0.6 s of start-up
    from distill.search import parse_rungs
    from distill.search.command import SearchArgs, search_command

    rungs = parse_rungs(args.rungs) if args.rungs is not None else None
    best = search_command(
        SearchArgs(
            config=args.config, overrides=tuple(args.overrides), space=tuple(args.space),
            trials=args.trials, rungs=rungs, storage=args.storage, study=args.study,
            seed=args.seed, out=args.out, group=args.group, prune=args.prune,
            confirm=args.confirm,
        )
    )  # fmt: skip
    if best is not None:
        print(f"best: {best} (distill run {best})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    # lazy: loads TensorBoard (through distill.engine.build), ~0.3 s of start-up
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


def _report(args: argparse.Namespace) -> int:
    # lazy: loads matplotlib (through distill.report.figures), ~0.6 s of start-up
    from distill.report.collect import report_command

    try:
        report_command(
            args.runs, args.out, args.teacher, args.baseline, args.overrides,
            args.images, args.random_images, args.min_score, args.precision, args.resamples,
        )  # fmt: skip
    except ReportError as err:
        raise UserError(str(err)) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
