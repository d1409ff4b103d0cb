"""A KD gain with its uncertainty: the t interval over seeds against hand-computed numbers, the
re-accumulation over image multisets against pycocotools' own accumulate, and the paired
bootstrap over images on tiny synthetic COCO sets."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO

from distill.evaluation.accumulate import accumulate, ap_metrics, evaluate_per_image, per_image_of
from distill.evaluation.evaluate import coco_metrics, metrics_of, run_cocoeval
from distill.evaluation.intervals import (
    IMAGES,
    SEEDS,
    Interval,
    bootstrap_gain,
    class_key,
    format_interval,
    gain_intervals,
    paired_bootstrap,
    paired_seed_interval,
    seed_intervals,
    t_quantile,
)

NAMES = {1: "circle", 2: "square", 3: "triangle"}
SIDES = [10.0, 20.0, 50.0, 80.0, 150.0]  # small (< 32²), medium (< 96²), large boxes


def load(images: list[dict], anns: list[dict]) -> COCO:
    coco = COCO()
    categories = [{"id": c, "name": n} for c, n in NAMES.items()]
    coco.dataset = {"images": images, "annotations": anns, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def synthetic(seed: int, num_images: int = 12, tied: bool = True) -> tuple[COCO, list[dict]]:
    """Ground truth of 3 classes in all three sizes (some crowd) and detections: most objects
    found with jittered boxes, plus false positives; ``tied``: scores on a 0.1 grid, so that
    ties are ranked as pycocotools ranks them."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []

    def box() -> list[float]:
        side = float(rng.choice(SIDES))
        return [*rng.uniform(0, 200, 2), side, side]

    def score() -> float:
        return float(np.round(rng.random(), 1)) if tied else float(rng.random())

    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 400, "height": 400})
        for _ in range(rng.integers(0, 6)):
            b, cat = box(), int(rng.integers(1, 4))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": b,
                    "area": b[2] * b[3],
                    "iscrowd": int(rng.random() < 0.1),
                }
            )
            if rng.random() < 0.8:
                jittered = [v + d for v, d in zip(b, rng.normal(0, 0.1 * b[2], 4))]
                dets.append(
                    {"image_id": image_id, "category_id": cat, "bbox": jittered, "score": score()}
                )
        for _ in range(rng.integers(0, 4)):
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": box(),
                    "score": score(),
                }
            )
    return load(images, anns), dets


def ids(coco: COCO) -> list[int]:
    return sorted(coco.getImgIds())


def duplicated(
    coco: COCO, dets: list[dict], multiplicity: np.ndarray
) -> tuple[COCO, list[dict], list[int]]:
    """The image multiset as a COCO set of its own: copy c of image i is image i * 100 + c, its
    ground truths and detections copied with it."""
    images, anns, out = [], [], []
    for image_id, count in zip(ids(coco), multiplicity):
        for c in range(int(count)):
            new = image_id * 100 + c
            images.append({**coco.imgs[image_id], "id": new})
            anns += [
                {**a, "id": len(anns) + i + 1, "image_id": new}
                for i, a in enumerate(coco.imgToAnns[image_id])
            ]
            out += [{**d, "image_id": new} for d in dets if d["image_id"] == image_id]
    return load(images, anns), out, [im["id"] for im in images]


# ---------------------------------------------------------------------------------------------
# Over seeds
# ---------------------------------------------------------------------------------------------


def test_t_interval_against_a_hand_computed_one() -> None:
    # gains 0.02, 0.03, 0.04: mean 0.03, sd 0.01, t_{0.975, 2} = 4.302653 (tables) →
    # half width 4.302653 * 0.01 / sqrt(3) = 0.024841
    interval = paired_seed_interval([0.02, 0.03, 0.04])
    assert interval.estimate == pytest.approx(0.03, abs=1e-12)
    assert interval.low == pytest.approx(0.03 - 0.024841, abs=1e-6)
    assert interval.high == pytest.approx(0.03 + 0.024841, abs=1e-6)
    assert (interval.n, interval.method, interval.confidence) == (3, SEEDS, 0.95)
    # 99%: t_{0.995, 2} = 9.924843 → half width 0.057301
    assert paired_seed_interval([0.02, 0.03, 0.04], 0.99).high == pytest.approx(0.087301, 1e-5)


def test_t_quantile_matches_its_closed_forms_and_the_normal_limit() -> None:
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
        two = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
        assert t_quantile(p, 2) == pytest.approx(two, rel=1e-12)
    assert t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-6)  # tables
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959964, abs=1e-5)  # the normal's
    with pytest.raises(ValueError, match=r"0\.5 <= p < 1"):
        t_quantile(0.025, 3)


def test_one_seed_has_no_interval_and_says_why() -> None:
    interval = paired_seed_interval([0.031])
    assert interval.estimate == 0.031 and math.isnan(interval.low) and math.isnan(interval.high)
    assert format_interval(interval) == "+0.031 (one seed: no interval)"
    assert interval.as_dict()["low"] is None
    with pytest.raises(ValueError, match="at least one seed"):
        paired_seed_interval([])


def test_equal_gains_give_a_zero_width_interval() -> None:
    interval = paired_seed_interval([0.01, 0.01, 0.01])
    assert interval.low == interval.high == pytest.approx(0.01)


def test_format_interval() -> None:
    interval = Interval(0.0314, 0.0121, 0.0499, 0.95, SEEDS, 3)
    assert format_interval(interval) == "+0.031 [+0.012, +0.050]" == str(interval)
    assert format_interval(Interval(-0.02, -0.05, 0.01, 0.95, IMAGES, 9)) == (
        "-0.020 [-0.050, +0.010]"
    )
    assert format_interval(Interval(math.nan, math.nan, math.nan, 0.95, SEEDS, 2, "x")) == "–"


def test_seed_intervals_from_metrics_pairs_the_seeds_and_skips_no_ground_truth() -> None:
    def metrics(map_: float, apl: float, square: float) -> dict[str, Any]:
        return {"map": map_, "apl": apl, "per_class": {"circle": map_, "square": square}}

    pairs = [
        (metrics(0.32, -1.0, 0.5), metrics(0.30, -1.0, 0.4)),  # seed 0: gain 0.02
        (metrics(0.43, -1.0, 0.5), metrics(0.40, -1.0, 0.5)),  # seed 1: gain 0.03
        (metrics(0.24, -1.0, 0.5), metrics(0.20, -1.0, 0.5)),  # seed 2: gain 0.04
    ]
    out = seed_intervals(pairs)
    expected = paired_seed_interval([0.02, 0.03, 0.04])
    assert (out["map"].low, out["map"].high) == pytest.approx((expected.low, expected.high))
    assert out[class_key("circle")].high == pytest.approx(0.054841, abs=1e-6)
    assert math.isnan(out["apl"].estimate) and out["apl"].reason == "no ground truth"
    assert "aps" not in out  # no seed recorded it


# ---------------------------------------------------------------------------------------------
# accumulate: pycocotools' own numbers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_accumulate_equals_pycocotools(seed: int) -> None:
    coco, dets = synthetic(seed)
    areas = [a["area"] for a in coco.dataset["annotations"]]
    assert min(areas) < 32**2 < max(areas) and any(32**2 < a < 96**2 for a in areas)
    evaluator = run_cocoeval(coco, dets, ids(coco))
    assert evaluator is not None
    per_image = per_image_of(evaluator, max_dets=None)
    precision = accumulate(per_image)
    assert np.array_equal(precision, evaluator.eval["precision"])  # every cell, bit for bit
    ours = ap_metrics(per_image, precision)
    theirs = metrics_of(evaluator, NAMES)
    assert [ours[k] for k in ("map", "ap50", "ap75", "aps", "apm", "apl")] == list(
        evaluator.stats[:6]
    )
    assert {NAMES[c]: ap for c, ap in ours["per_class"].items()} == theirs["per_class"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_drawn_image_counts_as_many_times_as_it_is_drawn(seed: int) -> None:
    """Multiplicities = pycocotools on a set where each image is copied that many times (its
    ground truths and its detections): untied scores, so that the copies' ranking is defined."""
    coco, dets = synthetic(seed, tied=False)
    per_image = evaluate_per_image(coco, dets, ids(coco), max_dets=None)
    multiplicity = np.random.default_rng(seed).multinomial(12, np.full(12, 1 / 12))
    assert multiplicity.max() > 1 and multiplicity.min() == 0
    copies = run_cocoeval(*duplicated(coco, dets, multiplicity))
    assert copies is not None
    assert np.array_equal(accumulate(per_image, multiplicity), copies.eval["precision"])


def test_no_image_drawn_and_no_detection() -> None:
    coco, dets = synthetic(0)
    per_image = evaluate_per_image(coco, dets, ids(coco))
    assert (accumulate(per_image, np.zeros(12, dtype=int)) == -1).all()
    nothing = ap_metrics(per_image, accumulate(evaluate_per_image(coco, [], ids(coco))))
    zeros = coco_metrics(coco, [], ids(coco), NAMES)
    assert [nothing[k] for k in ("map", "aps", "apm", "apl")] == [0.0] * 4
    assert list(nothing["per_class"].values()) == list(zeros["per_class"].values())


# ---------------------------------------------------------------------------------------------
# Over images
# ---------------------------------------------------------------------------------------------


def test_identical_models_gain_zero_with_a_zero_width_interval() -> None:
    coco, dets = synthetic(1, num_images=20)
    out = paired_bootstrap(coco, dets, list(dets), ids(coco), class_names=NAMES, resamples=50)
    assert set(out) == {
        "map",
        "ap50",
        "ap75",
        "aps",
        "apm",
        "apl",
        *(class_key(n) for n in NAMES.values()),
    }
    for interval in out.values():
        assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
        assert (interval.method, interval.n) == (IMAGES, 20)


def perfect_and_worse(num_images: int = 20) -> tuple[COCO, list[dict], list[dict]]:
    """Detections equal to the ground truth, and the same with a false positive that outscores
    them on every image: worse on every image."""
    coco, _ = synthetic(2, num_images=num_images)
    perfect = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in coco.dataset["annotations"]
    ]
    rng = np.random.default_rng(0)
    fps = [
        {
            "image_id": i,
            "category_id": int(rng.integers(1, 4)),
            "bbox": [300, 300, 60, 60],
            "score": 0.95,
        }
        for i in ids(coco)
    ]
    return coco, perfect, perfect + fps


def test_a_model_better_on_every_image_has_an_interval_above_zero() -> None:
    coco, better, worse = perfect_and_worse()
    out = paired_bootstrap(coco, better, worse, ids(coco), class_names=NAMES, resamples=200)
    assert out["map"].estimate > 0 and out["map"].low > 0
    assert out["map"].low <= out["map"].estimate <= out["map"].high
    reverse = paired_bootstrap(coco, worse, better, ids(coco), resamples=200)
    assert reverse["map"].high < 0


def test_the_bootstrap_is_deterministic_in_its_seed() -> None:
    coco, a = synthetic(3, num_images=20)
    _, b = synthetic(4, num_images=20)  # another model's detections on the same images
    first = paired_bootstrap(coco, a, b, ids(coco), resamples=100, seed=7)
    assert first == paired_bootstrap(coco, a, b, ids(coco), resamples=100, seed=7)
    assert first != paired_bootstrap(coco, a, b, ids(coco), resamples=100, seed=8)


def test_pairing_narrows_the_interval_of_correlated_models() -> None:
    """Two models that differ on a few detections: drawing the same images for both cancels the
    images' difficulty; drawing them independently does not."""
    coco, a = synthetic(5, num_images=30)
    b = [d for i, d in enumerate(a) if i % 7]  # a without every 7th detection
    pair = (evaluate_per_image(coco, a, ids(coco)), evaluate_per_image(coco, b, ids(coco)))
    paired = bootstrap_gain([pair], resamples=200, seed=0)["map"]
    rng = np.random.default_rng(0)

    def map_of(model: int) -> float:
        draw = np.bincount(rng.integers(0, 30, 30), minlength=30)
        return float(ap_metrics(pair[model], accumulate(pair[model], draw))["map"])

    unpaired = np.percentile([map_of(0) - map_of(1) for _ in range(200)], [2.5, 97.5])
    assert paired.high - paired.low < 0.5 * (unpaired[1] - unpaired[0])


def test_gain_intervals_over_seeds_and_images_share_the_mean_gain() -> None:
    coco, better, worse = perfect_and_worse()
    half = worse[: len(worse) // 2] + better[len(worse) // 2 :]
    out = gain_intervals(
        coco, [(better, worse), (better, half)], ids(coco), class_names=NAMES, resamples=50
    )
    seeds, images = out["seeds"], out["images"]
    assert set(seeds) == set(images)
    one = paired_bootstrap(coco, better, worse, ids(coco), resamples=1)["map"].estimate
    two = paired_bootstrap(coco, better, half, ids(coco), resamples=1)["map"].estimate
    assert seeds["map"].estimate == pytest.approx((one + two) / 2)
    assert images["map"].estimate == pytest.approx(seeds["map"].estimate)
    assert seeds["map"] == paired_seed_interval([one, two])
    assert images["map"].low > 0


def test_models_on_other_images_are_not_paired() -> None:
    coco, dets = synthetic(0)
    a = evaluate_per_image(coco, dets, ids(coco))
    b = evaluate_per_image(coco, dets, ids(coco)[1:])
    with pytest.raises(ValueError, match="same images"):
        bootstrap_gain([(a, b)], resamples=1)
    for empty in (lambda: bootstrap_gain([]), lambda: seed_intervals([]),
                  lambda: gain_intervals(coco, [], ids(coco))):  # fmt: skip
        with pytest.raises(ValueError, match="at least one"):
            empty()
