"""The JSON card beside a weights file: written whole, read back, and broken cards named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.config import TORCHVISION_ANCHORS, load_config, replace
from distill.models.card import (
    CARD_VERSION,
    CardError,
    card_path,
    evaluation_record,
    read_card,
    record_evaluation,
    write_card,
)
from tests.conftest import REPO

CATEGORIES = [{"id": 1, "name": "person", "label": 1}, {"id": 3, "name": "car", "label": 3}]


def test_card_round_trip(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "shapes" / "teacher.yaml")
    cfg = replace(cfg, anchors=TORCHVISION_ANCHORS, **{"data.min_size": 800, "data.max_size": 1333})
    weights = tmp_path / "teacher.pt"
    assert read_card(weights) is None  # no card: None, not an error
    path = write_card(weights, cfg, "teacher", 91, CATEGORIES)
    assert path == tmp_path / "teacher.json" == card_path(weights)
    card = read_card(weights)
    assert card is not None
    assert card["version"] == CARD_VERSION and card["role"] == "teacher"
    assert card["arch"] == "retinanet_resnet50_fpn_v2" and card["model"]["zero_init_residual"]
    assert card["num_classes"] == 91 and card["categories"] == CATEGORIES
    assert card["resize"] == {"min_size": 800, "max_size": 1333}
    assert card["anchors"]["name"] == "torchvision"
    assert card["anchors"]["sizes_per_level"][0] == [32, 40, 50]  # torchvision's rounding
    assert card["normalize"]["mean"] == [0.485, 0.456, 0.406]
    assert card["postprocess"]["nms_threshold"] == 0.5


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "unreadable"),
        ('{"a": 1}', "not a weights card"),
        (json.dumps({"format": "distill-weights-card", "version": 99}), "version 99"),
        (json.dumps({"format": "distill-weights-card", "version": 1}), "misses role"),
    ],
)
def test_broken_card_is_one_line_naming_it(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "student.json").write_text(text)
    with pytest.raises(CardError) as info:
        read_card(tmp_path / "student.pt")
    message = str(info.value)
    assert str(tmp_path / "student.json") in message and words in message
    assert "\n" not in message


def test_a_teacher_card_records_its_evaluation(tmp_path: Path) -> None:
    """``distill check`` compares a teacher's mAP on other data with the mAP its card records on
    its own validation set: written by a run or by ``distill eval``, checked when read."""
    cfg = load_config(REPO / "configs" / "shapes" / "teacher.yaml")
    weights = tmp_path / "teacher.pt"
    metrics = {"map": 0.5, "ap50": 0.8, "num_images": 500}
    assert not record_evaluation(weights, evaluation_record(metrics, "val.json"))  # no card
    write_card(weights, cfg, "teacher", 91, CATEGORIES)
    assert "evaluation" not in (read_card(weights) or {})
    assert record_evaluation(weights, evaluation_record(metrics, "val.json"))
    card = read_card(weights)
    assert card is not None and card["evaluation"] == {
        "map": 0.5, "ap50": 0.8, "images": 500, "annotations": "val.json"
    }  # fmt: skip
    for broken, words in (({"map": 1.5, "images": 5}, "evaluation.map 1.5"),
                          ({"map": 0.5, "images": 0}, "evaluation.images 0")):  # fmt: skip
        card_path(weights).write_text(json.dumps({**card, "evaluation": broken}))
        with pytest.raises(CardError, match=words):
            read_card(weights)
