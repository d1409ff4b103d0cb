"""Successive halving at the rungs of a search: the student steps at which its trials are scored
(the last is the full run), and the Optuna pruner that keeps the best of them at each rung.

``RungPruner`` applies the rule of Optuna's ``SuccessiveHalvingPruner`` (a trial goes on past a
rung when its score is in the top ``1 / reduction_factor`` of the scores reported there, at least
the best one) with two differences that lockstep groups need:

- the rungs are the given student steps (Optuna's are ``min_resource * reduction_factor**k``,
  which ``--rungs 500,1000,3000`` is not), so scores are reported at the steps they were taken;
- a score is compared with every score reported at that rung, by any trial of the study.
  Optuna's pruner counts a trial at a rung only once that trial has called ``should_prune``
  there, so in a group that reports together the first to ask compete with fewer trials and
  the decision depends on the order of the calls; here it does not.

What the caller (the lockstep loop) does, for each rung but the last::

    for trial, score in zip(group, scores):
        trial.report(score, step=rung)          # all of the group first, so that each is seen
    for trial in group:
        if trial.should_prune():                # then ask: the same answer in any order
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)

and at the last rung, ``study.tell(trial, score)``: the pruner never prunes there. A NaN score
is pruned; a step that is not a rung is never pruned.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import optuna

from distill.search.space import SearchError


def parse_rungs(text: str) -> tuple[int, ...]:
    """``--rungs 500,1000,2000`` -> ``(500, 1000, 2000)``, checked (``check_rungs``)."""
    source = f"--rungs {text}"
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise SearchError(f"{source}: give student steps S1,S2,... (ints)") from None
    return check_rungs(steps, source)


def check_rungs(steps: Sequence[Any], source: str) -> tuple[int, ...]:
    """Student steps that rise, the first above 0; else an error naming them and ``source``."""
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise SearchError(f"{source}: give one student step or more, as ints: {list(steps)!r}")
    if steps[0] < 1 or any(a >= b for a, b in itertools.pairwise(steps)):
        raise SearchError(f"{source}: the steps must rise from 1 or more: {list(steps)!r}")
    return tuple(steps)


def promoted(score: float, others: Sequence[float], reduction_factor: int) -> bool:
    """Whether ``score`` is in the top ``max(1, n // reduction_factor)`` of the ``n`` scores at
    a rung (``others`` and itself; higher is better, ties go on): Optuna's successive-halving
    rule."""
    scores = sorted([score, *others], reverse=True)
    return score >= scores[max(1, len(scores) // reduction_factor) - 1]


class RungPruner(optuna.pruners.BasePruner):
    """Successive halving at ``rungs`` (student steps) by ``reduction_factor`` (see the module)."""

    def __init__(self, rungs: Sequence[int], reduction_factor: int = 3) -> None:
        self.rungs = check_rungs(rungs, "rungs")
        if isinstance(reduction_factor, bool) or reduction_factor < 2:
            raise SearchError(f"reduction factor {reduction_factor!r}: give an int >= 2")
        self.reduction_factor = reduction_factor

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step not in self.rungs[:-1]:
            return False
        score = trial.intermediate_values[step]
        if math.isnan(score):
            return True
        others = [
            other.intermediate_values[step]
            for other in study.get_trials(deepcopy=False)
            if other.number != trial.number
            and step in other.intermediate_values
            and not math.isnan(other.intermediate_values[step])
        ]
        return not promoted(score, others, self.reduction_factor)
