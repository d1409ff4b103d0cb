"""Hostile files (issue 33, items 4, 5, 6, 9, 12): broken cards, exports that fail half-way,
a demo pointed at someone else's runs, a kill in the middle of a checkpoint save, and the
atomic writer. Every refusal is one line that names the file; nothing good is lost.

Everything hostile is laid out on the fly in tmp_path; models are the smoke config's (64 px).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.cli import main
from distill.config import Config, dump_config, load_config
from distill.data import build_dataset
from distill.models.card import CardError, dataset_categories, read_card, write_card
from distill.models.weights import save_state_dict_file
from students import build_student
from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def save_student(cfg: Config, folder: Path) -> Path:
    """A random smoke student with its card in ``folder``; returns the weights file."""
    dataset = build_dataset(cfg.data, "val")
    torch.manual_seed(0)
    model = build_student(cfg, dataset.num_categories + 1)
    weights = folder / "student.pt"
    write_card(weights, cfg, "student", dataset.num_categories + 1, dataset_categories(dataset))
    save_state_dict_file(model.state_dict(), weights)
    return weights


@pytest.fixture(scope="module")
def student_run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished-looking student run: config.yaml, metrics.json, student.pt and its card."""
    folder = tmp_path_factory.mktemp("run")
    cfg = load_config(SMOKE, smoke_overrides(shapes_root, folder))
    dump_config(cfg, folder / "config.yaml")
    (folder / "metrics.json").write_text(json.dumps({"map": 0.0, "ap50": 0.0, "job": "student"}))
    save_student(cfg, folder)
    return folder


def one_line_naming(message: str, *words: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for word in words:
        assert word in message, (word, message)


# ---------------------------------------------------------------------------------------------
# 4. Cards: one schema, checked in one place, for every reader
# ---------------------------------------------------------------------------------------------


def _set(card: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = card
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()
# (dotted key in the card, hostile value, words the error must hold besides the card's path)
HOSTILE_CARDS: dict[str, tuple[str, Any, str]] = {
    "resize-empty-list": ("resize", [], "resize"),
    "anchors-empty-list": ("anchors", [], "anchors"),
    "model-a-string": ("model", "x", "model"),
    "category-without-label": ("categories.0.label", _DELETE, "categories[0] has no label"),
    "num-classes-a-word": ("num_classes", "four", "num_classes"),
    "num-classes-huge": ("num_classes", 10**12, "num_classes"),
    "unknown-arch": ("model.arch", "retinanet_vgg_fpn", "is not one of"),
    "arch-differs": ("arch", "retinanet_resnet18_fpn", "arch"),
    "nms-threshold-0": ("postprocess.nms_threshold", 0, "postprocess.nms_threshold"),
    "score-threshold-2": ("postprocess.score_threshold", 2.0, "postprocess.score_threshold"),
    "huge-head-convs": ("model.head_convs", 10**9, "model.head_convs"),
    "head-convs-a-float": ("model.head_convs", 1.5, "model.head_convs"),
    "resize-min-size-a-string": ("resize.min_size", "64", "resize.min_size"),
    "resize-missing-key": ("resize.max_size", _DELETE, "resize misses max_size"),
    "anchors-four-levels": ("anchors.sizes", [16, 32, 64, 128], "anchors.sizes"),
    "unknown-model-key": ("model.head_conv", 2, "model.head_conv"),
    "label-out-of-range": ("categories.0.label", 99, "categories[0].label"),
    "categories-empty": ("categories", [], "categories"),
    "category-name-a-number": ("categories.1.name", 7, "categories[1].name"),
    "std-zero": ("normalize.std", [0, 1, 1], "normalize.std"),
    "topk-zero": ("postprocess.topk_candidates", 0, "postprocess.topk_candidates"),
    "version-true": ("version", True, "version"),
}


def hostile_card(run: Path, tmp_path: Path, case: str) -> Path:
    """A copy of ``run`` whose card has the ``case`` of HOSTILE_CARDS; returns the copy."""
    out = tmp_path / "hostile"
    shutil.copytree(run, out)
    card = json.loads((out / "student.json").read_text())
    key, value, _ = HOSTILE_CARDS[case]
    _set(card, key, value)
    (out / "student.json").write_text(json.dumps(card))
    return out


@pytest.mark.parametrize("case", sorted(HOSTILE_CARDS))
def test_a_hostile_card_is_one_line_naming_the_card_and_key(
    case: str, student_run: Path, tmp_path: Path
) -> None:
    run = hostile_card(student_run, tmp_path, case)
    with pytest.raises(CardError) as err:
        read_card(run / "student.pt")
    one_line_naming(str(err.value), str(run / "student.json"), HOSTILE_CARDS[case][2])


def test_a_good_card_reads(student_run: Path) -> None:
    card = read_card(student_run / "student.pt")
    assert card is not None and card["role"] == "student"


@pytest.mark.parametrize("command", ["predict", "export", "eval", "report"])
def test_every_reader_refuses_a_hostile_card(
    command: str, student_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """predict, export, eval and report all read the card through the one check."""
    run = hostile_card(student_run, tmp_path, "huge-head-convs")
    image = next((Path(load_config(run / "config.yaml").data.root) / "images").rglob("*.png"))
    args = {
        "predict": ["predict", str(run), str(image), "--out", str(tmp_path / "predicted")],
        "export": ["export", str(run)],
        "eval": ["eval", str(run)],
        "report": ["report", str(run), "--out", str(tmp_path / "report")],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    one_line_naming(err, str(run / "student.json"), "model.head_convs", "at most")
