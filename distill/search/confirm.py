"""Confirming a search's best recipe: it and the plain student trained to full length on S seeds,
paired (one lockstep group per seed: the same seed, the same data order, one teacher forward
for both), evaluated on the validation set (which the search never scored on), and the gain
reported with its paired intervals over seeds and over images
(``distill.evaluation.intervals.gain_intervals``): overall, per object size and per class.

    result = confirm(best_yaml, seeds=3, out=OUT / "confirm")   # also OUT/confirm/confirm.json

A stopped confirmation continues: a seed whose pair finished is not trained again, one cut
short resumes from its checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distill.config import Config, load_config, override
from distill.data import CocoDetection, build_dataset
from distill.device import inference_accelerator, process_state
from distill.engine.loop import train_group
from distill.evaluation.evaluate import category_names, coco_metrics, load_detector, predict
from distill.evaluation.intervals import format_interval, gain_intervals
from distill.fileio import write_json
from distill.models.retinanet import build_transform
from distill.search.halving import plain

log = logging.getLogger(__name__)

ROLES = ("best", "plain")  # the pair of each seed, in this order (distilled, plain)


def pair_configs(best: Path, seed: int, out: Path, overrides: Sequence[str] = ()) -> list[Config]:
    """The best recipe and the plain student at ``seed``, in ``OUT/seed_S/{best,plain}``."""
    common = [*overrides, override("train.seed", seed)]
    where = out / f"seed_{seed}"
    return [
        load_config(best, [*common, override("output.dir", where / "best")]),
        load_config(best, [*common, *plain(), override("output.dir", where / "plain")]),
    ]


def train_pair(cfgs: list[Config], folder: Path) -> None:
    """One seed's pair in lockstep; finished already: nothing; stopped: from its checkpoint."""
    if all((Path(c.output.dir) / "student.pt").is_file() for c in cfgs):
        return
    resume = (folder / "checkpoints" / "last").is_file()
    train_group(cfgs, "student", folder, resume=resume, overwrite=True)


def detections(cfg: Config, dataset: CocoDetection, accelerator: Accelerator) -> list[Any]:
    """The COCO detections of the student trained in ``cfg.output.dir`` on ``dataset``."""
    weights = Path(cfg.output.dir) / "student.pt"
    detector = load_detector(cfg, "student", str(weights), dataset.num_categories + 1)
    detector.to(accelerator.device)
    batch = cfg.eval.batch_size or cfg.data.batch_size
    return predict(detector, build_transform(cfg).to(accelerator.device), dataset,
                   accelerator, batch, cfg.data.num_workers)  # fmt: skip


def confirm(
    best: Path,
    seeds: int,
    out: Path,
    overrides: Sequence[str] = (),
    resamples: int = 1000,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Train and evaluate the pairs of ``seeds`` seeds (0..S-1), and the gain's intervals;
    written to ``OUT/confirm.json`` (on the main process) and returned."""
    pairs = [pair_configs(best, seed, out, overrides) for seed in range(seeds)]
    for seed, cfgs in enumerate(pairs):
        train_pair(cfgs, out / f"seed_{seed}")
    dataset = build_dataset(pairs[0][0].data, "val")  # the same for every seed and role
    names = category_names(dataset)
    accelerator = inference_accelerator()
    runs = [tuple(detections(cfg, dataset, accelerator) for cfg in cfgs) for cfgs in pairs]
    maps = [[coco_metrics(dataset.coco, d, dataset.image_ids, names)["map"] for d in run]
            for run in runs]  # fmt: skip
    intervals = gain_intervals(
        dataset.coco, [(a, b) for a, b in runs], dataset.image_ids, class_names=names,
        resamples=resamples, seed=0, confidence=confidence,
    )  # fmt: skip
    result = {
        "best": str(best),
        "seeds": seeds,
        "map": {role: [m[i] for m in maps] for i, role in enumerate(ROLES)},
        "gain": {
            way: {key: i.as_dict() for key, i in by_metric.items()}
            for way, by_metric in intervals.items()
        },
        "confidence": confidence,
        "resamples": resamples,
    }
    if process_state().is_main_process:
        write_json(result, out / "confirm.json")
        seeds_map, images_map = intervals["seeds"]["map"], intervals["images"]["map"]
        log.info(
            "confirm: mAP gain over the plain student on %d seeds: %s over seeds, %s over "
            "images (%d%% intervals)",
            seeds, format_interval(seeds_map), format_interval(images_map),
            round(100 * confidence),
        )  # fmt: skip
    return result
