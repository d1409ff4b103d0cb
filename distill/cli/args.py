"""The arguments of the ``distill`` commands: one ``add_<command>`` function per command, which
adds the command's parser to the sub-commands and returns it; ``distill.cli.build_parser`` sets
its handler. Declarations only: what a command does with its arguments is in ``distill.cli``."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.data.shapes import BENCHMARK_TRAIN, BENCHMARK_VAL, DEMO_DATA, DEMO_OUT

Subparsers = argparse._SubParsersAction  # what ``add_subparsers`` returns

FALLBACK_HELP = "if the last checkpoint is missing or corrupt, resume from the previous whole one"


def add_data(sub: Subparsers) -> Subparsers:
    """``distill data``; returns its sub-commands (shapes, stats, ...)."""
    data = sub.add_parser("data", help="make or inspect datasets")
    return data.add_subparsers(dest="data_command", required=True)


def add_data_shapes(data_sub: Subparsers) -> argparse.ArgumentParser:
    p = data_sub.add_parser("shapes", help="generate the built-in shapes benchmark")
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=BENCHMARK_TRAIN, help="training images")
    p.add_argument("--val", type=int, default=BENCHMARK_VAL, help="validation images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", default="easy", choices=["easy", "medium", "hard", "demo"])
    return p


def add_data_stats(data_sub: Subparsers) -> argparse.ArgumentParser:
    p = data_sub.add_parser("stats", help="print statistics of a COCO-format dataset")
    p.add_argument("root", type=Path)
    p.add_argument("--ann", action="append", default=None, help="annotation file(s) in ROOT")
    p.add_argument("--images", default="images", help="image folder in ROOT")
    return p


def add_data_convert(data_sub: Subparsers) -> argparse.ArgumentParser:
    p = data_sub.add_parser(
        "convert", help="convert a YOLO or Pascal VOC dataset to a COCO-format dataset"
    )
    p.add_argument("format", choices=["yolo", "voc"])
    p.add_argument(
        "source", type=Path,
        help="yolo: data.yaml or its folder; voc: the folder with Annotations/, JPEGImages/, "
        "ImageSets/Main/",
    )  # fmt: skip
    p.add_argument("out", type=Path, help="folder for <split>.json and images/<split>/")
    p.add_argument(
        "--split", dest="splits", action="append", default=None,
        help="a split to convert (repeatable); default: train, val, test where present",
    )  # fmt: skip
    p.add_argument(
        "--classes", default=None,
        help="voc only: class names in order, comma-separated; default: all names found, sorted",
    )  # fmt: skip
    p.add_argument(
        "--copy", action="store_true",
        help="copy the images into OUT/images instead of linking them",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace the annotation files and images OUT already holds",
    )  # fmt: skip
    return p


def add_train_teacher(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser("train-teacher", help="train the teacher architecture (no KD)")
    add_config_args(p)
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR")
    p.add_argument("--resume-fallback", action="store_true", help=FALLBACK_HELP)
    return p


def add_run(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="train a student, distilled from the teacher")
    add_config_args(p)
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR")
    p.add_argument("--resume-fallback", action="store_true", help=FALLBACK_HELP)
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the checks of the setup before training (see distill check)",
    )
    p.add_argument("--force", action="store_true", help="train even if a check of the setup fails")
    return p


def add_check(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check", help="before a run: teacher, classes, shapes and KD magnitudes on your data"
    )
    add_config_args(p)
    p.add_argument(
        "--sample",
        type=int,
        default=50,
        metavar="N",
        help="validation images the teacher's mAP is measured on (0: skip that check)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="the JSON file (default: OUTPUT_DIR/check.json)"
    )
    return p


def add_eval(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="COCO mAP of a student and/or teacher checkpoint")
    add_config_args(p)
    p.add_argument(
        "--weights",
        action="append",
        default=None,
        metavar="FILE",
        help="weights to evaluate with CONFIG (not needed when CONFIG is a run directory or a "
        "weights file: the run's config.yaml beside it names the validation set)",
    )
    p.add_argument(
        "--model",
        action="append",
        choices=["student", "teacher"],
        default=None,
        help="which architecture each --weights is (default student); repeat to compare",
    )
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON")
    add_precision_arg(p)
    return p


def add_predict(sub: Subparsers) -> argparse.ArgumentParser:
    """``distill predict``; ``distill.cli`` moves ``--onnx FILE`` into CONFIG's place."""
    p = sub.add_parser("predict", help="detections of a model on your own images")
    add_config_args(
        p, help="YAML config (with --weights), a run directory, a weights file or an .onnx"
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="weights file (a teacher's may also be a torchvision name); not needed when CONFIG "
        "is a run directory or a weights file with its card",
    )
    p.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="FILE",
        help="run a model written by distill export with ONNX Runtime, in place of CONFIG",
    )
    p.add_argument("--model", choices=["student", "teacher"], default="student")
    p.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders (JPEG, PNG)"
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="writes DIR/detections.json"
    )
    p.add_argument(
        "--draw", action="store_true", help="also write each image with its boxes to DIR/drawn/"
    )
    p.add_argument(
        "--score-thresh",
        type=float,
        default=None,
        metavar="X",
        help="lowest score kept (default: the config's eval.score_threshold)",
    )
    p.add_argument(
        "--draw-thresh",
        type=float,
        default=0.3,
        metavar="Y",
        help="lowest score drawn with --draw (default 0.3)",
    )
    add_precision_arg(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="images of one size per forward (default 1: each image's detections are exactly "
        "torchvision's model([image]); more is faster on a GPU, equal to the last bits)",
    )
    return p


def add_export(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export", help="a trained model to ONNX, checked against PyTorch with ONNX Runtime"
    )
    p.add_argument("path", type=Path, metavar="RUN_DIR_OR_WEIGHTS")
    p.add_argument("--model", choices=["student", "teacher"], default="student")
    p.add_argument("--format", dest="fmt", default="onnx", help="onnx (the only one)")
    p.add_argument("--out", type=Path, default=None, help="default: the weights' name, .onnx")
    p.add_argument(
        "--raw",
        action="store_true",
        help="export class logits, box deltas and anchors instead of detections after NMS",
    )
    return p


def add_summary(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser("summary", help="params, GFLOPs and latency of teacher and student")
    add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--no-deploy",
        action="store_true",
        help="skip the ONNX export and the deployed-graph latencies (PyTorch, ONNX Runtime)",
    )
    return p


def add_sweep(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="grid over config keys")
    add_config_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    p.add_argument("--with-baseline", action="store_true")
    p.add_argument("--sequential", action="store_true")
    return p


def add_search(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "search", help="find the KD recipe for your data: successive halving in lockstep"
    )
    add_config_args(p)
    p.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=LOW..HIGH[:log] | KEY=A|B|C [@KEY=A|B]",
        help="a searched key (repeatable; over the config's search.space block); @KEY=A|B: "
        "only where that choice is A or B",
    )
    p.add_argument("--trials", type=int, default=None, help="trials in the study (default 12)")
    p.add_argument(
        "--rungs",
        default=None,
        metavar="S1,S2,...",
        help="student steps at which trials are scored and halved; the last is full length",
    )
    p.add_argument("--storage", default=None, metavar="URL", help="Optuna storage (default: "
                   "sqlite in --out); one URL for several workers")  # fmt: skip
    p.add_argument("--study", default=None, metavar="NAME", help="study name in the storage")
    p.add_argument("--seed", type=int, default=None, help="the sampler's seed (one per worker)")
    p.add_argument("--out", type=Path, default=Path("runs/search"), help="output folder")
    p.add_argument("--group", type=int, default=4, help="trials trained together in lockstep")
    p.add_argument(
        "--confirm",
        type=int,
        default=0,
        metavar="S",
        help="then train the best recipe and the plain student on S seeds and report the gain "
        "on the validation set with paired intervals",
    )
    p.add_argument(
        "--no-prune",
        dest="prune",
        action="store_false",
        help="train every trial to full length, scored at every rung (the rungs' fidelity)",
    )
    return p


def add_demo(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="distillation end to end on CPU in ~15 min (the demo task)")
    p.add_argument("--out", type=Path, default=DEMO_OUT, help="where the runs go")
    p.add_argument(
        "--data", type=Path, default=DEMO_DATA, help="where the demo's task is made (once)"
    )
    p.add_argument("--teacher", type=Path, default=None, help="reuse this teacher.pt")
    p.add_argument(
        "--minutes",
        type=float,
        default=15.0,
        help="time budget: the schedule shrinks to fit it on this machine (0: the reference "
        "schedule, 500 teacher and 600 student steps)",
    )
    p.add_argument(
        "--record", type=Path, default=None, metavar="FILE", help="also write the result as JSON"
    )
    return p


def add_report(sub: Subparsers) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="HTML report: teacher, plain and distilled students")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="runs or sweep dirs")
    p.add_argument("--teacher", default=None, metavar="RUN_DIR_OR_WEIGHTS")
    p.add_argument(
        "--baseline",
        type=Path,
        nargs="+",
        default=None,
        metavar="RUN_DIR",
        help="the plain student's run; several: one per train.seed, each student "
        "compared with its seed's, and a recipe on several seeds gets intervals",
    )
    p.add_argument(
        "--resamples",
        type=int,
        default=1000,
        help="bootstrap resamples of the images for the gain over seeds (0: none)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--images", type=int, default=4, help="images where the models differ most")
    p.add_argument("--random-images", type=int, default=2, help="images chosen at random")
    p.add_argument("--min-score", type=float, default=0.3, help="score of a drawn detection")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a key of every run's config")  # fmt: skip
    add_precision_arg(p)
    return p


def add_config_args(p: argparse.ArgumentParser, help: str = "YAML config file") -> None:
    """CONFIG and ``--set KEY=VALUE`` (repeatable), read by ``distill.config.load_config``."""
    p.add_argument("config", type=Path, help=help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """``--precision`` of an inference command: its own, not the config's training precision."""
    parser.add_argument(
        "--precision",
        choices=["no", "fp16", "bf16", "auto"],
        default=None,
        help="inference precision (default no: float32, as torchvision's published numbers); "
        "the config's train.mixed_precision is a training setting and is not used",
    )
