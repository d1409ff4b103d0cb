"""``distill search CONFIG``: the whole search of one worker, and what it leaves in ``OUT``.

    space, study    checked before any compute (``load_space``, ``open_study``)
    groups          the study's groups a stop cut short (and no live worker holds) are
                    continued first, then new groups of ``--group`` trials are taken until the
                    study holds ``--trials`` (``distill.search.halving``); other workers on the
                    same storage take trials of their own (two that count at the same moment
                    may take one group beyond ``--trials``)
    best.yaml       the best trial's values over CONFIG and ``--set``, trained as the trials
                    were (``train.max_steps`` the last rung) on every training image
    confirm/        with ``--confirm S``: the best recipe and the plain student on S seeds,
                    the gain on the validation set with its paired intervals
                    (``distill.search.confirm``, ``confirm/confirm.json``)
    tb/             TensorBoard hparams: each complete trial's values and rung scores
    outputs         ``best.yaml`` (``distill run`` accepts it as it is), ``trials.md`` and
                    ``trials.json`` (every trial: values, score at each rung, state), the
                    optimisation history and parameter importances (``history.png``,
                    ``importance.png``), the groups' TensorBoard logs (each trial's run dir)

Run it again with the same arguments to continue a stopped search; several workers (one
storage, ``--storage URL``) share one study.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from distill.config import ConfigError, load_config
from distill.device import process_state, share
from distill.fileio import write_json, write_text_atomic
from distill.search.block import load_space, read_search_block
from distill.search.confirm import confirm
from distill.search.halving import (
    Group,
    all_groups,
    check_lockstep_space,
    claim,
    groups_dir,
    stopped_groups,
    take_group,
    train_halving,
    worker_name,
)
from distill.search.rungs import check_rungs
from distill.search.space import SearchError
from distill.search.study import open_study, orphaned, release, study_name, taken, write_best

log = logging.getLogger(__name__)

TrialState = optuna.trial.TrialState


@dataclass(frozen=True)
class SearchArgs:
    """What ``distill search`` was given (None: the ``search:`` block's value, or the default)."""

    config: Path | None
    overrides: tuple[str, ...] = ()
    space: tuple[str, ...] = ()
    trials: int | None = None
    rungs: tuple[int, ...] | None = None
    storage: str | None = None
    study: str | None = None
    seed: int | None = None
    out: Path = Path("runs/search")
    group: int = 4  # trials trained together in one lockstep group
    reduction_factor: int = 3
    prune: bool = True  # False: every trial to full length (how far the rungs can be trusted)
    confirm: int = 0  # seeds the best recipe and the plain student are then trained on
    resamples: int = 1000  # of the images, for the confirmed gain's interval


def search_command(args: SearchArgs) -> Path | None:
    """Run (or continue) the search; returns ``OUT/best.yaml``, or None while other workers
    still train the study's trials (the last to finish writes it)."""
    block = read_search_block(args.config)
    if args.trials is not None and args.trials < 1:
        raise SearchError(f"--trials {args.trials}: give 1 or more")
    trials = args.trials or block.trials or 12
    given = args.rungs or block.rungs
    if not given:
        raise SearchError("--rungs S1,S2,...: give the student steps to score trials at")
    rungs = check_rungs(list(given), "--rungs")
    seed = args.seed if args.seed is not None else (block.seed or 0)
    space = load_space(args.config, args.overrides, args.space)
    check_lockstep_space(space)
    base = load_config(args.config, args.overrides)
    if base.data.holdout_images < 1:
        raise ConfigError(
            "distill search scores its trials on training images held out of training, never "
            "on the validation set: set data.holdout_images (e.g. --set data.holdout_images=200)"
        )
    if args.group < 1:
        raise SearchError(f"--group {args.group}: give 1 or more trials per lockstep group")
    main = process_state().is_main_process
    study = None
    if main:
        study = open_study(
            space, base, rungs, args.out, storage=args.storage,
            name=args.study or study_name(args.config), seed=seed,
            reduction_factor=args.reduction_factor, prune=args.prune,
        )  # fmt: skip
    worker = worker_name()
    name = study.study_name if study is not None else None
    if study is not None:  # a worker killed while it took a group
        recorded = {n for g in all_groups(args.out, study.study_name) for n in g.trials}
        orphans = orphaned(study, recorded)
        for trial in orphans:
            log.warning("search: trial %d was taken by %s, which stopped before it recorded "
                        "its group: told FAIL, another is taken in its place", trial.number,
                        trial.user_attrs["worker"])  # fmt: skip
        release(study, orphans)
    for group in share(stopped_groups(args.out, name) if name is not None else None):
        lock = claim(group.dir) if main else None
        if not share(lock is not None if main else None):
            continue  # another live worker trains it
        log.info("search: continuing group %s (trials %s)", group.dir, sorted(group.trials))
        train_group_of(group, study, args, rungs, trials, resume=True)
        if lock is not None:
            lock.close()
    while True:
        size = share(min(args.group, trials - taken(study)) if study is not None else None)
        if size <= 0:
            break
        group, lock = (None, None)
        if study is not None:
            group, lock = take_group(study, space, size, args.out, worker)
        train_group_of(share(group), study, args, rungs, trials, resume=False)
        if lock is not None:
            lock.close()
    best = share(write_outputs(study, args, rungs) if study is not None else None)
    if best is None or args.confirm < 1:
        return best
    # on the validation set, which the search never scored on; by one worker of the study
    lock = claim(args.out / "confirm") if process_state().is_main_process else None
    if share(lock is not None if process_state().is_main_process else None):
        confirm(best, args.confirm, args.out / "confirm", resamples=args.resamples)
    else:
        log.info("search: another worker confirms %s", best)
    if lock is not None:
        lock.close()
    return best


def train_group_of(
    group: Group,
    study: optuna.Study | None,
    args: SearchArgs,
    rungs: Sequence[int],
    trials: int,
    resume: bool,
) -> None:
    """Train ``group``; a resumed one from its last checkpoint, or from the start if it made
    none before the stop."""
    checkpoint = (group.dir / "checkpoints" / "last").is_file()
    resume = share(resume and checkpoint if study is not None else None)  # the main's view
    left = share(trials - taken(study) if study is not None else None)
    train_halving(group, study, args.config, args.overrides, rungs, left, resume)


def trial_rows(study: optuna.Study, rungs: Sequence[int], out: Path) -> list[dict[str, Any]]:
    """Every trial: its number, state, values, score at each rung reached and the plain
    student's of its group there (its gain is the difference)."""
    plain = plain_scores(out, study.study_name)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        scores = {s: trial.intermediate_values.get(s) for s in rungs[:-1]}
        # a pruned trial's value is its last rung's score (Optuna's tell): not a full-length one
        complete = trial.state == TrialState.COMPLETE
        scores[rungs[-1]] = trial.value if complete else None
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name.lower(),
                "params": trial.params,
                "rungs": {str(s): v for s, v in scores.items()},
                "plain": {str(s): plain.get(trial.number, {}).get(s) for s in rungs},
                "score": scores[rungs[-1]],
            }
        )
    return rows


def plain_scores(out: Path, study: str) -> dict[int, dict[int, float]]:
    """{trial: {step: the plain student's score in the trial's group}}."""
    found: dict[int, dict[int, float]] = {}
    for path in sorted(groups_dir(out, study).glob("g*/group.json")):
        group = Group.load(path)
        plain = str(group.run_dir(None))
        by_step = {s: scores[plain] for s, scores in group.rungs.items() if plain in scores}
        found.update(dict.fromkeys(group.trials, by_step))
    return found


def format_trials(rows: Sequence[dict[str, Any]], rungs: Sequence[int]) -> str:
    """A markdown table of ``trial_rows``: per rung the score and its gain over the plain
    student of the trial's group (the last rung: the full length)."""
    head = ["trial", "state", *(f"step {s} (gain)" for s in rungs), "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [_cell(row["rungs"][str(s)], row["plain"][str(s)]) for s in rungs]
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row["params"].items())  # fmt: skip
        lines.append("| " + " | ".join([str(row["trial"]), row["state"], *cells, params]) + " |")
    return "\n".join(lines)


def _cell(score: float | None, plain: float | None) -> str:
    if score is None or math.isnan(score):
        return ""
    gain = "" if plain is None or math.isnan(plain) else f" ({score - plain:+.3f})"
    return f"{score:.3f}{gain}"


def write_outputs(study: optuna.Study, args: SearchArgs, rungs: Sequence[int]) -> Path | None:
    """best.yaml, the trials' table (markdown and JSON) and the two plots; None (the table
    alone) while trials of other workers are still running."""
    rows = trial_rows(study, rungs, args.out)
    write_json(rows, args.out / "trials.json")
    table = format_trials(rows, rungs)
    write_text_atomic(args.out / "trials.md", table + "\n")
    print(table)
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        log.info("search: trials of other workers are still running; the last to finish "
                 "writes %s/best.yaml", args.out)  # fmt: skip
        return None
    if not any(t.state == TrialState.COMPLETE for t in trials):
        raise SearchError(f"no trial of the study reached the last rung: see {args.out}/trials.md")
    # trained as the trials were, to the last rung, on every training image
    length = [*args.overrides, f"train.max_steps={rungs[-1]}", "data.holdout_images=0"]
    best = write_best(study.best_params, args.config, length, args.out)
    _plots(study, args.out)
    _hparams(rows, args.out)
    log.info(
        "search: best trial %d, %.4f on the held-out images: %s (%s)",
        study.best_trial.number, study.best_value, best, json.dumps(study.best_params),
    )  # fmt: skip
    return best


def _plots(study: optuna.Study, out: Path) -> None:
    """Optuna's optimisation history and parameter importances, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():  # experimental plots; equal importances with few trials
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        optuna_plots.plot_optimization_history(study)
        plt.savefig(out / "history.png", bbox_inches="tight")
        plt.close("all")
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if len(complete) >= 2 and study.best_params:
            try:
                optuna_plots.plot_param_importances(study)
                plt.savefig(out / "importance.png", bbox_inches="tight")
            except (RuntimeError, ValueError) as err:  # too few trials to estimate importances
                log.info("search: no importance plot (%s)", err)
            plt.close("all")


def _hparams(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """Every trial that reached the last rung as a TensorBoard hparams run (``OUT/tb``): its
    values, its score at each rung."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"))
    for row in rows:
        if row["score"] is None:
            continue
        values = {k: v if isinstance(v, int | float | str | bool) else str(v)
                  for k, v in row["params"].items()}  # fmt: skip
        scores = {f"hparam/step_{s}": float(v) for s, v in row["rungs"].items() if v is not None}
        writer.add_hparams(values, scores, run_name=f"trial_{row['trial']:04d}")
    writer.close()
