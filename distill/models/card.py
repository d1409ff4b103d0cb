"""The card beside a weights file: what is needed to rebuild and use the weights.

Every weights file this project writes gets a JSON card with the same stem (``student.pt`` ->
``student.json``, ``teacher.pt`` -> ``teacher.json``)::

    {"format": "distill-weights-card", "version": 1, "role": "teacher",
     "arch": "retinanet_resnet50_fpn_v2", "model": {...the config's teacher section...},
     "num_classes": 91, "categories": [{"id": 1, "name": "person", "label": 1}, ...],
     "anchors": {"name": "torchvision", "sizes": [...], "scales": [...], "aspect_ratios": [...],
                 "sizes_per_level": [[32, 40, 50], ...]},
     "resize": {"min_size": 800, "max_size": 1333},
     "normalize": {"mean": [...], "std": [...]},
     "postprocess": {"score_threshold": 0.05, "nms_threshold": 0.5, "detections_per_image": 300,
                     "topk_candidates": 1000}}

``label`` is the model's output index of a category (0 is background); boxes are xyxy pixels of
the original image; images are RGB in [0, 1], normalised with ``normalize`` after the resize.
A file without a card (torchvision's weights, older runs) still loads: see
``distill.models.provenance``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distill.config import Config, resize_bounds, to_dict
from distill.fileio import write_text_atomic
from distill.models.retinanet import IMAGE_MEAN, IMAGE_STD, build_anchor_generator
from distill.models.weights import WeightsError

CARD_FORMAT = "distill-weights-card"
CARD_VERSION = 1
ROLES = ("student", "teacher")
REQUIRED_KEYS = (
    "format", "version", "role", "arch", "model", "num_classes", "categories", "anchors",
    "resize", "normalize", "postprocess",
)  # fmt: skip
# torchvision's RetinaNet keeps this many best-scoring candidates per level before NMS.
TOPK_CANDIDATES = 1000


class CardError(WeightsError):
    """A card that cannot be read or used; the message names the file."""


def card_path(weights_path: str | os.PathLike[str]) -> Path:
    """Where the card of ``weights_path`` lives: the same name with ``.json``."""
    return Path(weights_path).with_suffix(".json")


def make_card(
    cfg: Config,
    role: str,
    num_classes: int,
    categories: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The card of weights trained or used with ``cfg`` as ``role`` (student | teacher).

    num_classes: outputs of the classifier, background included.
    categories:  [{"id": dataset category id, "name": str, "label": model output index}].
    """

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    section = cfg.teacher if role == "teacher" else cfg.student
    min_size, max_size = resize_bounds(cfg.data)
    anchors = to_dict(cfg.anchors)
    anchors["sizes_per_level"] = [list(s) for s in build_anchor_generator(cfg.anchors).sizes]
    return {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "role": role,
        "arch": section.arch,
        "model": to_dict(section),
        "num_classes": int(num_classes),
        "categories": [
            {"id": int(c["id"]), "name": str(c["name"]), "label": int(c["label"])}
            for c in categories
        ],
        "anchors": anchors,
        "resize": {"min_size": min_size, "max_size": max_size},
        "normalize": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
        "postprocess": {
            "score_threshold": cfg.eval.score_threshold,
            "nms_threshold": cfg.eval.nms_threshold,
            "detections_per_image": cfg.eval.detections_per_image,
            "topk_candidates": TOPK_CANDIDATES,
        },
    }


def write_card(
    weights_path: str | os.PathLike[str],
    cfg: Config,
    role: str,
    num_classes: int,
    categories: Sequence[Mapping[str, Any]],
) -> Path:
    """Write the card of ``weights_path`` (atomically) and return its path. Written before
    the weights, so that a weights file on disk always has its card."""
    path = card_path(weights_path)
    card = make_card(cfg, role, num_classes, categories)
    write_text_atomic(path, json.dumps(card, indent=2) + "\n")
    return path


def read_card(weights_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The card of ``weights_path``, or None when it has none.

    Raises CardError (one line, naming the card) for a card that is not JSON, not a card of
    this project, from a newer version, or missing keys.
    """
    path = card_path(weights_path)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CardError(f"weights card {path} is unreadable: {err}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise CardError(
            f'{path} is not a weights card (no "format": "{CARD_FORMAT}"); a file beside '
            f"{Path(weights_path).name} with its stem and .json is read as its card: rename it"
        )
    version = card.get("version")
    if not isinstance(version, int) or version > CARD_VERSION:
        raise CardError(
            f"weights card {path} has version {version!r}; this distill reads up to "
            f"{CARD_VERSION} (a newer distill wrote it?)"
        )
    missing = [key for key in REQUIRED_KEYS if key not in card]
    if missing:
        raise CardError(f"weights card {path} misses {', '.join(missing)}")
    if card["role"] not in ROLES:
        raise CardError(f"weights card {path}: role {card['role']!r} is not one of {ROLES}")
    return card


def dataset_categories(dataset: Any) -> list[dict[str, Any]]:
    """[{"id", "name", "label"}] of a ``CocoDetection``, in label order."""
    return [
        {"id": cat_id, "name": dataset.class_names[label - 1], "label": label}
        for cat_id, label in sorted(dataset.cat_id_to_label.items(), key=lambda kv: kv[1])
    ]
