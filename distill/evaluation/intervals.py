"""A KD gain with its uncertainty: paired confidence intervals over seeds and over images.

The gain is always paired: the distilled student minus the plain student trained on the same
seed (same data order), evaluated on the same images. Two intervals answer two questions, and
are reported side by side, never pooled into one:

- over seeds (``paired_seed_interval``): would training again with other seeds give the same
  gain? A Student-t interval of the mean of the per-seed gains (each on the whole validation
  set); with one seed there is no spread to estimate and no interval.
- over images (``paired_bootstrap``, ``bootstrap_gain``): would other images from the same
  distribution give the same gain? A percentile bootstrap over the validation images.

Keys of the returned ``{metric: Interval}``: ``map, ap50, ap75, aps, apm, apl`` (COCO's AP,
AP at IoU 0.5 and 0.75, AP of small / medium / large objects) and ``class_key(name)`` per class.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from scipy import stats

from distill.evaluation.accumulate import (
    AP_KEYS,
    PerImage,
    accumulate,
    ap_metrics,
    evaluate_per_image,
)

SEEDS = "t over seeds"
IMAGES = "paired bootstrap over images"
CLASS = "class/"  # the keys of the per-class gains: class_key(name)


@dataclass(frozen=True)
class Interval:
    """A gain and its confidence interval; ``low`` and ``high`` are nan, and ``reason`` says
    why, where there is no interval (one seed, no ground truth of that class or size)."""

    estimate: float
    low: float
    high: float
    confidence: float  # e.g. 0.95
    method: str  # SEEDS | IMAGES
    n: int  # seeds, or images
    reason: str = ""

    def __str__(self) -> str:
        return format_interval(self)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: nan becomes None."""
        return {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in asdict(self).items()
        }


def format_interval(interval: Interval, digits: int = 3) -> str:
    """``+0.031 [+0.012, +0.050]``; ``+0.031 (one seed: no interval)``; ``–`` without a gain."""
    if math.isnan(interval.estimate):
        return "–"
    estimate = f"{interval.estimate:+.{digits}f}"
    if math.isnan(interval.low):
        return f"{estimate} ({interval.reason or 'no interval'})"
    return f"{estimate} [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"


def class_key(name: str) -> str:
    """The key of a class's AP gain among the metrics."""
    return f"{CLASS}{name}"


# ---------------------------------------------------------------------------------------------
# Over seeds
# ---------------------------------------------------------------------------------------------


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p in [0.5, 1)) of Student's t with ``df`` degrees of freedom
    (scipy's)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    return float(stats.t.ppf(p, df))


def paired_seed_interval(gains: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of per-seed paired gains (distilled − plain, same seed) with its Student-t
    interval: mean ± t_{(1+confidence)/2, n−1} · sd / √n. One seed: no interval (nan, with the
    reason); a gain that is nan (no ground truth there) on any seed: none either."""
    values = [float(g) for g in gains]
    n = len(values)
    if n == 0:
        raise ValueError("paired_seed_interval needs the gain of at least one seed")
    mean = sum(values) / n
    if math.isnan(mean):
        return Interval(mean, math.nan, math.nan, confidence, SEEDS, n, "no ground truth")
    if n == 1:
        return Interval(mean, math.nan, math.nan, confidence, SEEDS, 1, "one seed: no interval")
    half = t_quantile((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, confidence, SEEDS, n)


def seed_intervals(
    pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], confidence: float = 0.95
) -> dict[str, Interval]:
    """``paired_seed_interval`` of every metric, from (distilled, plain) metrics per seed as
    ``coco_metrics`` returns them and a run's metrics.json holds them (-1: no ground truth)."""
    if not pairs:
        raise ValueError("seed_intervals needs the metrics of at least one seed")
    keys = [k for k in AP_KEYS if all(k in a and k in b for a, b in pairs)]
    names = [
        c
        for c in pairs[0][0].get("per_class", {})
        if all(c in a.get("per_class", {}) and c in b.get("per_class", {}) for a, b in pairs)
    ]
    out = {}
    for key in keys:
        gains = [_gain(a[key], b[key]) for a, b in pairs]
        out[key] = paired_seed_interval(gains, confidence)
    for name in names:
        gains = [_gain(a["per_class"][name], b["per_class"][name]) for a, b in pairs]
        out[class_key(name)] = paired_seed_interval(gains, confidence)
    return out


def _gain(distilled: float, plain: float) -> float:
    """distilled − plain; nan where COCO says -1 (no ground truth)."""
    return distilled - plain if distilled >= 0 and plain >= 0 else math.nan


# ---------------------------------------------------------------------------------------------
# Over images
# ---------------------------------------------------------------------------------------------


def paired_bootstrap(
    coco_gt: COCO,
    dets_a: list[dict[str, Any]],
    dets_b: list[dict[str, Any]],
    image_ids: Sequence[int],
    *,
    class_names: Mapping[int, str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """The gain of detections ``dets_a`` over ``dets_b`` (COCO results on ``image_ids``) with
    its paired bootstrap interval over images (``bootstrap_gain``). class_names: {category id:
    name} (default: the ids)."""
    pair = (
        evaluate_per_image(coco_gt, dets_a, image_ids),
        evaluate_per_image(coco_gt, dets_b, image_ids),
    )
    return bootstrap_gain(
        [pair], class_names=class_names, resamples=resamples, seed=seed, confidence=confidence
    )


def bootstrap_gain(
    pairs: Sequence[tuple[PerImage, PerImage]],
    *,
    class_names: Mapping[int, str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """Mean gain over the (distilled, plain) pairs, one per seed, with its paired percentile
    bootstrap interval over images.

    Each resample draws the validation images with replacement once and applies the same
    multiset to both models of every pair (paired: the images' difficulty cancels out, as in
    the paired bootstrap of NLP evaluation, Koehn 2004, Berg-Kirkpatrick et al. 2012). AP is
    no sum over images, so COCO's AP is accumulated again on each multiset
    (``distill.evaluation.accumulate``) and the gains are averaged over the seeds: the interval
    is that of the seed-mean gain on other images, the training seeds held fixed (their own
    spread is ``seed_intervals``; Bouthillier et al. 2021 report both sources of variance). A
    resample without ground truth of a class or size says nothing about it and is left out of
    that metric's percentiles.
    """
    if not pairs:
        raise ValueError("bootstrap_gain needs at least one (distilled, plain) pair")
    image_ids = pairs[0][0].image_ids
    if any(m.image_ids != image_ids for pair in pairs for m in pair):
        raise ValueError("the models of a paired bootstrap must be evaluated on the same images")
    names = dict(class_names or {})
    estimate = _mean_gain(pairs, None, names)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        multiplicity = np.bincount(
            rng.integers(0, len(image_ids), len(image_ids)), minlength=len(image_ids)
        )
        draws.append(_mean_gain(pairs, multiplicity, names))
    return {
        key: _percentile_interval(value, [d[key] for d in draws], confidence, len(image_ids))
        for key, value in estimate.items()
    }


def _mean_gain(
    pairs: Sequence[tuple[PerImage, PerImage]],
    multiplicity: np.ndarray | None,
    names: Mapping[int, str],
) -> dict[str, float]:
    """{metric: distilled − plain, averaged over the pairs} on the image multiset."""
    gains: list[dict[str, float]] = []
    for distilled, plain in pairs:
        a = _flat(ap_metrics(distilled, accumulate(distilled, multiplicity)), names)
        b = _flat(ap_metrics(plain, accumulate(plain, multiplicity)), names)
        gains.append({key: _gain(a[key], b[key]) for key in a})
    return {key: sum(g[key] for g in gains) / len(gains) for key in gains[0]}


def _flat(metrics: dict[str, Any], names: Mapping[int, str]) -> dict[str, float]:
    flat = {key: metrics[key] for key in AP_KEYS}
    for cat_id, ap in metrics["per_class"].items():
        flat[class_key(names.get(cat_id, str(cat_id)))] = ap
    return flat


def _percentile_interval(
    estimate: float, draws: list[float], confidence: float, n: int
) -> Interval:
    values = np.asarray([d for d in draws if not math.isnan(d)])
    if math.isnan(estimate) or not values.size:
        return Interval(estimate, math.nan, math.nan, confidence, IMAGES, n, "no ground truth")
    low, high = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return Interval(estimate, float(low), float(high), confidence, IMAGES, n)


# ---------------------------------------------------------------------------------------------
# Both
# ---------------------------------------------------------------------------------------------


def gain_intervals(
    coco_gt: COCO,
    runs: Sequence[tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    image_ids: Sequence[int],
    *,
    class_names: Mapping[int, str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Interval]]:
    """The gain of a distilled student over the plain one, from their COCO detections on
    ``image_ids`` per seed: runs = [(distilled, plain) detections of seed 1, ...].

    Returns {"seeds": {metric: Interval}, "images": {metric: Interval}}: the t interval over
    seeds and the paired bootstrap over images of the same estimate (the mean gain over seeds).
    """
    if not runs:
        raise ValueError("gain_intervals needs the detections of at least one seed")
    pairs = [
        (evaluate_per_image(coco_gt, a, image_ids), evaluate_per_image(coco_gt, b, image_ids))
        for a, b in runs
    ]
    names = dict(class_names or {})
    per_seed = [_mean_gain([pair], None, names) for pair in pairs]
    over_seeds = {
        key: paired_seed_interval([g[key] for g in per_seed], confidence) for key in per_seed[0]
    }
    over_images = bootstrap_gain(
        pairs, class_names=names, resamples=resamples, seed=seed, confidence=confidence
    )
    return {"seeds": over_seeds, "images": over_images}
