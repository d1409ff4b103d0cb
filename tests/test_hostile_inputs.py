"""Hostile user inputs (issue 33, items 1, 2, 3, 7, 8, 11): truncated JPEGs, EXIF orientation,
16-bit PNGs, images predict cannot run, paths YAML would misread, names matplotlib would read
as math, and KD terms the report's curves must show. Every hostile file is made in tmp_path."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import CocoDetection, load_image

pytestmark = pytest.mark.usefixtures("one_thread")


def write_coco(root: Path, images: dict[str, tuple[int, int] | None]) -> Path:
    """``root/ann.json`` for the files ``root/images/<name>`` with (width, height) (None: not
    in the JSON) and one box each, the left half of the image; returns the JSON's path."""
    entries, anns = [], []
    for i, (name, size) in enumerate(images.items(), 1):
        entry: dict[str, Any] = {"id": i, "file_name": name}
        if size is not None:
            entry["width"], entry["height"] = size
        entries.append(entry)
        w, h = size or (8, 8)
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, w / 2, h]})
    path = root / "ann.json"
    categories = [{"id": 1, "name": "thing"}]
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": categories}))
    return path


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# 1. skip_bad_images catches truncated JPEGs
# --------------------------------------------------------------------------------------------


def test_skip_bad_images_catches_a_truncated_jpeg(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("good.jpg", "cut.jpg"):
        Image.fromarray(noise(48, 64)).save(folder / name, quality=95)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(folder / "cut.jpg") as im:
        im.verify()  # what the check did: it passes a truncated JPEG
    write_coco(tmp_path, {"good.jpg": (64, 48), "cut.jpg": (64, 48)})

    with caplog.at_level(logging.WARNING, logger="distill.data"):
        ds = CocoDetection(tmp_path, "ann.json", skip_bad_images=True)
    assert len(ds) == 1 and ds.num_skipped_images == 1
    assert str(folder / "cut.jpg") in caplog.text and "truncated" in caplog.text
    image, _ = ds[0]  # what is left loads
    assert image.shape == (3, 48, 64)


# --------------------------------------------------------------------------------------------
# 2. EXIF orientation and 16-bit PNGs
# --------------------------------------------------------------------------------------------


def rotated_jpeg(path: Path) -> None:
    """A JPEG stored 60 wide x 30 tall, black with a white top-left corner, whose EXIF says
    "rotate 90 degrees clockwise to show" (orientation 6): shown 30 wide x 60 tall, the white
    corner at the top right."""
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, quality=95, exif=exif)


def test_load_image_applies_the_exif_orientation(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rotated_jpeg(folder / "phone.jpg")
    image = load_image(folder / "phone.jpg")
    assert image.shape == (3, 60, 30)  # as shown: 30 wide, 60 tall
    assert image[:, :10, -10:].mean() > 0.9 and image[:, -10:, :10].mean() < 0.1

    # COCO's width / height are those of the shown image: the dataset reads and checks them so
    write_coco(tmp_path, {"phone.jpg": (30, 60)})
    for skip in (False, True):
        ds = CocoDetection(tmp_path, "ann.json", skip_bad_images=skip)
        shown, target = ds[0]
        assert shown.shape == (3, 60, 30) and ds.num_skipped_images == 0
        assert target["boxes"].tolist() == [[0.0, 0.0, 15.0, 60.0]]  # not clipped to 30 tall
    write_coco(tmp_path, {"phone.jpg": None})  # sizes from the file: those shown
    ds = CocoDetection(tmp_path, "ann.json")
    assert ds.coco.imgs[1]["width"] == 30 and ds.coco.imgs[1]["height"] == 60
    assert ds[0][0].shape == (3, 60, 30)


def test_load_image_scales_16_bit_pngs(tmp_path: Path) -> None:
    values = (np.arange(40 * 50).reshape(40, 50) * 32).astype(np.uint16)  # 0 .. 63968
    values[0, 0], values[0, 1] = 65535, 129  # the top, and a value that rounds up (129 / 257)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    image = load_image(path)
    eight = torch.from_numpy(np.round(values / 257).astype(np.uint8))
    assert image.shape == (3, 40, 50) and image.dtype == torch.float32
    for channel in image:
        assert torch.equal(channel, eight.float() / 255)  # x / 255, as every other image
    assert image[0, 0, 0] == 1.0 and image[0, 0, 1] == 1 / 255
    assert (image == 1.0).float().mean() < 0.01  # not the near-white image of PIL's convert
