"""``distill search`` on the shapes benchmark (issue 44): what it costs, what it finds, whether its
early rungs can be trusted, two workers on one study, and the confirmed gain with its interval.

    python scripts/bench_search.py --teacher ../shared/teachers/shapes-r50fpn-v2.pt

Four runs of ``distill search configs/shapes/search.yaml`` (its space: the feature kind, each
with its weight range, fgd.tau, the logit temperature and weight, the box weight, CrossKD on or
off; rungs 300, 600, 900 student steps, the last the recipe's length):

    search       --trials (24), pruned at the rungs, then ``--confirm`` (3) seeds of the best
                 recipe and the plain student on the validation set: ``compute_share`` (the
                 student steps it spent, the plain students' included, over the trials' number
                 times the full length), ``best_map`` (the best recipe's mAP on val.json, mean
                 over the seeds), ``gain_ci`` (its gain over the plain student, paired interval
                 over seeds; and over images by bootstrap)
    fidelity     --fidelity (8) trials with ``--no-prune``: each scored at every rung and at
                 full length; ``rung_spearman``, the rank correlation of each rung's scores
                 with the full length's
    one worker   --workers-trials (4) trials in groups of 2, then the same with two worker
    two workers  processes on one SQLite study: wall time of each, and no trial trained twice

``reference_map`` is the shapes recipe's distilled mAP from results/bench_kd.json. Writes
``results/bench_search.json`` and prints a table. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from scipy import stats

from distill.experiments.machine import machine, publish

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes" / "search.yaml"
RUNGS = (300, 600, 900)


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


def rung_spearman(rows: Sequence[Mapping[str, Any]], rungs: Sequence[int]) -> list[float]:
    """Per rung but the last, the Spearman rank correlation of the complete trials' scores
    there with their scores at full length."""
    done = [r for r in rows if r["state"] == "complete"]
    final = [r["rungs"][str(rungs[-1])] for r in done]
    return [
        float(stats.spearmanr([r["rungs"][str(s)] for r in done], final).statistic)
        for s in rungs[:-1]
    ]


def reference_map() -> float:
    """The shapes recipe's distilled mAP (results/bench_kd.json, mean over its seeds)."""
    result = json.loads((REPO / "results" / "bench_kd.json").read_text())
    return float(result["models"]["student + KD"]["map"]["mean"])


def format_table(result: Mapping[str, Any]) -> str:
    gain = result["gain_ci"]
    rows = [
        ("trials (search)", f"{result['trials']}"),
        ("compute share (goal <= 1/3)", f"{result['compute_share']:.3f}"),
        ("best recipe's mAP on val (mean of seeds)", f"{result['best_map']:.3f}"),
        ("shapes recipe's mAP (bench_kd)", f"{result['reference_map']:.3f}"),
        (f"gain over plain, {result['seeds']} seeds",
         f"{gain['estimate']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"),
        ("gain over plain, bootstrap over images",
         f"[{result['gain_ci_images'][0]:+.3f}, {result['gain_ci_images'][1]:+.3f}]"),
        *((f"Spearman, step {s} vs full length", f"{rho:.2f}")
          for s, rho in zip(result["rungs"][:-1], result["rung_spearman"])),
        ("one worker / two workers (s)",
         f"{result['workers']['one_s']:.0f} / {result['workers']['two_s']:.0f}"),
        ("a trial trained twice", "yes" if result["workers"]["duplicates"] else "no"),
        ("best recipe", json.dumps(result["best_params"])),
    ]  # fmt: skip
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the shared shapes teacher")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3, help="of the confirmation")
    parser.add_argument("--fidelity", type=int, default=8, help="trials trained unpruned")
    parser.add_argument("--workers-trials", type=int, default=4)
    parser.add_argument("--rungs", default=",".join(map(str, RUNGS)))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_search.json")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_search")
    args = parser.parse_args()
    rungs = tuple(int(s) for s in args.rungs.split(","))
    teacher = args.teacher.resolve()
    work = args.work

    search = work / "search"
    more = ("--trials", str(args.trials), "--confirm", str(args.seeds))
    seconds = finished([distill(search_args(search, teacher, rungs, *more))])
    rows = json.loads((search / "trials.json").read_text())
    confirmed = json.loads((search / "confirm" / "confirm.json").read_text())

    fidelity = work / "fidelity"
    finished([distill(search_args(fidelity, teacher, rungs, "--trials", str(args.fidelity),
                                  "--no-prune", "--seed", "1"))])  # fmt: skip
    fidelity_rows = json.loads((fidelity / "trials.json").read_text())

    small = ("--trials", str(args.workers_trials), "--group", "2")
    one_s = finished([distill(search_args(work / "one", teacher, rungs, *small))])
    two = [
        distill(search_args(work / "two", teacher, rungs, *small, "--seed", str(w))) for w in (0, 1)
    ]
    two_s = finished(two)
    groups = [json.loads(p.read_text()) for p in (work / "two").glob("groups/*/g*/group.json")]
    trained = [int(n) for g in groups for n in g["trials"]]

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
        "rung_spearman": rung_spearman(fidelity_rows, rungs),
        "gain_ci": seeds_gain,
        "gain_ci_images": [images_gain["low"], images_gain["high"]],
        "seeds": args.seeds,
        "best_params": best["params"],
        "search_minutes": seconds / 60,
        "workers": {
            "trials": args.workers_trials,
            "one_s": one_s,
            "two_s": two_s,
            "duplicates": len(trained) != len(set(trained)),
        },
        "machine": machine(),
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    publish(result, args.out, format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
