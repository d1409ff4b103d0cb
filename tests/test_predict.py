"""``distill predict``: detections on a folder of images equal what ``distill eval`` scores;
unreadable images are named and counted; categories come from the card or the dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.config import Config, load_config
from distill.data import build_dataset
from distill.deploy.predict import find_categories
from distill.device import make_accelerator
from distill.evaluation.evaluate import load_detector, predict
from distill.models.card import dataset_categories, write_card
from distill.models.retinanet import build_transform
from distill.models.weights import save_state_dict_file
from students import build_student
from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def student(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A random student (bias raised: it detects) saved with its card, and its overrides."""
    tmp = tmp_path_factory.mktemp("predict")
    overrides = [*smoke_overrides(shapes_root, tmp / "run"), "eval.batch_size=2"]
    cfg = load_config(SMOKE, overrides)
    dataset = build_dataset(cfg.data, "val")
    torch.manual_seed(0)
    model = build_student(cfg, dataset.num_categories + 1)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(-1.0)
    weights = tmp / "student.pt"
    write_card(weights, cfg, "student", dataset.num_categories + 1, dataset_categories(dataset))
    save_state_dict_file(model.state_dict(), weights)
    return weights, overrides


def eval_results(cfg: Config, weights: Path) -> list[dict]:
    """The COCO results ``distill eval`` scores for the val set."""
    dataset = build_dataset(cfg.data, "val")
    detector = load_detector(cfg, "student", str(weights), dataset.num_categories + 1)
    accelerator = make_accelerator(cfg)
    return predict(detector, build_transform(cfg), dataset, accelerator, batch_size=2)


def test_predict_equals_eval_and_counts_unreadable(
    student: tuple[Path, list[str]], shapes_root: Path, tmp_path: Path
) -> None:
    weights, overrides = student
    folder = tmp_path / "photos"
    shutil.copytree(shapes_root / "images" / "val", folder / "some")
    (folder / "zz_broken.png").write_bytes(b"not a png")  # sorts last: batches stay the same
    out = tmp_path / "out"
    args = ["predict", str(SMOKE), *sets(overrides), "--weights", str(weights), str(folder)]
    assert main([*args, "--out", str(out), "--draw"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 7 and summary["predicted"] == 6
    assert [f["file"] for f in summary["failed"]] == [str(folder / "zz_broken.png")]
    assert "cannot read image" in summary["failed"][0]["reason"] and summary["complete"]
    detections = json.loads((out / "detections.json").read_text())
    assert len(list((out / "drawn" / "some").glob("*.png"))) == 6

    cfg = load_config(SMOKE, overrides)
    dataset = build_dataset(cfg.data, "val")
    expected = eval_results(cfg, weights)
    assert len(expected) > 20 and len(detections) == len(expected)
    id_of = {Path(img["file_name"]).name: img["id"] for img in dataset.coco.imgs.values()}
    names = {c["id"]: c["name"] for c in dataset.coco.dataset["categories"]}
    for got, want in zip(detections, expected, strict=True):
        assert id_of[Path(got["file_name"]).name] == want["image_id"]
        assert got["category_id"] == want["category_id"]
        assert got["category_name"] == names[want["category_id"]]
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-4)
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)

    # a higher threshold keeps only the detections above it
    high = tmp_path / "high"
    assert main([*args, "--out", str(high), "--score-thresh", "0.4"]) == 0
    kept = json.loads((high / "detections.json").read_text())
    assert 0 < len(kept) < len(detections) and min(d["score"] for d in kept) >= 0.4


def test_categories_from_card_then_dataset(student: tuple[Path, list[str]], tmp_path: Path) -> None:
    weights, overrides = student
    cfg = load_config(SMOKE, overrides)
    from_card = find_categories(cfg, "student", str(weights))
    assert "card" in from_card.source
    bare = tmp_path / "bare.pt"
    shutil.copy(weights, bare)  # no card beside it: the config's annotation file
    from_data = find_categories(cfg, "student", str(bare))
    assert from_data.by_label == from_card.by_label
    assert from_data.num_classes == from_card.num_classes == len(from_card.by_label) + 1


def test_predict_errors_are_one_line(
    student: tuple[Path, list[str]],
    shapes_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    weights, overrides = student
    base = ["predict", str(SMOKE), *sets(overrides), "--weights", str(weights)]
    missing = tmp_path / "nowhere"
    assert main([*base, str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main([*base, str(tmp_path), "--out", str(tmp_path / "o"), "--score-thresh", "2"]) == 2
    assert "--score-thresh" in capsys.readouterr().err
    shutil.copy(shapes_root / "images" / "val" / "000000.png", tmp_path)
    nothing = tmp_path / "nothing.pt"
    assert main([*base[:-1], str(nothing), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"weights file not found: {nothing}" in capsys.readouterr().err
    teacher = ["predict", str(SMOKE), *sets(overrides), "--weights", str(weights), "--model"]
    assert main([*teacher, "teacher", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "use --model student" in capsys.readouterr().err
