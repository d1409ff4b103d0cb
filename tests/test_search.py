"""``distill search``: trials trained in one lockstep group with the plain student, scored on
held-out training images at each rung, the weak pruned out of the group (they train no more);
a failed trial leaves the group and the rest go on; a stopped search continues its group from
its checkpoint; two workers on one SQLite study never train the same trial; and the errors
that come before any compute."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from distill.config import ConfigError, load_config
from distill.engine import loop
from distill.kd import kd_terms
from distill.search import SearchError, halving
from distill.search.command import SearchArgs, search_command
from distill.search.study import orphaned
from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")
# 12 training images after 4 held out, batch 4: 3 steps an epoch; rungs at steps 1 and 3
RUNGS = (1, 3)


def search_args(root: Path, out: Path, **more: Any) -> SearchArgs:
    overrides = (
        *smoke_overrides(root, out / "unused"), "data.holdout_images=4", "eval.images_logged=0",
        "train.epochs=1",
    )  # fmt: skip
    fields: dict[str, Any] = {
        "config": SMOKE,
        "overrides": overrides,
        "space": ("distill.logit.weight=0.1..10:log",),
        "trials": 3,
        "rungs": RUNGS,
        "out": out,
        "group": 3,
        **more,
    }
    return SearchArgs(**fields)


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Training steps taken by each run directory (the loop's ``train_step``)."""
    counts: Counter[str] = Counter()
    original = loop.train_step

    def counted(accelerator: Any, t: Any, *args: Any) -> Any:
        counts[f"{t.run_dir.parent.name}/{t.run_dir.name}"] += 1
        return original(accelerator, t, *args)

    monkeypatch.setattr(loop, "train_step", counted)
    yield counts


def scored_by_trial(monkeypatch: pytest.MonkeyPatch, scores: dict[str, float]) -> None:
    """Rung scores by run directory name (a random teacher scores 0 everywhere: no order)."""

    def evaluate(t: Any, run: Any) -> dict[str, float]:
        # scored on the 4 training images held out of training, never on val.json
        assert run.val_set.ann_path.name == "train.json" and len(run.val_set) == 4
        return {"map": scores.get(t.run_dir.name, 0.0)}

    monkeypatch.setattr(halving, "evaluate_trainee", evaluate)


def states(out: Path) -> dict[int, str]:
    return {row["trial"]: row["state"] for row in json.loads((out / "trials.json").read_text())}


def test_the_weak_leave_the_group_at_a_rung_and_train_no_more(
    shapes_root: Path, tmp_path: Path, steps: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = {"trial_0000": 0.1, "trial_0001": 0.3, "trial_0002": 0.2, "trial_0003": 0.15}
    scored_by_trial(monkeypatch, scores)
    out = tmp_path / "search"
    best = search_command(search_args(shapes_root, out, trials=4))
    # a group of 3, reduction factor 3: the best one goes on past step 1, the others stop
    # there; the second group's one trial is under the study's best at step 1: pruned, and the
    # plain student beside it stops too (nothing left to compare)
    assert states(out) == {0: "pruned", 1: "complete", 2: "pruned", 3: "pruned"}
    assert steps == {
        "g0000/trial_0000": 1, "g0000/trial_0001": 3, "g0000/trial_0002": 1, "g0000/plain": 3,
        "g0003/trial_0003": 1, "g0003/plain": 1,
    }  # fmt: skip
    group = out / "groups" / "shapes--smoke" / "g0000"
    assert (group / "trial_0001" / "student.pt").is_file()
    assert not (group / "trial_0000" / "student.pt").exists()
    record = json.loads((group / "group.json").read_text())
    assert record["state"] == "done" and set(record["rungs"]) == {"1", "3"}
    assert str(group / "plain") in record["rungs"]["1"]  # the plain student scored beside
    # best.yaml: the surviving trial's values, which distill run reads as it is
    study = optuna.load_study(study_name="shapes/smoke", storage=f"sqlite:///{out}/study.db")
    cfg = load_config(best)
    assert cfg.distill.logit.weight == pytest.approx(study.trials[1].params["distill.logit.weight"])
    # trained as the trials were, on every training image
    assert cfg.train.max_steps == 3 and cfg.data.holdout_images == 0
    assert (out / "history.png").is_file() and list((out / "tb").rglob("events.out.tfevents*"))
    # each rung's score and its gain over the plain student of the group (scored 0 here)
    assert "| 1 | complete | 0.300 (+0.300) |" in (out / "trials.md").read_text()
    # a pruned trial has no full-length score (Optuna gives it its last rung's as its value)
    rows = {row["trial"]: row for row in json.loads((out / "trials.json").read_text())}
    assert rows[0]["rungs"] == {"1": 0.1, "3": None} and rows[0]["score"] is None
    assert rows[1]["rungs"]["3"] is not None and rows[1]["score"] == rows[1]["rungs"]["3"]
    assert "| 0 | pruned | 0.100 (+0.100) |  |" in (out / "trials.md").read_text()


def test_a_failed_trial_leaves_the_group_and_the_rest_go_on(
    shapes_root: Path, tmp_path: Path, steps: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = loop.train_step

    def poisoned(accelerator: Any, t: Any, *args: Any) -> Any:
        if t.run_dir.name == "trial_0001":  # its loss turns non-finite
            with torch.no_grad():
                t.detector.head.classification_head.cls_logits.bias.fill_(float("nan"))
        return original(accelerator, t, *args)

    monkeypatch.setattr(loop, "train_step", poisoned)
    out = tmp_path / "search"
    args = search_args(shapes_root, out, rungs=(3,))
    args = SearchArgs(**{**vars(args), "overrides": (*args.overrides, "train.max_nonfinite=1")})
    search_command(args)
    assert states(out) == {0: "complete", 1: "fail", 2: "complete"}
    assert steps == {
        "g0000/trial_0000": 3, "g0000/trial_0001": 1, "g0000/trial_0002": 3, "g0000/plain": 3,
    }  # fmt: skip


def test_a_stopped_search_continues_its_group_from_its_checkpoint(
    shapes_root: Path, tmp_path: Path, steps: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scored_by_trial(monkeypatch, {"trial_0000": 0.1, "trial_0001": 0.3, "trial_0002": 0.2})
    original = halving.Halving.after_step

    def killed_after_step_2(self: Any, run: Any) -> None:
        original(self, run)
        if run.progress.step == 2:
            raise KeyboardInterrupt  # a kill after the rung's checkpoint at step 1

    monkeypatch.setattr(halving.Halving, "after_step", killed_after_step_2)
    out = tmp_path / "search"
    with pytest.raises(KeyboardInterrupt):
        search_command(search_args(shapes_root, out))
    monkeypatch.setattr(halving.Halving, "after_step", original)
    steps.clear()
    search_command(search_args(shapes_root, out))
    # the group went on from its step-1 checkpoint, without the trials pruned there
    assert steps == {"g0000/trial_0001": 2, "g0000/plain": 2}
    assert states(out) == {0: "pruned", 1: "complete", 2: "pruned"}  # no new trial taken
    assert [p.name for p in (out / "groups" / "shapes--smoke").iterdir()] == ["g0000"]


def test_trials_of_a_worker_killed_while_it_took_them_are_told_fail_and_replaced(
    shapes_root: Path, tmp_path: Path, steps: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # the pid of a worker that is gone
    original_ask, original_save = halving.ask, halving.Group.save

    def asked_by_the_dead(study: optuna.Study, space: Any) -> Any:
        trial, values = original_ask(study, space)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
        return trial, values

    def killed(self: Any) -> None:
        raise KeyboardInterrupt  # after its trials were asked, before its group was recorded

    monkeypatch.setattr(halving, "ask", asked_by_the_dead)
    monkeypatch.setattr(halving.Group, "save", killed)
    out = tmp_path / "search"
    with pytest.raises(KeyboardInterrupt):
        search_command(search_args(shapes_root, out, trials=2, group=2))
    monkeypatch.setattr(halving, "ask", original_ask)
    monkeypatch.setattr(halving.Group, "save", original_save)
    study = optuna.load_study(study_name="shapes/smoke", storage=f"sqlite:///{out}/study.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING] * 2
    # orphans: of this host, their process gone, in no group; a group's trial is not one, nor a
    # trial of another host (its process cannot be seen from here)
    assert [t.number for t in orphaned(study, set())] == [0, 1]
    assert [t.number for t in orphaned(study, {0})] == [1]
    optuna.trial.Trial(study, study.trials[1]._trial_id).set_user_attr("worker", "elsewhere:1")
    assert [t.number for t in orphaned(study, set())] == [0]
    optuna.trial.Trial(study, study.trials[1]._trial_id).set_user_attr(
        "worker", f"{socket.gethostname()}:{dead.pid}"
    )
    scored_by_trial(monkeypatch, {"trial_0002": 0.3, "trial_0003": 0.1})
    best = search_command(search_args(shapes_root, out, trials=2, group=2))
    # told FAIL, not counted as taken: two new trials trained in their place, and the search
    # ends (RUNNING orphans would have kept it waiting for them forever)
    assert states(out) == {0: "fail", 1: "fail", 2: "complete", 3: "pruned"}
    assert steps == {"g0002/trial_0002": 3, "g0002/trial_0003": 1, "g0002/plain": 3}
    assert best is not None and best.is_file()


def test_errors_before_any_compute(shapes_root: Path, tmp_path: Path) -> None:
    args = search_args(shapes_root, tmp_path / "s")
    no_holdout = SearchArgs(**{**vars(args), "overrides": smoke_overrides(shapes_root, tmp_path)})
    with pytest.raises(ConfigError, match=r"data\.holdout_images"):
        search_command(no_holdout)
    with pytest.raises(
        SearchError, match=r"train\.lr: distill search trains its trials in lockstep"
    ):
        search_command(SearchArgs(**{**vars(args), "space": ("train.lr=0.001..0.1:log",)}))
    with pytest.raises(SearchError, match="--rungs"):
        search_command(SearchArgs(**{**vars(args), "rungs": None}))
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_two_workers_on_one_study_never_train_the_same_trial(
    shapes_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "search"
    sets = [a for o in search_args(shapes_root, out).overrides for a in ("--set", o)]
    cmd = [
        sys.executable, "-m", "distill", "search", str(SMOKE), *sets, "--space",
        "distill.logit.weight=0.1..10:log", "--trials", "4", "--group", "1", "--rungs", "3",
        "--out", str(out),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*cmd, "--seed", str(worker)],
            env={**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_WORKER": f"w{worker}"},
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in (0, 1)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-2000:] + errors[1][-2000:]
    groups = [json.loads(p.read_text()) for p in (out / "groups").glob("*/g*/group.json")]
    trained = sorted(int(n) for g in groups for n in g["trials"])
    # every trial of the study trained once, none twice (two workers that count the study at
    # the same moment may each take one more: 4 or 5 trials)
    assert trained == list(range(len(trained))) and len(trained) in (4, 5)
    assert {g["worker"] for g in groups} <= {"w0", "w1"}
    assert set(states(out).values()) == {"complete"}
    assert (out / "best.yaml").is_file()  # by the worker that finished last


@pytest.mark.slow
def test_a_search_under_two_processes_is_one_worker(shapes_root: Path, tmp_path: Path) -> None:
    """Under a launch the processes train the same groups together (Optuna on the main one):
    one group of both trials, trained by 2 processes."""
    out = tmp_path / "search"
    sets = [a for o in search_args(shapes_root, out).overrides for a in ("--set", o)]
    port = subprocess.run(
        [sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('', 0)); "
         "print(s.getsockname()[1])"], capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", port, "-m", "distill", "search", str(SMOKE), *sets, "--space",
        "distill.logit.weight=0.1..10:log", "--trials", "2", "--group", "2", "--rungs", "1,3",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "models=3 processes=2" in proc.stderr
    assert [p.name for p in (out / "groups" / "shapes--smoke").iterdir()] == ["g0000"]
    assert states(out) == {0: "complete", 1: "complete"}


def test_the_best_recipe_is_confirmed_on_paired_seeds_with_intervals(
    shapes_root: Path, tmp_path: Path
) -> None:
    """``--confirm 2``: the best recipe and the plain student, trained on every training image
    to the last rung, seed by seed in lockstep, evaluated on the validation set; the gain with
    its paired intervals over seeds and over images."""
    out = tmp_path / "search"
    search_command(search_args(shapes_root, out, trials=1, group=1, rungs=(3,), confirm=2))
    result = json.loads((out / "confirm" / "confirm.json").read_text())
    assert len(result["map"]["best"]) == len(result["map"]["plain"]) == 2
    for seed in (0, 1):
        best, plain = (load_config(out / "confirm" / f"seed_{seed}" / r / "config.yaml")
                       for r in ("best", "plain"))  # fmt: skip
        assert best.train.seed == plain.train.seed == seed
        assert best.data.holdout_images == 0 and best.train.max_steps == 3
        assert not kd_terms(plain.distill) and kd_terms(best.distill)
    gains = [b - p for b, p in zip(result["map"]["best"], result["map"]["plain"])]
    over_seeds = result["gain"]["seeds"]["map"]
    assert over_seeds["estimate"] == pytest.approx(sum(gains) / 2)
    assert over_seeds["n"] == 2 and "images" in result["gain"]
