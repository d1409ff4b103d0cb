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
                     "topk_candidates": 1000},
     "evaluation": {"map": 0.52, "ap50": 0.84, "images": 500, "annotations": "data/val.json"}}

``evaluation`` (optional) is the model's COCO mAP on its own validation set, recorded when a
teacher is trained or evaluated here (``record_evaluation``); ``distill check`` compares a
teacher's mAP on the user's data against it.
``label`` is the model's output index of a category (0 is background); boxes are xyxy pixels of
the original image; images are RGB in [0, 1], normalised with ``normalize`` after the resize.
A file without a card (torchvision's weights, older runs) still loads: see
``distill.models.provenance``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distill.config import (
    AnchorConfig,
    Config,
    ConfigError,
    check_values,
    from_dict,
    resize_bounds,
    resolve_defaults,
    to_dict,
)
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
    evaluation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The card of weights trained or used with ``cfg`` as ``role`` (student | teacher).

    num_classes: outputs of the classifier, background included.
    categories:  [{"id": dataset category id, "name": str, "label": model output index}].
    evaluation:  ``evaluation_record`` of the model on its validation set, or None.
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
        **({"evaluation": dict(evaluation)} if evaluation is not None else {}),
    }


def write_card(
    weights_path: str | os.PathLike[str],
    cfg: Config,
    role: str,
    num_classes: int,
    categories: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Any] | None = None,
) -> Path:
    """Write the card of ``weights_path`` (atomically) and return its path. Written before
    the weights, so that a weights file on disk always has its card."""
    path = card_path(weights_path)
    card = make_card(cfg, role, num_classes, categories, evaluation)
    write_text_atomic(path, json.dumps(card, indent=2) + "\n")
    return path


def evaluation_record(
    metrics: Mapping[str, Any], annotations: str | os.PathLike[str]
) -> dict[str, Any]:
    """What a card records of an evaluation: mAP, AP50, the number of images, the file."""
    return {
        "map": float(metrics["map"]),
        "ap50": float(metrics["ap50"]),
        "images": int(metrics["num_images"]),
        "annotations": str(annotations),
    }


def record_evaluation(weights_path: str | os.PathLike[str], record: Mapping[str, Any]) -> bool:
    """Add ``record`` (``evaluation_record``) to the card of ``weights_path`` as its
    ``evaluation``; False (nothing written) when the weights have no card."""
    card = read_card(weights_path)
    if card is None:
        return False
    card["evaluation"] = dict(record)
    write_text_atomic(card_path(weights_path), json.dumps(card, indent=2) + "\n")
    return True


def read_card(weights_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The card of ``weights_path``, checked (``check_card``), or None when it has none.

    Raises CardError (one line, naming the card and the key) for a card that is not JSON, not a
    card of this project, from a newer version, or with a key missing, of the wrong type or out
    of range.
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
    return check_card(card, f"weights card {path}", Path(weights_path))


# The card's sections (JSON objects) and the keys each must have.
SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("arch",),
    "anchors": ("sizes", "scales", "aspect_ratios"),
    "resize": ("min_size", "max_size"),
    "normalize": ("mean", "std"),
    "postprocess": ("score_threshold", "nms_threshold", "detections_per_image", "topk_candidates"),
}
# More classes than this is a broken card, not a model (LVIS has 1203): its classifier alone
# would take gigabytes.
MAX_CLASSES = 10_000
# The card keys of the config keys that ``config_from_card`` fills (config errors name these).
_CARD_KEYS = (
    ("student.", "model."), ("teacher.", "model."), ("eval.", "postprocess."),
    ("data.min_size", "resize.min_size"), ("data.max_size", "resize.max_size"),
    ("data.image_size", "resize.max_size"), ("anchors.", "anchors."),
)  # fmt: skip


def check_card(card: dict[str, Any], source: str, weights: Path) -> dict[str, Any]:
    """``card`` (a JSON object with the card's format) if it is whole and usable: every key of
    the schema in this module's docstring there, of its type and in its range. The sections
    that are config sections (model, anchors, resize, postprocess) are checked as a config is
    (``config_from_card``). Otherwise CardError: one line naming ``source`` and the key.

    The card of an exported ONNX model (its metadata) is checked here too.
    """
    version = card.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version > CARD_VERSION:
        raise CardError(
            f"{source} has version {version!r}; this distill reads up to "
            f"{CARD_VERSION} (a newer distill wrote it?)"
        )
    missing = [key for key in REQUIRED_KEYS if key not in card]
    if missing:
        raise CardError(f"{source} misses {', '.join(missing)}")
    if card["role"] not in ROLES:
        raise CardError(f"{source}: role {card['role']!r} is not one of {ROLES}")
    for name, keys in SECTIONS.items():
        section = card[name]
        if not isinstance(section, dict):
            raise CardError(
                f"{source}: {name} must be an object with {', '.join(keys)}, got "
                f"{type(section).__name__} {section!r}"
            )
        absent = [key for key in keys if key not in section]
        if absent:
            raise CardError(f"{source}: {name} misses {', '.join(absent)}")
    try:
        config_from_card(card, weights, source)
    except ConfigError as err:
        raise CardError(_card_keys(str(err))) from None
    if card["arch"] != card["model"]["arch"]:
        raise CardError(
            f"{source}: arch {card['arch']!r} differs from model.arch {card['model']['arch']!r}"
        )
    num_classes = card["num_classes"]
    if not _is_int(num_classes) or not 2 <= num_classes <= MAX_CLASSES:
        raise CardError(
            f"{source}: num_classes {num_classes!r} must be a whole number from 2 to "
            f"{MAX_CLASSES} (the classes, background included)"
        )
    _check_categories(card["categories"], num_classes, source)
    _check_evaluation(card.get("evaluation"), source)
    post = card["postprocess"]
    if not _is_number(post["score_threshold"]) or not 0 <= post["score_threshold"] <= 1:
        raise CardError(
            f"{source}: postprocess.score_threshold {post['score_threshold']!r} must be a "
            "number in [0, 1]"
        )
    if not _is_int(post["topk_candidates"]) or post["topk_candidates"] < 1:
        raise CardError(
            f"{source}: postprocess.topk_candidates {post['topk_candidates']!r} must be a whole "
            "number >= 1"
        )
    for key in ("mean", "std"):
        values = card["normalize"][key]
        if (
            not isinstance(values, list)
            or len(values) != 3
            or not all(_is_number(v) and (key == "mean" or v > 0) for v in values)
        ):
            words = "positive numbers" if key == "std" else "numbers"
            raise CardError(f"{source}: normalize.{key} {values!r} must be 3 {words} (R, G, B)")
    return card


def _check_categories(categories: Any, num_classes: int, source: str) -> None:
    """[{"id": int, "name": str, "label": 1..num_classes - 1}, ...], ids and labels distinct."""
    if not isinstance(categories, list) or not categories:
        raise CardError(
            f"{source}: categories must be a non-empty list of "
            '{"id": ..., "name": ..., "label": ...}, got ' + repr(categories)[:80]
        )
    seen: dict[str, set[Any]] = {"id": set(), "label": set()}
    for i, category in enumerate(categories):
        where = f"{source}: categories[{i}]"
        if not isinstance(category, dict):
            raise CardError(f"{where} must be an object, got {category!r}")
        for key, ok, words in (
            ("id", _is_int, "a whole number"),
            ("name", lambda v: isinstance(v, str), "a string"),
            ("label", _is_int, "a whole number"),
        ):
            if key not in category:
                raise CardError(f"{where} has no {key}")
            if not ok(category[key]):
                raise CardError(f"{where}.{key} {category[key]!r} must be {words}")
        if not 1 <= category["label"] < num_classes:
            raise CardError(
                f"{where}.label {category['label']} must be from 1 to {num_classes - 1} "
                f"(num_classes {num_classes}; 0 is the background)"
            )
        for key in ("id", "label"):
            if category[key] in seen[key]:
                raise CardError(f"{where}.{key} {category[key]} is given twice")
            seen[key].add(category[key])


def _check_evaluation(evaluation: Any, source: str) -> None:
    """Absent, or {"map": [0, 1], "images": >= 1, ...}."""
    if evaluation is None:
        return
    if not isinstance(evaluation, dict):
        raise CardError(f"{source}: evaluation must be an object, got {evaluation!r}")
    value: Any = evaluation.get("map")
    if not _is_number(value) or not 0 <= value <= 1:
        raise CardError(f"{source}: evaluation.map {value!r} must be a number in [0, 1]")
    images: Any = evaluation.get("images")
    if not _is_int(images) or images < 1:
        raise CardError(f"{source}: evaluation.images {images!r} must be a whole number >= 1")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _card_keys(message: str) -> str:
    """A config error about a config built from a card, with the card's key names."""
    for config_key, card_key in _CARD_KEYS:
        for lead in ("", "unknown key "):
            if message.startswith(lead + config_key):
                return lead + card_key + message[len(lead + config_key) :]
    return message


def config_from_card(
    card: dict[str, Any], weights: str | os.PathLike[str], source: str | None = None
) -> Config:
    """The ``Config`` that builds the card's model with ``weights`` loaded (model section,
    anchors, resize, detection settings; the rest is default and unused), checked as a config
    file is (``check_values``); ConfigError naming the config key and ``source`` (default: the
    card of ``weights``) otherwise."""
    role = card["role"]
    source = source or str(card_path(weights))
    model = {**card["model"], "weights": str(weights)}
    if role == "student":
        model["backbone_weights"] = None  # the weights hold the whole model
    anchor_keys = {f.name for f in dataclasses.fields(AnchorConfig)}
    resize = card["resize"]
    post = card["postprocess"]
    raw = {
        "data": {
            "image_size": resize["max_size"],
            "min_size": resize["min_size"],
            "max_size": resize["max_size"],
        },
        "anchors": {k: v for k, v in card["anchors"].items() if k in anchor_keys},
        role: model,
        "eval": {
            "score_threshold": post["score_threshold"],
            "nms_threshold": post["nms_threshold"],
            "detections_per_image": post["detections_per_image"],
        },
    }
    cfg = resolve_defaults(from_dict(Config, raw, source))  # as a config file is read
    check_values(cfg, source)
    return cfg


def dataset_categories(dataset: Any) -> list[dict[str, Any]]:
    """[{"id", "name", "label"}] of a ``CocoDetection``, in label order."""
    return [
        {"id": cat_id, "name": dataset.class_names[label - 1], "label": label}
        for cat_id, label in sorted(dataset.cat_id_to_label.items(), key=lambda kv: kv[1])
    ]
