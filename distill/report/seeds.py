"""The gain over several seeds: the distilled students of one recipe paired with the plain
students by ``train.seed``, and the intervals of their gain (``distill.evaluation.intervals``).

A recipe is a config up to its ``train.seed`` and ``output`` section: runs that differ only
there are the same recipe trained on other seeds. Each is paired with the baseline of its own
seed (same seed, same data order); a recipe with at least two such pairs gets its gain with a
confidence interval over seeds (from the runs' metrics.json, as the summary's numbers) and over
images (a paired bootstrap on the models evaluated again here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from distill.config import Config, flatten
from distill.data import CocoDetection
from distill.evaluation.accumulate import PerImage, evaluate_per_image, per_image_of
from distill.evaluation.evaluate import category_names
from distill.evaluation.intervals import Interval, bootstrap_gain, seed_intervals
from distill.report.model import Lineup, Model

log = logging.getLogger(__name__)


@dataclass
class SeedGroup:
    """One recipe's (distilled, plain) runs of the same seed, and the intervals of the gain."""

    pairs: list[tuple[Model, Model]]  # sorted by seed
    seeds: dict[str, Interval] = field(default_factory=dict)  # over seeds, from metrics.json
    images: dict[str, Interval] = field(default_factory=dict)  # over images; {}: not computed
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ", ".join(distilled.name for distilled, _ in self.pairs)


def seed_of(model: Model) -> int:
    return model.cfg.train.seed


def recipe(cfg: Config) -> str:
    """What two runs of one recipe share: every config key but the seed and the output."""
    shared = {k: v for k, v in flatten(cfg).items() if k != "train.seed" and k != "output.dir"}
    return repr(sorted(shared.items()))


def seed_groups(lineup: Lineup) -> list[SeedGroup]:
    """The recipes among the students with at least two seeds that have a baseline of their
    own seed (a student whose seed has no baseline, or a second run of a seed, is left out
    with a note)."""
    plain = {seed_of(b): b for b in reversed(lineup.baselines)}  # the first of a seed wins
    recipes: dict[str, list[Model]] = {}
    for student in lineup.students:
        recipes.setdefault(recipe(student.cfg), []).append(student)
    groups = []
    for students in recipes.values():
        group = SeedGroup(pairs=[])
        for student in sorted(students, key=seed_of):
            seed = seed_of(student)
            if seed not in plain:
                group.notes.append(f"{student.name}: no baseline of seed {seed}, left out")
            elif any(seed_of(s) == seed for s, _ in group.pairs):
                group.notes.append(f"{student.name}: a second run of seed {seed}, left out")
            else:
                group.pairs.append((student, plain[seed]))
        if len(group.pairs) >= 2:
            groups.append(group)
    return groups


def gain_over_seeds(
    lineup: Lineup, dataset: CocoDetection, resamples: int, confidence: float = 0.95
) -> list[SeedGroup]:
    """``seed_groups`` with their intervals: over seeds always, over images (``resamples``
    bootstrap resamples of ``dataset``'s images) when every model of the group was evaluated
    here and ``resamples`` > 0."""
    groups = seed_groups(lineup)
    names = category_names(dataset)
    for group in groups:
        metrics = [(a.metrics or {}, b.metrics or {}) for a, b in group.pairs]
        group.seeds = seed_intervals(metrics, confidence)
        unevaluated = [m.name for pair in group.pairs for m in pair if not m.evaluated]
        if unevaluated:
            group.notes.append(f"no interval over images: {', '.join(unevaluated)} not evaluated")
        elif resamples > 0:
            log.info("bootstrap over images of %s: %d resamples", group.name, resamples)
            pairs = [(_per_image(a, dataset), _per_image(b, dataset)) for a, b in group.pairs]
            group.images = bootstrap_gain(
                pairs, class_names=names, resamples=resamples, confidence=confidence
            )
    return groups


def _per_image(model: Model, dataset: CocoDetection) -> PerImage:
    if model.evaluator is None:  # evaluated, without a detection
        return evaluate_per_image(dataset.coco, [], dataset.image_ids)
    return per_image_of(model.evaluator)
