"""Resize and anchor keys, and weights that know what they were trained with."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models.detection import RetinaNet_ResNet50_FPN_V2_Weights

from distill.cli import main
from distill.config import (
    TORCHVISION_ANCHORS,
    ConfigError,
    dump_config,
    load_config,
    replace,
    resize_bounds,
)
from distill.models.card import write_card
from distill.models.provenance import SettingsError, check_trained_settings, trained_settings
from distill.models.retinanet import build_transform
from tests.conftest import REPO

COCO = REPO / "configs" / "coco"
SHAPES = REPO / "configs" / "shapes"
V2 = RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1


def test_resize_keys() -> None:
    shapes = load_config(SHAPES / "teacher.yaml")
    assert resize_bounds(shapes.data) == (128, 128)  # image_size as before: longer side 128
    transform = build_transform(shapes)
    assert transform.min_size == (128,) and transform.max_size == 128
    coco = load_config(COCO / "teacher_eval_v2.yaml")
    transform = build_transform(coco)
    assert transform.min_size == (800,) and transform.max_size == 1333
    image = torch.zeros(3, 480, 640)
    assert transform([image])[0].image_sizes == [(800, 1066)]  # the shorter side to 800
    # capped by max_size: 300 * 1333 / 1000 = 399.9, floored as torchvision does
    assert transform([torch.zeros(3, 300, 1000)])[0].image_sizes == [(399, 1333)]
    with pytest.raises(ConfigError, match=r"data.min_size in .*--set data.min_size=600: give "):
        load_config(SHAPES / "teacher.yaml", ["data.min_size=600"])
    both = load_config(SHAPES / "teacher.yaml", ["data.min_size=600", "data.max_size=1000"])
    assert resize_bounds(both.data) == (600, 1000)  # one key per --set is fine


def test_named_anchors_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(COCO / "distill.yaml")
    assert cfg.anchors == TORCHVISION_ANCHORS
    dump_config(cfg, tmp_path / "config.yaml")  # name and numbers: reads back the same
    assert load_config(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match=r"anchors.sizes in --set .*contradicts anchors.name"):
        load_config(COCO / "distill.yaml", ["anchors.sizes=[16, 32, 64, 128, 256]"])
    with pytest.raises(ConfigError, match=r"anchors.name .*'yolo' is not one of"):
        load_config(COCO / "distill.yaml", ["anchors.name=yolo"])


def test_torchvision_weights_need_torchvisions_settings() -> None:
    cfg = load_config(COCO / "teacher_eval_v2.yaml")
    assert check_trained_settings(cfg, "teacher", V2) is not None  # the recipe is right
    wrong = replace(
        cfg,
        anchors=load_config(None).anchors,
        **{"data.min_size": None, "data.max_size": None, "data.image_size": 800},
    )
    with pytest.raises(SettingsError) as info:
        check_trained_settings(wrong, "teacher", V2)
    message = str(info.value)
    assert "anchors.sizes [16, 32, 64, 128, 256] (expected [32, 64, 128, 256, 512])" in message
    assert "data.image_size 800 (expected data.min_size 800 and data.max_size 1333" in message
    assert "teacher.weights_settings=ignore" in message and "\n" not in message
    # a deliberate override
    ignored = replace(wrong, **{"teacher.weights_settings": "ignore"})
    assert check_trained_settings(ignored, "teacher", V2) is None


def test_cli_refuses_wrong_settings_before_any_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # predict needs no COCO here: torchvision's category names come with its weights
    Image.new("RGB", (64, 48)).save(tmp_path / "photo.png")
    args = ["predict", str(COCO / "teacher_eval.yaml"), "--set", "data.max_size=800"]
    args += ["--model", "teacher", "--weights", "COCO_V1", str(tmp_path), "--out", "unused"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.max_size 800 (expected 1333)" in err and "COCO_V1" in err


def test_card_and_config_beside_a_file(tmp_path: Path) -> None:
    shapes = load_config(SHAPES / "teacher.yaml")  # anchors from 8 px, 128 px images
    carded = tmp_path / "run" / "teacher.pt"
    categories = [{"id": i, "name": f"class {i}", "label": i} for i in range(1, 9)]
    write_card(carded, shapes, "teacher", 9, categories)
    found = trained_settings(carded)
    assert found is not None and found.resize == (128, 128) and "teacher.json" in found.source
    with pytest.raises(SettingsError, match=r"data.image_size 64 \(expected 128\)"):
        check_trained_settings(replace(shapes, **{"data.image_size": 64}), "teacher", carded)

    # no card: NAME.config.yaml beside it (the shared teachers), or the run's config.yaml
    for weights, config in (
        (tmp_path / "shared" / "t.pt", tmp_path / "shared" / "t.config.yaml"),
        (tmp_path / "old_run" / "teacher.pt", tmp_path / "old_run" / "config.yaml"),
    ):
        dump_config(shapes, config)
        found = trained_settings(weights)
        assert found is not None and found.anchors.sizes == (8, 16, 32, 64, 128)
        assert str(config) in found.source


def test_card_less_torchvision_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # torch's cache keeps torchvision's files under their published names
    cached = tmp_path / "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth"
    found = trained_settings(cached)
    assert found is not None and found.torchvision and "COCO_V1" in found.source
    # a state dict of a torchvision RetinaNet built with pretrained weights: FrozenBatchNorm2d
    frozen = {"backbone.body.bn1.running_var": torch.ones(1)}
    found = trained_settings(tmp_path / "mine.pt", state=frozen)
    assert found is not None and found.torchvision
    # the project's files always have num_batches_tracked: unknown without card or config
    ours = {**frozen, "backbone.body.bn1.num_batches_tracked": torch.tensor(0)}
    assert trained_settings(tmp_path / "mine.pt", state=ours) is None
    # ... unless the user says they are torchvision's
    assert trained_settings(tmp_path / "mine.pt", "torchvision", ours) is not None
    shapes = load_config(SHAPES / "teacher.yaml")
    with caplog.at_level(logging.WARNING, logger="distill.models"):
        assert check_trained_settings(shapes, "teacher", tmp_path / "mine.pt", ours) is None
    assert "not checked" in caplog.text and "teacher.weights_settings=torchvision" in caplog.text
