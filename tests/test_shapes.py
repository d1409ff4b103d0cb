"""The shapes benchmark: determinism, COCO validity, sizes, occlusion, contrast, manifest, stats."""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from distill.data.shapes import (
    CLASSES,
    DIFFICULTIES,
    generate_shapes,
    get_difficulty,
    image_rng,
    render_image,
)
from distill.data.stats import format_stats, size_bucket


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _render(n: int, size: int, difficulty: str = "medium", split: str = "train") -> list:
    preset = DIFFICULTIES[difficulty]
    return [render_image(image_rng(0, split, i), size, preset) for i in range(n)]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, num_train=20, num_val=10, size=96, seed=3, workers=1)
    return out


def test_byte_identical_whatever_the_number_of_processes(small_set: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_shapes(again, num_train=20, num_val=10, size=96, seed=3, workers=2)
    names = _files(small_set)
    assert names == _files(again)
    assert "images/train/000019.png" in names and "images/val/000009.png" in names
    _, mismatch, errors = filecmp.cmpfiles(small_set, again, names, shallow=False)
    assert mismatch == [] and errors == []


def test_more_images_leave_earlier_ones_unchanged(small_set: Path, tmp_path: Path) -> None:
    fewer = tmp_path / "fewer"
    generate_shapes(fewer, num_train=7, num_val=3, size=96, seed=3, workers=1)
    shared = [f for f in _files(fewer) if f.endswith(".png")]
    assert len(shared) == 10
    _, mismatch, _ = filecmp.cmpfiles(small_set, fewer, shared, shallow=False)
    assert mismatch == []
    other_seed = render_image(image_rng(4, "train", 0), 96, DIFFICULTIES["medium"]).image
    assert not np.array_equal(
        other_seed, render_image(image_rng(3, "train", 0), 96, DIFFICULTIES["medium"]).image
    )


def test_coco_files_are_valid(small_set: Path) -> None:
    for split, count in (("train", 20), ("val", 10)):
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(small_set / f"{split}.json"))
        assert len(coco.imgs) == count
        cats = coco.loadCats(coco.getCatIds())
        assert len(cats) >= 6 and [c["name"] for c in cats] == list(CLASSES)
        data = json.loads((small_set / f"{split}.json").read_text())
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids) > 0
        assert len({im["id"] for im in data["images"]}) == count
        for im in data["images"]:
            assert (im["width"], im["height"]) == (96, 96)
            assert im["file_name"].startswith(f"{split}/")
            assert (small_set / "images" / im["file_name"]).is_file()
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
            assert a["iscrowd"] == 0 and a["area"] == pytest.approx(w * h, abs=0.01)
            assert a["category_id"] in coco.cats and a["image_id"] in coco.imgs


def test_all_three_size_buckets_at_128_px() -> None:
    drawn = _render(60, 128)
    areas = np.concatenate(
        [(r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1]) for r in drawn]
    )
    buckets = {b: sum(size_bucket(a) == b for a in areas) for b in ("small", "medium", "large")}
    assert min(buckets.values()) >= 3, buckets
    sides = np.concatenate([r.boxes[:, 2:] - r.boxes[:, :2] for r in drawn])
    assert sides.min() >= 6 and sides.max() <= 0.95 * 128  # anchor-friendly range


def test_sizes_scale_with_the_image() -> None:
    def mean_side(size: int) -> float:
        boxes = np.concatenate([r.boxes for r in _render(30, size)])
        return float(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean())

    assert mean_side(64) == pytest.approx(mean_side(128) / 2, rel=0.2)


def test_object_counts_and_empty_images() -> None:
    preset = DIFFICULTIES["medium"]
    counts = [len(r.labels) for r in _render(120, 64)]
    assert min(counts) == 0 and max(counts) <= preset.max_objects
    assert max(counts) >= preset.max_objects - 2  # crowded images do occur
    assert 0.02 <= counts.count(0) / len(counts) <= 0.25


@pytest.mark.parametrize("difficulty", ["medium", "hard"])
def test_occlusion_limit_and_full_object_boxes(difficulty: str) -> None:
    preset = DIFFICULTIES[difficulty]
    occluded = 0
    for r in _render(40, 128, difficulty):
        assert r.masks.shape == (len(r.labels), 128, 128)
        for i, (mask, box) in enumerate(zip(r.masks, r.boxes)):
            covered = r.masks[i + 1 :].any(axis=0) if i + 1 < len(r.masks) else np.zeros_like(mask)
            visible = (mask & ~covered).sum() / mask.sum()
            assert visible >= 1 - preset.max_hidden - 1e-9
            occluded += visible < 0.95
            # The box is the full object's: it holds the whole mask, which spans it to within
            # 2 px (a triangle's sharp corners are thinner than half a pixel near the tip).
            ys, xs = np.nonzero(mask)
            assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1
            assert ys.min() >= box[1] - 1 and ys.max() + 1 <= box[3] + 1
            assert xs.min() <= box[0] + 2 and xs.max() + 1 >= box[2] - 2
            assert ys.min() <= box[1] + 2 and ys.max() + 1 >= box[3] - 2
    assert occluded >= 5  # the rule is exercised, not avoided


def test_no_overlap_when_nothing_may_be_hidden() -> None:
    preset = dataclasses.replace(DIFFICULTIES["medium"], max_hidden=0.0)
    for i in range(15):
        r = render_image(image_rng(0, "val", i), 96, preset)
        assert (r.masks.sum(axis=0) <= 1).all()


def test_objects_contrast_with_their_surroundings() -> None:
    preset = DIFFICULTIES["medium"]
    checked = 0
    for r in _render(25, 128):
        img = r.image.astype(np.float64)
        for i, (mask, box, label) in enumerate(zip(r.masks, r.boxes, r.labels)):
            if CLASSES[label - 1] in ("square_cross", "striped_ellipse"):  # two colours
                continue
            later = r.masks[i + 1 :].any(axis=0) if i + 1 < len(r.masks) else np.zeros_like(mask)
            inner = mask & ~later
            inner[1:-1, 1:-1] &= (
                inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
            )
            x0, y0, x1, y1 = box.astype(int)
            near = np.zeros_like(mask)
            near[max(0, y0 - 2) : y1 + 3, max(0, x0 - 2) : x1 + 3] = True
            outer = near & ~mask & ~later
            if inner.sum() < 4 or outer.sum() < 4:
                continue
            inside = np.median(img[inner], axis=0)
            outside = img[outer]
            # Nearly all that surrounds an object differs from it by a clear colour step (the
            # generator asks this of 90% of the pixels under the box, half of it at worst).
            far = np.linalg.norm(outside - inside, axis=1) >= 0.5 * preset.min_contrast
            assert far.mean() >= 0.9
            checked += 1
    assert checked >= 30


def test_unknown_difficulty_lists_presets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="easy, medium, hard, demo"):
        generate_shapes(tmp_path / "x", num_train=1, num_val=1, difficulty="insane")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="insane"):
        get_difficulty("insane")


def test_manifest_protects_other_data(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a shapes dataset"):
        generate_shapes(other, num_train=2, num_val=1, size=64)
    assert _files(other) == ["notes.txt"]
    with pytest.raises(FileExistsError, match="is a file"):
        generate_shapes(other / "notes.txt", num_train=2, num_val=1, size=64)

    out = tmp_path / "shapes"
    generate_shapes(out, num_train=3, num_val=2, size=64, seed=1)
    manifest = json.loads((out / "shapes.json").read_text())
    assert manifest["complete"] and manifest["seed"] == 1 and manifest["difficulty"] == "easy"
    stamp = (out / "train.json").stat().st_mtime_ns

    with pytest.raises(FileExistsError, match="seed: 1 -> 2"):
        generate_shapes(out, num_train=3, num_val=2, size=64, seed=2)
    assert json.loads((out / "shapes.json").read_text()) == manifest

    # Same arguments, complete: skipped, nothing rewritten.
    (out / "images" / "val" / "000001.png").unlink()
    generate_shapes(out, num_train=3, num_val=2, size=64, seed=1)
    assert (out / "train.json").stat().st_mtime_ns == stamp
    assert not (out / "images" / "val" / "000001.png").exists()

    # Same arguments, unfinished (a run that stopped half-way): generated again.
    (out / "shapes.json").write_text(json.dumps({**manifest, "complete": False}))
    generate_shapes(out, num_train=3, num_val=2, size=64, seed=1)
    assert (out / "images" / "val" / "000001.png").is_file()
    assert json.loads((out / "shapes.json").read_text())["complete"]


def test_format_stats_of_generated_set(small_set: Path) -> None:
    text = format_stats(small_set, ["train.json", "val.json"], "images")
    assert "train.json: 20 images" in text and "val.json: 10 images" in text
    for name in CLASSES:
        assert name in text
    data = json.loads((small_set / "train.json").read_text())
    small = sum(size_bucket(a["bbox"][2] * a["bbox"][3]) == "small" for a in data["annotations"])
    assert f"small {small} (" in text
    assert f"boxes          {len(data['annotations'])}  " in text
    assert "missing files  0" in text


def test_format_stats_hand_computed(tmp_path: Path) -> None:
    ann = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},  # small
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 32, 32]},  # medium (=32²)
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 100]},  # large
            {"id": 4, "image_id": 1, "category_id": 9, "bbox": [0, 0, 96, 96]},  # medium (=96²)
        ],
        "categories": [
            {"id": 1, "name": "cat"},
            {"id": 2, "name": "dog"},
            {"id": 3, "name": "owl"},
        ],
    }
    (tmp_path / "a.json").write_text(json.dumps(ann))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(b"")
    text = format_stats(tmp_path, ["a.json"])
    assert "empty images   1 (50.0%)" in text
    assert "missing files  1" in text
    assert "boxes          4  (2.00 per image, at most 4)" in text
    assert "small 1 (25.0%)   medium 2 (50.0%)   large 1 (25.0%)" in text
    lines = text.splitlines()
    width = len("unknown id 9")  # names are padded to the longest
    assert f"    {'cat':<{width}}  1 (25.0%)" in lines
    assert f"    {'dog':<{width}}  2 (50.0%)" in lines
    assert f"    {'owl':<{width}}  0 (0.0%)" in lines
    assert "    unknown id 9  1 (25.0%)" in lines

    with pytest.raises(FileNotFoundError, match=r"b\.json"):
        format_stats(tmp_path, ["a.json", "b.json"])


def test_cli_generates_and_prints_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distill.cli import main

    assert (
        main(["data", "shapes", str(tmp_path / "d"), "--train", "4", "--val", "2", "--size", "64"])
        == 0
    )
    out = capsys.readouterr().out
    assert "train.json: 4 images" in out and "val.json: 2 images" in out and "ring" in out
    assert main(["data", "stats", str(tmp_path / "d"), "--ann", "val.json"]) == 0
    assert "train.json" not in capsys.readouterr().out


def test_demo_preset_draws_its_classes_only_and_old_manifests_stay_valid(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "demo", num_train=12, num_val=2, size=96, difficulty="demo")
    coco = json.loads((tmp_path / "demo" / "train.json").read_text())
    preset = DIFFICULTIES["demo"]
    assert [c["name"] for c in coco["categories"]] == list(preset.classes)
    assert [c["id"] for c in coco["categories"]] == [CLASSES.index(n) + 1 for n in preset.classes]
    labels = {a["category_id"] for a in coco["annotations"]}
    assert labels and labels <= {c["id"] for c in coco["categories"]}
    sides = [min(a["bbox"][2:]) for a in coco["annotations"]]
    assert min(sides) >= 0.5 * preset.min_size * 96 / 128  # large objects (a triangle side: 0.86x)
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    assert len(per_image) == 12 and min(per_image.values()) >= 1  # no empty images
    assert sum(per_image.values()) >= 2 * 12 * 0.8  # about min_objects each (a few dropped)
    manifest = json.loads((tmp_path / "demo" / "shapes.json").read_text())
    assert manifest["preset"]["classes"] == list(preset.classes)
    assert manifest["preset"]["min_objects"] == preset.min_objects == 2
    # made again with the same arguments: found complete and kept (the demo calls it each run)
    before = (tmp_path / "demo" / "train.json").stat().st_mtime_ns
    generate_shapes(tmp_path / "demo", num_train=12, num_val=2, size=96, difficulty="demo")
    assert (tmp_path / "demo" / "train.json").stat().st_mtime_ns == before
    # the benchmark's presets draw every class from 0 objects an image up, with the manifest
    # datasets made before these knobs existed have
    generate_shapes(tmp_path / "easy", num_train=1, num_val=1, size=64)
    manifest = json.loads((tmp_path / "easy" / "shapes.json").read_text())
    assert "classes" not in manifest["preset"] and DIFFICULTIES["easy"].classes == CLASSES
    assert "min_objects" not in manifest["preset"] and DIFFICULTIES["easy"].min_objects == 0
