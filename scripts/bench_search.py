"""``distill search`` on the shapes benchmark (issue 44): what it costs, what it finds, whether its
early rungs can be trusted, two workers on one study, and the confirmed gain with its interval.

    python scripts/bench_search.py --teacher ../shared/teachers/shapes-r50fpn-v2.pt

Four parts, each a run of ``distill search configs/shapes/search.yaml`` (its space: the feature
kind, each with its weight range, fgd.tau, the logit temperature and weight, the box weight,
CrossKD on or off; rungs 150, 300, 900 student steps, the last the recipe's length):

    one worker   --workers-trials (4) trials in groups of 2 at short rungs (--workers-rungs
    two workers  40,80), then the same with two worker processes on one SQLite study: wall time
                 of each, and whether a trial was trained twice
    search       --trials (16) in one lockstep group, pruned at the rungs (reduction factor 3),
                 then ``--confirm`` (3) seeds of the best recipe and the plain student on the
                 validation set: ``compute_share`` (the student steps it spent, the plain
                 student's included, over the trials' number times the full length),
                 ``best_map`` (the best recipe's mAP on val.json, mean over the seeds),
                 ``gain_ci`` (its gain over the plain student, paired interval over seeds; and
                 over images by bootstrap)
    fidelity     --fidelity (5) trials in one group with ``--no-prune``: each scored at steps
                 150, 300, 600 and at full length (--fidelity-rungs); ``rung_spearman``, the
                 rank correlation of each step's scores with the full length's, over the
                 trials and the plain student; ``loss_spearman``, the same of their detection
                 loss on the training batches

A part that finished is not run again (``bench_part.json`` in its folder under --work): delete
the folder to measure it again. ``reference_map`` is the shapes recipe's distilled mAP from
results/bench_kd.json. Writes ``results/bench_search.json`` and prints a table. Run it with nothing
else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distill.experiments.machine import provenance, publish, usable_cores

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes" / "search.yaml"
RUNGS = (150, 300, 900)
LOSS_WINDOW = 50  # steps of training loss averaged at a rung (logged every 10)


def distill(args: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "distill", *args], cwd=REPO, env=env, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def finished(procs: Sequence[subprocess.Popen[str]]) -> float:
    """Wait for ``procs``; the seconds since the call, or an exit naming the failure."""
    start = time.perf_counter()
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            command = " ".join(map(str, cast(list[str], proc.args)))
            raise SystemExit(f"{command} failed:\n{err[-3000:]}")
    return time.perf_counter() - start


def part(out: Path, start: Callable[[], list[subprocess.Popen[str]]]) -> float:
    """Run one part of the benchmark into ``out`` (the processes ``start`` gives) and return its
    wall seconds; a part that finished before (its ``bench_part.json``) is not run again, so a
    benchmark cut short goes on from the part it was in."""
    record = out / "bench_part.json"
    if record.exists():
        return float(json.loads(record.read_text())["seconds"])
    if out.exists():
        shutil.rmtree(out)  # a part cut short starts again: its wall time must be whole
    seconds = finished(start())
    record.write_text(json.dumps({"seconds": seconds}))
    return seconds


def search_args(out: Path, teacher: Path, rungs: Sequence[int], *more: str) -> list[str]:
    return [
        "search", str(CONFIG.relative_to(REPO)), "--set", f"teacher.weights={teacher}",
        "--rungs", ",".join(map(str, rungs)), "--out", str(out), *more,
    ]  # fmt: skip


def trial_steps(rows: Sequence[Mapping[str, Any]], rungs: Sequence[int]) -> list[int]:
    """The student steps each trial trained: the last rung it was scored at."""
    return [max((int(s) for s, v in r["rungs"].items() if v is not None), default=0) for r in rows]


def compute_share(out: Path, rows: Sequence[Mapping[str, Any]], rungs: Sequence[int]) -> float:
    """Student steps spent (the trials' and each group's plain student's) over the trials'
    number times the full length."""
    spent = sum(trial_steps(rows, rungs))
    for path in out.glob("groups/*/g*/group.json"):
        group = json.loads(path.read_text())
        plain = [
            s for s, scores in group["rungs"].items() if any(k.endswith("/plain") for k in scores)
        ]
        spent += max(map(int, plain), default=0)
    return spent / (len(rows) * rungs[-1])


def plain_scores(out: Path) -> dict[str, float]:
    """The plain student's score at each rung (step -> score) of the search in ``out``'s one
    group."""
    (path,) = out.glob("groups/*/g*/group.json")
    rungs = json.loads(path.read_text())["rungs"]
    return {
        step: score for step, scores in rungs.items() for run, score in scores.items()
        if run.endswith("/plain")
    }  # fmt: skip


def rung_spearman(
    rows: Sequence[Mapping[str, Any]], plain: Mapping[str, float], rungs: Sequence[int]
) -> list[float]:
    """Per rung but the last, the Spearman rank correlation of the scores there with the scores
    at full length, over the complete trials and the plain student (every KD weight 0: one more
    configuration)."""
    done = [r["rungs"] for r in rows if r["state"] == "complete"] + [plain]
    final = [r[str(rungs[-1])] for r in done]
    return [float(stats.spearmanr([r[str(s)] for r in done], final).statistic) for s in rungs[:-1]]


def detection_loss(run_dir: Path, step: int, window: int = LOSS_WINDOW) -> float:
    """A trainee's own detection loss (classification + box regression, on the training
    batches: the same for every trainee of a lockstep group) averaged over the ``window`` steps
    up to ``step``, from its TensorBoard log."""
    (events,) = (run_dir / "tb").glob("events.out.tfevents*")
    log = EventAccumulator(str(events), size_guidance={"scalars": 0})
    log.Reload()
    per_step: dict[int, float] = {}
    for tag in ("loss/classification", "loss/bbox_regression"):
        for event in log.Scalars(tag):
            if step - window < event.step <= step:
                per_step[event.step] = per_step.get(event.step, 0.0) + event.value
    return statistics.mean(per_step.values())


def loss_spearman(
    out: Path, rows: Sequence[Mapping[str, Any]], plain: Mapping[str, float], rungs: Sequence[int]
) -> list[float]:
    """Per rung but the last, the Spearman rank correlation of minus the detection loss there
    (``detection_loss``) with the mAP at full length, over the same trainees as
    ``rung_spearman``: whether the loss ranks trials earlier than the mAP does."""
    (group,) = out.glob("groups/*/g*")
    done = [r for r in rows if r["state"] == "complete"]
    dirs = [group / f"trial_{r['trial']:04d}" for r in done] + [group / "plain"]
    final = [r["rungs"][str(rungs[-1])] for r in done] + [plain[str(rungs[-1])]]
    return [
        float(stats.spearmanr([-detection_loss(d, s) for d in dirs], final).statistic)
        for s in rungs[:-1]
    ]


def reference_map() -> float:
    """The shapes recipe's distilled mAP (results/bench_kd.json, mean over its seeds)."""
    result = json.loads((REPO / "results" / "bench_kd.json").read_text())
    return float(result["models"]["student + KD"]["map"]["mean"])


def format_table(result: Mapping[str, Any]) -> str:
    gain, workers = result["gain_ci"], result["workers"]
    fidelity = f"{result['fidelity_trials']} trials unpruned + plain"
    rows = [
        ("trials (search)", f"{result['trials']}"),
        ("compute share (goal <= 1/3)", f"{result['compute_share']:.3f}"),
        ("search + confirmation, wall (min)", f"{result['search_minutes']:.0f}"),
        ("best recipe's mAP on val (mean of seeds)", f"{result['best_map']:.3f}"),
        ("plain student's mAP on val (same seeds)", f"{result['plain_map']:.3f}"),
        ("shapes recipe's mAP (bench_kd)", f"{result['reference_map']:.3f}"),
        (f"gain over plain, {result['seeds']} seeds",
         f"{gain['estimate']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"),
        ("gain over plain, bootstrap over images",
         f"[{result['gain_ci_images'][0]:+.3f}, {result['gain_ci_images'][1]:+.3f}]"),
        *((f"Spearman, step {s} vs full length ({fidelity})", f"{rho:.2f}")
          for s, rho in zip(result["fidelity_rungs"][:-1], result["rung_spearman"])),
        *((f"Spearman, detection loss at step {s} vs full-length mAP", f"{rho:.2f}")
          for s, rho in zip(result["fidelity_rungs"][:-1], result["loss_spearman"])),
        (f"one worker / two workers, {workers['trials']} trials (s)",
         f"{workers['one_s']:.0f} / {workers['two_s']:.0f}"
         f" ({workers['one_s'] / workers['two_s']:.2f}x)"),
        ("a trial trained twice by two workers", "yes" if workers["duplicates"] else "no"),
        ("best recipe", ", ".join(
            f"{k.removeprefix('distill.')}={v:.3g}" if isinstance(v, float)
            else f"{k.removeprefix('distill.')}={v}" for k, v in result["best_params"].items())),
    ]  # fmt: skip
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the shared shapes teacher")
    parser.add_argument("--trials", type=int, default=16, help="of the search, in one group")
    parser.add_argument("--seeds", type=int, default=3, help="of the confirmation")
    parser.add_argument("--fidelity", type=int, default=5, help="trials unpruned (0: skip)")
    parser.add_argument("--fidelity-rungs", default="150,300,600,900", help="scored at")
    parser.add_argument("--workers-trials", type=int, default=4)
    parser.add_argument("--workers-rungs", default="40,80", help="of the one/two worker runs")
    parser.add_argument("--rungs", default=",".join(map(str, RUNGS)))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_search.json")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_search")
    args = parser.parse_args()
    rungs = tuple(int(s) for s in args.rungs.split(","))
    teacher = args.teacher.resolve()
    work = args.work

    search = work / "search"
    small = ("--trials", str(args.workers_trials), "--group", "2")
    workers_rungs = tuple(int(s) for s in args.workers_rungs.split(","))
    one_s = part(work / "one", lambda: [distill(search_args(work / "one", teacher, workers_rungs,
                                                            *small))])  # fmt: skip
    # two processes on one host split its cores (as torchrun does): each would take them all
    threads = {**os.environ, "OMP_NUM_THREADS": str(max(1, (usable_cores() or 1) // 2))}
    two_s = part(work / "two", lambda: [
        distill(search_args(work / "two", teacher, workers_rungs, *small, "--seed", str(w)),
                env=threads)
        for w in (0, 1)
    ])  # fmt: skip
    groups = [json.loads(p.read_text()) for p in (work / "two").glob("groups/*/g*/group.json")]
    trained = [int(n) for g in groups for n in g["trials"]]

    more = ("--trials", str(args.trials), "--group", str(args.trials), "--confirm", str(args.seeds))
    seconds = part(search, lambda: [distill(search_args(search, teacher, rungs, *more))])
    rows = json.loads((search / "trials.json").read_text())
    confirmed = json.loads((search / "confirm" / "confirm.json").read_text())

    fidelity = work / "fidelity"
    unpruned = ("--trials", str(args.fidelity), "--group", str(args.fidelity), "--no-prune")
    scored = tuple(int(s) for s in args.fidelity_rungs.split(","))
    fidelity_args = search_args(fidelity, teacher, scored, *unpruned, "--seed", "1")
    rung_rhos: list[float] = []
    loss_rhos: list[float] = []
    fidelity_rows: list[dict[str, Any]] = []
    if args.fidelity > 0:  # --fidelity 0: not measured
        part(fidelity, lambda: [distill(fidelity_args)])
        fidelity_rows = json.loads((fidelity / "trials.json").read_text())
        plain = plain_scores(fidelity)
        rung_rhos = rung_spearman(fidelity_rows, plain, scored)
        loss_rhos = loss_spearman(fidelity, fidelity_rows, plain, scored)

    seeds_gain = confirmed["gain"]["seeds"]["map"]
    images_gain = confirmed["gain"]["images"]["map"]
    best = max((r for r in rows if r["state"] == "complete"), key=lambda r: r["score"])
    result = {
        "trials": len(rows),
        "rungs": list(rungs),
        "compute_share": compute_share(search, rows, rungs),
        "best_map": statistics.mean(confirmed["map"]["best"]),
        "plain_map": statistics.mean(confirmed["map"]["plain"]),
        "reference_map": reference_map(),
        "fidelity_rungs": list(scored),
        "rung_spearman": rung_rhos,
        "fidelity_trials": len(fidelity_rows),
        "loss_spearman": loss_rhos,
        "gain_ci": seeds_gain,
        "gain_ci_images": [images_gain["low"], images_gain["high"]],
        "seeds": args.seeds,
        "best_params": best["params"],
        "search_minutes": seconds / 60,
        "workers": {
            "trials": args.workers_trials,
            "rungs": list(workers_rungs),
            "one_s": one_s,
            "two_s": two_s,
            "threads_each": max(1, (usable_cores() or 1) // 2),
            "duplicates": len(trained) != len(set(trained)),
        },
        **provenance(),
    }
    publish(result, args.out, format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
