"""``distill check`` on the shapes benchmark, right both ways (issue 43): the shapes recipe with
the shared trained teacher passes and prints the suggested weights; each wrong teacher fails,
with its reason; each case timed.

    python scripts/bench_check.py --teacher ../shared/teachers/shapes-r50fpn-v2.pt

The shared teacher has no card (it was trained before cards recorded an mAP): a copy of it gets
one here, as a user's would (``write_card`` with its resolved config, then ``distill eval``,
which records its mAP on the shapes validation set in the card). It is also run at 64 px with
its settings check off (its mAP here against its card's: a warning). The wrong teachers are
made from it: its classes permuted in its card; its classifier's classes permuted in a
card-less copy (a trained teacher that names every object wrongly); random weights in a
card-less file; no weights at all; the demo task's teacher (``--demo-teacher``, trained with
``distill demo`` at 96 px with anchors from 16 px, on 3 classes), as it is and with
``teacher.weights_settings: ignore``.
Each row is one ``distill check configs/shapes/distill.yaml --set teacher.weights=...`` with the
default sample (50 images). Writes ``results/bench_check.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distill.config import load_config
from distill.data import build_dataset
from distill.data.shapes import generate_shapes
from distill.experiments.machine import provenance, publish
from distill.models.card import dataset_categories, read_card, write_card
from distill.models.weights import save_state_dict_file
from teachers import build_teacher

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes" / "distill.yaml"


def distill(*args: str) -> tuple[int, str, float]:
    """A ``distill`` command: exit status, stderr, seconds."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=REPO
    )
    return proc.returncode, proc.stderr, time.perf_counter() - start


def carded_teacher(shared: Path, work: Path, data_root: Path) -> Path:
    """A copy of the shared teacher with a card (its resolved config, the shapes classes) and
    its mAP recorded by ``distill eval``."""
    weights = work / "teacher.pt"
    if read_card(weights) is not None and "evaluation" in (read_card(weights) or {}):
        return weights
    cfg = load_config(shared.with_suffix(".config.yaml"), [f"data.root={data_root}"])
    train_set = build_dataset(cfg.data, "train")
    weights.write_bytes(shared.read_bytes())
    write_card(weights, cfg, "teacher", train_set.num_categories + 1, dataset_categories(train_set))
    teacher_cfg = REPO / "configs" / "shapes" / "teacher.yaml"
    code, err, _ = distill(
        "eval", str(teacher_cfg), "--model", "teacher", "--weights", str(weights),
        "--set", f"data.root={data_root}",
    )  # fmt: skip
    if code != 0 or "evaluation" not in (read_card(weights) or {}):
        raise SystemExit(f"distill eval of {weights} failed:\n{err[-2000:]}")
    return weights


def permuted_card(weights: Path, work: Path) -> Path:
    """A copy whose card names every label as the next one's class."""
    target = work / "card-permuted.pt"
    target.write_bytes(weights.read_bytes())
    card = json.loads(weights.with_suffix(".json").read_text())
    names = [c["name"] for c in card["categories"]]
    for category, name in zip(card["categories"], names[1:] + names[:1]):
        category["name"] = name
    target.with_suffix(".json").write_text(json.dumps(card))
    return target


def permuted_classifier(weights: Path, work: Path, num_classes: int) -> Path:
    """A card-less copy whose classifier outputs each class at the next one's label."""
    target = work / "classifier-permuted.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    order = [0, *range(2, num_classes), 1]  # label k's output now comes from label k + 1's
    for key in ("head.classification_head.cls_logits.weight",
                "head.classification_head.cls_logits.bias"):  # fmt: skip
        value = state[key]
        blocks = value.reshape(-1, num_classes, *value.shape[1:])  # (anchors, classes, ...)
        state[key] = blocks[:, order].reshape(value.shape).contiguous()
    save_state_dict_file(state, target)
    return target


def random_teacher(work: Path, data_root: Path) -> Path:
    target = work / "random.pt"
    cfg = load_config(CONFIG, [f"data.root={data_root}", "teacher.weights=null"])
    torch.manual_seed(0)
    num_classes = build_dataset(cfg.data, "train").num_categories + 1
    save_state_dict_file(build_teacher(cfg, num_classes, frozen=False).state_dict(), target)
    return target


def rel(path: str | Path) -> str:
    """``path`` as the commands name it, from the repository root (they run there)."""
    return os.path.relpath(path, REPO) if str(path) != "null" else "null"


def row(name: str, weights: str, data_root: Path, *more: str) -> dict[str, Any]:
    overrides = [f"data.root={rel(data_root)}", f"teacher.weights={rel(weights)}", *more]
    args = ["check", rel(CONFIG), *(a for o in overrides for a in ("--set", o))]
    # not beside the weights: a NAME.json there is read as NAME.pt's card
    slug = "".join(c if c.isalnum() else "-" for c in name)
    out = Path("runs") / "bench_check" / "checks" / f"{slug}.json"
    code, err, seconds = distill(*args, "--out", str(out))
    report = json.loads((REPO / out).read_text()) if code in (0, 1) else {"findings": []}
    failed = [f for f in report["findings"] if f["status"] == "fail"]
    return {
        "case": name,
        "command": "distill " + shlex.join(args),
        "exit": code,
        "seconds": round(seconds, 1),
        "failed": [f["check"] for f in failed],
        "reason": failed[0]["detail"] if failed else "",
        "findings": report["findings"],
        "stderr_tail": err[-500:] if code not in (0, 1) else "",
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| case | verdict | s | reason (first failed check, or warning) |",
        "|---|---|---:|---|",
    ]
    for r in result["rows"]:
        verdict = "pass" if r["exit"] == 0 else f"fail: {', '.join(r['failed'])}"
        warned = [f for f in r["findings"] if f["status"] == "warn"]
        reason = (r["reason"] or (f"warn: {warned[0]['detail']}" if warned else "")).replace(
            "|", "/"
        )
        lines.append(f"| {r['case']} | {verdict} | {r['seconds']:.0f} | {reason} |")
    passed = next((r for r in result["rows"] if r["exit"] == 0), None)
    if passed is not None:
        lines.append("\nSuggested weights (the right teacher):")
        for f in passed["findings"]:
            if f["check"].startswith("kd/") and "suggested" in f["detail"]:
                lines.append(f"  {f['check']}: {f['detail']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the shared shapes teacher")
    parser.add_argument(
        "--demo-teacher", type=Path, default=REPO / "runs" / "demo-v2" / "teacher" / "teacher.pt"
    )
    parser.add_argument("--data", type=Path, default=REPO / "data" / "shapes")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_check.json")
    args = parser.parse_args()
    generate_shapes(args.data, seed=0)  # the shapes benchmark (kept if already there)
    work = REPO / "runs" / "bench_check"
    work.mkdir(parents=True, exist_ok=True)
    good = carded_teacher(args.teacher.resolve(), work, args.data)
    num_classes = int((read_card(good) or {})["num_classes"])
    rows = [
        row("right teacher (shared, carded)", str(good), args.data),
        row(
            "right teacher at 64 px, settings ignored",
            str(good),
            args.data,
            "data.image_size=64",
            "teacher.weights_settings=ignore",
        ),
        row("classes permuted in its card", str(permuted_card(good, work)), args.data),
        row(
            "classifier permuted, no card",
            str(permuted_classifier(good, work, num_classes)),
            args.data,
        ),
        row("random weights file, no card", str(random_teacher(work, args.data)), args.data),
        row("no weights (random)", "null", args.data),
    ]
    if args.demo_teacher.is_file():
        rows.append(row("demo task's teacher", str(args.demo_teacher), args.data))
        rows.append(
            row(
                "demo task's teacher, settings ignored",
                str(args.demo_teacher),
                args.data,
                "teacher.weights_settings=ignore",
            )
        )
    result = {
        "rows": rows,
        **provenance(),
    }
    publish(result, args.out, format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
