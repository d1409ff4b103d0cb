"""Successive halving in lockstep: the trials a worker takes train together as one group (one
data loader, one teacher forward per batch for all of them, ``train_group``), with the plain
student (no KD term on) beside them. At each rung but the last every trial of the group is
scored on the held-out training images (``data.holdout_images``; never the validation set,
which the final number is reported on), the pruner stops the weak ones, and they leave the
group; the rest go on. At the last rung (full length) the survivors' scores complete their
trials. The plain student's score at each rung gives each trial's gain over it.

    group = take_group(study, space, base, size, out_dir)       # RUNNING trials of this worker
    train_halving(group, study, rungs)                          # trains, reports, prunes, tells

A group lives in ``OUT/groups/<study>/gNNNN/`` (its ``group.json``: the trials, their values
and each rung's scores; one checkpoint for the whole group; one run directory per trial and the
plain student's; its ``lock``, held by the worker that trains it). A killed search's group is
continued where its last checkpoint left it by the next worker of the study that finds it
unheld (``stopped_groups``, ``claim``), the trials pruned before the kill leaving the group
again. A trial whose loss stays non-finite leaves the group and is told FAIL; the group goes on.
Optuna is only touched on the main process; the others receive its decisions.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import optuna

from distill.config import Config, load_config, override
from distill.device import process_state, share
from distill.engine.checkpoint import save_checkpoint
from distill.engine.loop import evaluate_trainee, leave, train_group
from distill.engine.setup import Run
from distill.fileio import read_json, write_json
from distill.kd import weight_keys
from distill.search.space import SearchError, Space, space_overrides
from distill.search.study import ask

log = logging.getLogger(__name__)

PLAIN = "plain"  # the run directory of the plain student in a group
LOCKSTEP_FREE = ("distill.", "output.")  # keys trials of one group may differ in
TrialState = optuna.trial.TrialState


@dataclass
class Group:
    """A lockstep group of trials and the plain student, as ``group.json`` holds it."""

    dir: Path
    worker: str
    trials: dict[int, dict[str, Any]]  # trial number -> its values of the space
    rungs: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> run -> score
    state: str = "training"  # training | done
    study: str = ""  # the study's name: a folder may hold the groups of several studies

    @property
    def path(self) -> Path:
        return self.dir / "group.json"

    def run_dir(self, number: int | None) -> Path:
        """A trial's run directory (None: the plain student's)."""
        return self.dir / (PLAIN if number is None else f"trial_{number:04d}")

    def save(self) -> None:
        if process_state().is_main_process:
            record = {**asdict(self), "dir": str(self.dir)}
            record["trials"] = {str(k): v for k, v in self.trials.items()}
            record["rungs"] = {str(k): v for k, v in self.rungs.items()}
            write_json(record, self.path)

    @classmethod
    def load(cls, path: Path) -> Group:
        record = read_json(path)
        return cls(
            dir=path.parent,
            worker=record["worker"],
            trials={int(k): v for k, v in record["trials"].items()},
            rungs={int(k): v for k, v in record["rungs"].items()},
            state=record["state"],
            study=record.get("study", ""),
        )


def worker_name() -> str:
    """This worker, as its groups record it: ``DISTILL_WORKER``, or host:pid."""
    return os.environ.get("DISTILL_WORKER") or f"{socket.gethostname()}:{os.getpid()}"


def claim(folder: Path) -> IO[str] | None:
    """An exclusive lock on a group's folder for as long as the returned file stays open, or
    None when another live worker holds it (the lock dies with its process: a killed worker's
    group can be taken over)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "lock", "a")  # noqa: SIM115 (held open while the group trains)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def check_lockstep_space(space: Space) -> None:
    """Trials of one group share everything but their ``distill`` section: a searched key
    elsewhere (``train.lr``) cannot be trained in lockstep."""
    other = [p.key for p in space.params if not p.key.startswith(LOCKSTEP_FREE)]
    if other:
        raise SearchError(
            f"--space {', '.join(other)}: distill search trains its trials in lockstep, which "
            "share everything but their distill section; search distill.* keys (set the "
            "others with --set)"
        )


def group_configs(
    group: Group, config: Path | None, overrides: Sequence[str], steps: int
) -> tuple[list[Config], list[int | None]]:
    """The configs of the group (its trials, then the plain student), each in its run
    directory, all trained for ``steps`` student steps; and the trial number of each (None for
    the plain student)."""
    # the last rung is the run's length, whatever the epochs; the rungs score (no evaluation
    # at the epochs' ends)
    common = [
        *overrides, override("train.max_steps", steps), "train.epochs=1000000",
        "eval.every_epochs=0",
    ]  # fmt: skip
    numbers: list[int | None] = [*sorted(group.trials), None]
    cfgs = []
    for number in numbers:
        values = space_overrides(group.trials[number]) if number is not None else plain()
        where = override("output.dir", group.run_dir(number))
        cfgs.append(load_config(config, [*common, *values, where]))
    return cfgs, numbers


def plain() -> list[str]:
    """The overrides of the plain student: every KD weight 0."""
    return [f"{key}=0" for key in weight_keys()]


def groups_dir(out_dir: Path, study: str) -> Path:
    """Where the groups of ``study`` live: ``OUT/groups/<study>``."""
    return out_dir / "groups" / study.replace("/", "--")


def take_group(
    study: optuna.Study, space: Space, size: int, out_dir: Path, worker: str
) -> tuple[Group, IO[str]]:
    """``size`` new trials of the study for this worker (RUNNING: no other worker gets them),
    as a group in ``OUT/groups/<study>/``, claimed (its lock) before its ``group.json`` is
    written; on the main process only (``share`` sends it to the rest)."""
    trials = dict(ask(study, space) for _ in range(size))
    numbers = {trial.number: values for trial, values in trials.items()}
    folder = groups_dir(out_dir, study.study_name) / f"g{min(numbers):04d}"
    lock = claim(folder)
    if lock is None:  # a folder of another search in this --out with the same study name
        raise SearchError(f"{folder} is held by another worker: give another --out")
    group = Group(folder, worker, numbers, study=study.study_name)
    group.save()
    for trial in trials:  # recorded: never an orphan (``study.orphaned``)
        trial.set_user_attr("group", str(folder))
    return group, lock


class Halving:
    """The ``Watcher`` of a group's training (``distill.engine.loop.train_group``): scored on
    the held-out images, halved at the rungs, failures told."""

    eval_split = "holdout"

    def __init__(
        self,
        group: Group,
        numbers: Sequence[int | None],
        study: optuna.Study | None,
        rungs: Sequence[int],
        trials_left: int,
    ) -> None:
        self.group, self.study, self.rungs = group, study, tuple(rungs)
        self.number_of = {str(group.run_dir(n)): n for n in numbers}
        self.trials_left = trials_left
        self.told: set[int] = set()  # trials told (pruned, failed) before the last rung
        self.active: list[str] = []  # the run directories still in the group, in its order

    def frozen(self, number: int) -> optuna.trial.FrozenTrial:
        """Trial ``number`` of the study as the storage holds it now (the main process)."""
        assert self.study is not None
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)

    def trial(self, number: int) -> optuna.Trial:
        """The RUNNING trial ``number`` (of this worker: taken, or taken before a stop)."""
        assert self.study is not None
        return optuna.trial.Trial(self.study, self.frozen(number)._trial_id)

    def started(self, run: Run) -> None:
        """A resumed group: the trials pruned or failed before the stop leave it again."""
        states = share(self._states())
        for t in list(run.trainees):
            number = self.number_of[str(t.run_dir)]
            if number is not None and states[number] != TrialState.RUNNING.name:
                leave(run, t, f"{states[number].lower()} before the search stopped")
                self.told.add(number)
        self.without_trials(run)

    def _states(self) -> dict[int, str] | None:
        if self.study is None:
            return None
        return {n: self.frozen(n).state.name for n in self.group.trials}

    def without_trials(self, run: Run) -> None:
        """No trial left in the group: the plain student leaves too (nothing to compare)."""
        if all(self.number_of[str(t.run_dir)] is None for t in run.trainees):
            for t in list(run.trainees):
                leave(run, t, "no trial left in the group")
        self.active = [str(t.run_dir) for t in run.trainees]

    def after_step(self, run: Run) -> None:
        self.tell_failures(run)
        self.without_trials(run)
        step = run.progress.step
        if step not in self.rungs[:-1]:
            return
        scores = {str(t.run_dir): evaluate_trainee(t, run)["map"] for t in run.trainees}
        pruned = share(self._prune(step, scores))
        for t in list(run.trainees):
            if self.number_of[str(t.run_dir)] in pruned:
                leave(run, t, f"pruned at step {step}")
        self.told |= set(pruned)
        self.without_trials(run)
        self.group.rungs[step] = scores
        self.group.save()
        save_checkpoint(run.accelerator, run.checkpoint_dir, run.progress)  # the decision kept
        self.progress_line(step, scores, pruned)

    def _prune(self, step: int, scores: Mapping[str, float]) -> list[int]:
        """Report every trial's score at ``step``, then ask the pruner of each (main process)."""
        if self.study is None:
            return []
        reported = []
        for run_dir, score in scores.items():
            number = self.number_of[run_dir]
            if number is not None:
                trial = self.trial(number)
                trial.report(score, step)
                reported.append(trial)
        pruned = [trial.number for trial in reported if trial.should_prune()]
        for number in pruned:
            self.study.tell(number, state=TrialState.PRUNED)
        return pruned

    def tell_failures(self, run: Run) -> None:
        """Trials that left the group for a non-finite loss are told FAIL."""
        for run_dir, why in run.left.items():
            number = self.number_of[run_dir]
            if number is None or number in self.told or not why.startswith("failed"):
                continue
            self.told.add(number)
            if self.study is not None:
                self.study.tell(number, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", number, why)

    def finish(self, metrics: Sequence[Mapping[str, Any]]) -> None:
        """The last rung: the survivors' scores (``train_group``'s metrics, in the group's
        order) complete their trials."""
        step = self.rungs[-1]
        scores = {d: float(m["map"]) for d, m in zip(self.active, metrics, strict=True)}
        if self.study is not None:  # told before the group is done: a stop between the two
            for run_dir, score in scores.items():  # continues the group, which tells again
                number = self.number_of[run_dir]
                if number is None or number in self.told:
                    continue  # the plain student; a trial told at an earlier rung
                if self.frozen(number).state == TrialState.RUNNING:
                    self.study.tell(number, score)
        self.group.rungs[step] = scores
        self.group.state = "done"
        self.group.save()
        self.progress_line(step, scores, [])

    def progress_line(self, step: int, scores: Mapping[str, float], pruned: Sequence[int]) -> None:
        """Which rung, how many trials are left, the best so far and its gain over the plain
        student at this rung."""
        if not process_state().is_main_process:
            return
        rung = self.rungs.index(step) + 1
        plain_score = scores.get(str(self.group.run_dir(None)), math.nan)
        trials = {self.number_of[d]: s for d, s in scores.items() if self.number_of[d] is not None}
        best = max(trials.items(), key=lambda kv: kv[1]) if trials else None
        lead = (
            f"best trial {best[0]} {best[1]:.3f} ({best[1] - plain_score:+.3f} over plain)"
            if best is not None
            else "no trial left"
        )
        log.info(
            "search: rung %d/%d (step %d): %d trials in this group, %d pruned here, %d of the "
            "study's trials left to take; %s; plain %.3f",
            rung, len(self.rungs), step, len(trials), len(pruned), self.trials_left, lead,
            plain_score,
        )  # fmt: skip


def train_halving(
    group: Group,
    study: optuna.Study | None,
    config: Path | None,
    overrides: Sequence[str],
    rungs: Sequence[int],
    trials_left: int,
    resume: bool,
) -> Group:
    """Train ``group`` to the last rung with successive halving at the others (``Halving``);
    ``study``: None on the processes other than the main one."""
    cfgs, numbers = group_configs(group, config, overrides, rungs[-1])
    halving = Halving(group, numbers, study, rungs, trials_left)
    metrics = train_group(
        cfgs,
        "student",
        group.dir,
        resume=resume,
        overwrite=True,  # the group's own folder: a group never reuses another's
        resume_hint="run the same distill search again: it continues its groups",
        watcher=halving,
    )
    halving.finish(metrics)
    return group


def all_groups(out_dir: Path, study: str) -> list[Group]:
    """The groups of ``study`` in ``OUT``, in the order they were taken."""
    paths = sorted(groups_dir(out_dir, study).glob("g*/group.json"))
    return [g for g in map(Group.load, paths) if g.study == study]


def stopped_groups(out_dir: Path, study: str) -> list[Group]:
    """The groups of ``study`` in ``OUT`` that a stop cut short (not done): a worker
    continues one only when it can ``claim`` it (no live worker holds it)."""
    return [g for g in all_groups(out_dir, study) if g.state != "done"]
