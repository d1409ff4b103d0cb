"""Bad input from a user: a clear error (exit 2) naming the file, key or value, found before
anything is trained or written."""

from __future__ import annotations

import re
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.config import load_config
from distill.data import build_dataset
from distill.data.coco import DatasetError
from distill.engine.checkpoint import CheckpointError, RunExistsError, check_fresh, find_checkpoint
from distill.models.weights import (
    WeightsError,
    WeightsMismatchError,
    read_weights,
    save_state_dict_file,
)
from students import build_student
from tests.conftest import REPO

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_no_full_batch_is_an_error_before_anything_is_written(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = sets(f"data.root={shapes_root}", f"output.dir={out}", "data.batch_size=32")
    assert main(["run", str(SMOKE), *args]) == 2
    err = capsys.readouterr().err
    assert "16 training images" in err and "data.batch_size 32" in err, err
    assert not out.exists()


def test_a_file_where_a_run_directory_belongs(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(RunExistsError, match="is a file"):
        check_fresh(a_file)
    with pytest.raises(CheckpointError, match="is not a directory"):
        find_checkpoint(a_file)
    assert a_file.read_text() == "mine"


def test_a_missing_image_folder_is_found_when_the_dataset_is_built(shapes_root: Path) -> None:
    cfg = load_config(SMOKE, [f"data.root={shapes_root}", "data.val_images=nothere"])
    missing = re.escape(str(shapes_root / "nothere"))
    with pytest.raises(DatasetError, match=f"image folder not found: {missing}"):
        build_dataset(cfg.data, "val")


def test_eval_errors_name_the_weights_or_the_output(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["eval", str(SMOKE), *sets(f"data.root={shapes_root}")]
    assert main([*base, "--weights", str(REPO / "README.md")]) == 2
    assert f"{REPO / 'README.md'}: cannot read weights" in capsys.readouterr().err
    weights = tmp_path / "student.pt"
    cfg = load_config(SMOKE, [f"data.root={shapes_root}"])
    save_state_dict_file(build_student(cfg, 9).state_dict(), weights)
    assert main([*base, "--weights", str(weights), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory" in capsys.readouterr().err


def test_weights_for_another_class_count_are_refused_where_nothing_would_retrain_them(
    shapes_root: Path, tmp_path: Path
) -> None:
    cfg = load_config(SMOKE, [f"data.root={shapes_root}"])
    weights = tmp_path / "student.pt"
    save_state_dict_file(build_student(cfg, 4).state_dict(), weights)  # 3 classes + background
    with_weights = load_config(SMOKE, [f"data.root={shapes_root}", f"student.weights={weights}"])
    with pytest.raises(WeightsMismatchError, match=r"has 4 classes .*, the dataset 9"):
        build_student(with_weights, 9, strict_classes=True)  # evaluation
    model = build_student(with_weights, 9)  # fine-tuning: the classifier is re-created
    assert model.head.classification_head.num_classes == 9


def test_torchvision_weights_without_a_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    weights = RetinaNet_ResNet50_FPN_Weights.COCO_V1

    def offline(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    with pytest.raises(
        WeightsError, match=rf"cannot download .*COCO_V1 from {re.escape(weights.url)}"
    ):
        read_weights(weights)


def test_a_missing_image_read_by_a_loader_worker_is_one_line(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(shapes_root, data)
    missing = sorted((data / "images" / "train").iterdir())[0]
    missing.unlink()
    args = sets(f"data.root={data}", f"output.dir={tmp_path / 'run'}", "data.num_workers=2")
    assert main(["run", str(SMOKE), *args]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("distill: error:") and missing.name in last, err
    assert "Traceback" not in err, err
