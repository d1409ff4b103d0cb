"""COCO-format dataset: validation, category mapping, box cleaning, flips, seeding, results."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Dataset

from distill.config import DataConfig
from distill.data import (
    CocoDetection,
    DatasetError,
    build_dataset,
    collate,
    hflip,
    make_generator,
    predictions_to_coco,
    seed_worker,
)

CATS = [{"id": 90, "name": "zebra"}, {"id": 1, "name": "apple"}, {"id": 7, "name": "kite"}]


def write_dataset(
    root: Path,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] | None = None,
    ann_file: str = "train.json",
    draw: bool = True,
) -> Path:
    """Write a COCO JSON and (if ``draw``) a black PNG per image; returns the JSON path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    if draw:
        for img in images:
            Image.new("RGB", (img["width"], img["height"])).save(root / "images" / img["file_name"])
    path = root / ann_file
    data = {"images": images, "annotations": annotations, "categories": categories or CATS}
    path.write_text(json.dumps(data))
    return path


def img(i: int, w: int = 64, h: int = 48) -> dict[str, Any]:
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def ann(i: int, image_id: int, bbox: list[Any], cat: int = 1, **extra: Any) -> dict[str, Any]:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, **extra}


def test_category_ids_round_trip_through_labels(tmp_path: Path) -> None:
    anns = [
        ann(1, 1, [1, 2, 10, 10], cat=90),
        ann(2, 1, [5, 5, 4, 4], cat=7),
        ann(3, 2, [0, 0, 8, 8]),
    ]
    write_dataset(tmp_path, [img(2), img(1)], anns)
    ds = CocoDetection(tmp_path, "train.json")

    assert ds.cat_id_to_label == {1: 1, 7: 2, 90: 3}
    assert ds.label_to_cat_id == {1: 1, 2: 7, 3: 90}
    assert ds.class_names == ["apple", "kite", "zebra"]
    assert ds.num_categories == 3
    assert ds.image_ids == [1, 2]  # sorted by id, whatever the file order
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [3, 2]
    assert target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2, 11, 12], [5, 5, 9, 9]]))
    assert ds[1][1]["labels"].tolist() == [1]


def test_bad_boxes_dropped_and_partial_boxes_clipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nan, inf = float("nan"), float("inf")
    anns = [
        ann(1, 1, [10, 10, 20, 20]),  # fine
        ann(2, 1, [5, 5, 0, 10]),  # zero width
        ann(3, 1, [5, 5, 10, -3]),  # negative height
        ann(4, 1, [nan, 5, 10, 10]),  # NaN
        ann(5, 1, [5, 5, inf, 10]),  # inf
        ann(6, 1, [5, 5, 10, None]),  # null (how exporters write NaN)
        ann(7, 1, [70, 5, 10, 10]),  # wholly right of the 64 px wide image
        ann(8, 1, [-20, 5, 20, 10]),  # ends exactly at x = 0: nothing inside
        ann(9, 1, [-5, 40, 20, 20]),  # partly outside left and bottom
        ann(10, 1, [50, -4, 30, 10]),  # partly outside right and top
    ]
    write_dataset(tmp_path, [img(1)], anns)
    with caplog.at_level(logging.INFO, logger="distill.data"):
        ds = CocoDetection(tmp_path, "train.json")

    assert ds.num_dropped_boxes == 7
    assert ds.num_clipped_boxes == 2
    expected = torch.tensor([[10.0, 10, 30, 30], [0, 40, 15, 48], [50, 0, 64, 6]])
    torch.testing.assert_close(ds[0][1]["boxes"], expected)
    assert sorted(ds.coco.getAnnIds()) == [1, 9, 10]  # eval sees the same cleaned boxes
    assert ds.coco.anns[9]["bbox"] == [0.0, 40.0, 15.0, 8.0]
    lines = [r.getMessage() for r in caplog.records if r.name == "distill.data"]
    assert len(lines) == 1
    assert "dropped 7" in lines[0] and "clipped 2" in lines[0]


def test_crowd_excluded_from_targets_but_kept_for_eval(tmp_path: Path) -> None:
    anns = [ann(1, 1, [0, 0, 10, 10]), ann(2, 1, [20, 20, 10, 10], iscrowd=1)]
    write_dataset(tmp_path, [img(1)], anns)
    ds = CocoDetection(tmp_path, "train.json")

    assert ds[0][1]["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0]]
    assert ds.num_crowd_boxes == 1
    assert ds.coco.anns[2]["iscrowd"] == 1
    assert sorted(ds.coco.getAnnIds(imgIds=[1])) == [1, 2]


def test_images_without_boxes_are_kept(tmp_path: Path) -> None:
    write_dataset(tmp_path, [img(1), img(2)], [ann(1, 2, [0, 0, 5, 5])])
    ds = CocoDetection(tmp_path, "train.json")

    assert len(ds) == 2
    _, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert ds[1][1]["boxes"].shape == (1, 4)


def test_missing_size_read_from_header_and_modes_converted(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("L", (40, 30), color=255).save(tmp_path / "images" / "gray.png")
    Image.new("RGBA", (20, 10), color=(0, 255, 0, 0)).save(tmp_path / "images" / "rgba.png")
    images = [{"id": 1, "file_name": "gray.png"}, {"id": 2, "file_name": "rgba.png"}]
    write_dataset(tmp_path, images, [ann(1, 1, [30, 20, 20, 20])], draw=False)
    ds = CocoDetection(tmp_path, "train.json")

    gray, target = ds[0]
    assert gray.shape == (3, 30, 40) and torch.all(gray == 1.0)
    assert target["boxes"].tolist() == [[30.0, 20.0, 40.0, 30.0]]  # clipped to the header size
    rgba, _ = ds[1]
    assert rgba.shape == (3, 10, 20)
    assert rgba[:, 0, 0].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("name", ["../x.png", "a/../../x.png", "..\\x.png", "/etc/passwd"])
def test_file_names_outside_image_folder_rejected(tmp_path: Path, name: str) -> None:
    write_dataset(tmp_path, [{"id": 5, "file_name": name, "width": 8, "height": 8}], [], draw=False)
    with pytest.raises(ValueError, match="image 5") as err:
        CocoDetection(tmp_path, "train.json")
    assert repr(name) in str(err.value)


def test_file_name_normalised_inside_folder_is_allowed(tmp_path: Path) -> None:
    write_dataset(tmp_path, [img(1)], [])
    images = [{"id": 1, "file_name": "sub/../1.png", "width": 64, "height": 48}]
    write_dataset(tmp_path, images, [], draw=False)
    assert CocoDetection(tmp_path, "train.json")[0][0].shape == (3, 48, 64)


def test_unknown_ids_in_annotations_rejected(tmp_path: Path) -> None:
    write_dataset(tmp_path, [img(1)], [ann(17, 3, [0, 0, 4, 4])])
    with pytest.raises(ValueError, match=r"annotation 17 has image_id 3"):
        CocoDetection(tmp_path, "train.json")
    write_dataset(tmp_path, [img(1)], [ann(18, 1, [0, 0, 4, 4], cat=2)])
    with pytest.raises(ValueError, match=r"annotation 18 has category_id 2"):
        CocoDetection(tmp_path, "train.json")


def test_annotation_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        CocoDetection(tmp_path, "nope.json")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json"):
        CocoDetection(tmp_path, "broken.json")
    (tmp_path / "partial.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(ValueError, match=r"partial\.json.*annotations"):
        CocoDetection(tmp_path, "partial.json")


def test_missing_and_corrupt_images_name_the_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, [img(1), img(2), img(3)], [ann(1, 2, [0, 0, 4, 4])])
    (tmp_path / "images" / "2.png").unlink()
    (tmp_path / "images" / "3.png").write_bytes(np.random.default_rng(0).bytes(300))
    ds = CocoDetection(tmp_path, "train.json")  # not checked at construction by default

    assert ds[0][0].shape == (3, 48, 64)
    with pytest.raises(FileNotFoundError, match=r"images/2\.png"):
        ds[1]
    with pytest.raises(ValueError, match=r"cannot read image .*images/3\.png"):
        ds[2]


def test_skip_empty_images_leaves_out_the_training_images_without_a_box(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mmdetection's filter_empty_gt: image 1 has no annotation, image 3 only a crowd box and a
    box wholly outside it, so neither has a box to train on; both are left out and counted,
    image 2 stays. Off (the default), all three stay; the validation split keeps them all."""
    anns = [ann(1, 2, [0, 0, 5, 5]), ann(2, 3, [1, 1, 5, 5], iscrowd=1), ann(3, 3, [70, 5, 10, 10])]
    write_dataset(tmp_path, [img(1), img(2), img(3)], anns)
    assert len(CocoDetection(tmp_path, "train.json")) == 3
    with caplog.at_level(logging.INFO, logger="distill.data"):
        ds = CocoDetection(tmp_path, "train.json", skip_empty_images=True)

    assert ds.image_ids == [2] and len(ds) == 1 and ds.num_empty_images == 2
    assert ds[0][1]["boxes"].tolist() == [[0.0, 0.0, 5.0, 5.0]]
    assert ds.coco.getImgIds() == [2] and ds.coco.getAnnIds() == [1]  # eval matches the data
    assert ds.num_dropped_boxes == 1 and ds.num_crowd_boxes == 0
    assert any("left out 2 images without a box" in r.getMessage() for r in caplog.records)
    cfg = DataConfig(root=str(tmp_path), train="train.json", val="train.json",
                     skip_empty_images=True)  # fmt: skip
    assert len(build_dataset(cfg, "train")) == 1 and len(build_dataset(cfg, "val")) == 3
    write_dataset(tmp_path, [img(1)], [], ann_file="none.json")
    with pytest.raises(DatasetError, match=r"none\.json: no image has a box to train on"):
        CocoDetection(tmp_path, "none.json", skip_empty_images=True)


def test_skip_bad_images_skips_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_dataset(tmp_path, [img(1), img(2), img(3)], [ann(1, 2, [0, 0, 4, 4])])
    (tmp_path / "images" / "2.png").unlink()
    (tmp_path / "images" / "3.png").write_bytes(np.random.default_rng(0).bytes(300))
    with caplog.at_level(logging.INFO, logger="distill.data"):
        ds = CocoDetection(tmp_path, "train.json", skip_bad_images=True)

    assert ds.image_ids == [1]
    assert ds.num_skipped_images == 2
    assert ds.coco.getImgIds() == [1] and ds.coco.getAnnIds() == []  # eval matches the data
    assert any("skipped 2" in r.getMessage() for r in caplog.records)


def test_max_images_keeps_first_ids(tmp_path: Path) -> None:
    write_dataset(tmp_path, [img(4), img(2), img(9)], [ann(1, 9, [0, 0, 4, 4])])
    ds = CocoDetection(tmp_path, "train.json", max_images=2)
    assert ds.image_ids == [2, 4]
    assert sorted(ds.coco.getImgIds()) == [2, 4] and ds.coco.getAnnIds() == []


def test_holdout_images_are_left_out_of_training_the_same_for_every_seed(
    tmp_path: Path,
) -> None:
    """``data.holdout_images``: N training images scored but never trained on (distill search's
    rungs), disjoint from the rest, the same ones whatever the run's seed; too many is an
    error naming the key."""
    write_dataset(tmp_path, [img(i) for i in range(1, 11)], [ann(1, 3, [0, 0, 4, 4])])
    data = DataConfig(root=str(tmp_path), holdout_images=3)
    held = build_dataset(data, "holdout")
    assert len(held.image_ids) == 3 and not held.train and held.hflip == 0
    for seed in (0, 1, 7):
        train = build_dataset(data, "train", seed=seed)
        assert len(train) == 7 and not set(train.image_ids) & set(held.image_ids)
        assert sorted(train.image_ids + held.image_ids) == list(range(1, 11))
    assert build_dataset(DataConfig(root=str(tmp_path)), "train").image_ids == list(range(1, 11))
    with pytest.raises(DatasetError, match=r"data\.holdout_images 10"):
        build_dataset(DataConfig(root=str(tmp_path), holdout_images=10), "train")
    with pytest.raises(DatasetError, match=r"holdout_images >= 1"):
        build_dataset(DataConfig(root=str(tmp_path)), "holdout")


def test_hflip_moves_box_with_painted_pixels_and_is_an_involution() -> None:
    image = torch.zeros(3, 20, 32)
    image[:, 4:9, 3:11] = 1.0  # rows 4..8, columns 3..10
    target = {"boxes": torch.tensor([[3.0, 4.0, 11.0, 9.0]]), "labels": torch.tensor([1])}
    flipped, ftarget = hflip(image, target)

    x1, y1, x2, y2 = ftarget["boxes"][0].tolist()
    assert (x1, y1, x2, y2) == (32 - 11, 4, 32 - 3, 9)
    ys, xs = torch.nonzero(flipped[0], as_tuple=True)
    assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
    assert flipped[:, int(y1) : int(y2), int(x1) : int(x2)].sum() == image.sum()
    assert torch.equal(target["boxes"], torch.tensor([[3.0, 4.0, 11.0, 9.0]]))  # input untouched
    again, atarget = hflip(flipped, ftarget)
    assert torch.equal(again, image) and torch.equal(atarget["boxes"], target["boxes"])


def _flip_dataset(root: Path, n: int = 8) -> None:
    """Images with one white square left of centre, boxed, so a flip is visible in the pixels."""
    images = [img(i, w=32, h=32) for i in range(1, n + 1)]
    write_dataset(root, images, [ann(i, i, [2, 2 + i, 8, 8]) for i in range(1, n + 1)])
    for i in range(1, n + 1):
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        pixels[2 + i : 10 + i, 2:10] = 255
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")


def test_train_flip_keeps_boxes_on_pixels(tmp_path: Path) -> None:
    _flip_dataset(tmp_path)
    ds = CocoDetection(tmp_path, "train.json", train=True, hflip=1.0)
    image, target = ds[0]
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0].tolist())
    assert (x1, x2) == (22, 30)
    assert image[:, y1:y2, x1:x2].min() == 1.0 and image.sum() == 3 * 64
    val = CocoDetection(tmp_path, "train.json", train=False, hflip=1.0)
    assert val[0][1]["boxes"][0, 0] == 2.0  # flips only when training


def test_flips_follow_torch_rng_only(tmp_path: Path) -> None:
    _flip_dataset(tmp_path)
    ds = CocoDetection(tmp_path, "train.json", train=True, hflip=0.5)

    def flips(other_seed: int) -> list[float]:
        torch.manual_seed(0)
        random.seed(other_seed)  # must not matter: workers seed torch from the generator
        np.random.seed(other_seed)
        return [ds[i][1]["boxes"][0, 0].item() for i in range(len(ds))]

    first = flips(1)
    assert first == flips(2)
    assert set(first) == {2.0, 22.0}


def _epoch(ds: Dataset[Any], seed: int) -> list[tuple[list[int], list[float], torch.Tensor]]:
    loader = DataLoader(
        ds,
        batch_size=2,
        shuffle=True,
        collate_fn=collate,
        generator=make_generator(seed),
        worker_init_fn=seed_worker,
        num_workers=2,
    )
    return [
        (
            [t["image_id"] for t in targets],
            [t["boxes"][0, 0].item() for t in targets],
            torch.stack(images),
        )
        for images, targets in loader
    ]


def test_dataloader_is_reproducible_with_seed_and_workers(tmp_path: Path) -> None:
    _flip_dataset(tmp_path)
    ds = CocoDetection(tmp_path, "train.json", train=True, hflip=0.5)
    first, second, other = _epoch(ds, 3), _epoch(ds, 3), _epoch(ds, 4)

    for (ids_a, x_a, img_a), (ids_b, x_b, img_b) in zip(first, second, strict=True):
        assert ids_a == ids_b and x_a == x_b and torch.equal(img_a, img_b)
    x1s = [x for _, xs, _ in first for x in xs]
    assert set(x1s) == {2.0, 22.0}  # some images flipped, some not: the check has teeth
    assert [b[:2] for b in first] != [b[:2] for b in other]


class _RngDataset(Dataset[tuple[float, float]]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, float]:
        return float(np.random.rand()), random.random()


def test_seed_worker_seeds_numpy_and_random() -> None:
    def draws() -> list[tuple[float, float]]:
        loader = DataLoader(
            _RngDataset(),
            batch_size=None,
            generator=make_generator(7),
            worker_init_fn=seed_worker,
            num_workers=2,
        )
        return [(float(a), float(b)) for a, b in loader]

    first = draws()
    assert first == draws()
    # Items 0 and 1 come from different workers: their streams must differ.
    assert first[0] != first[1]
    torch.manual_seed(123)
    seed_worker(0)
    assert np.random.rand() == np.random.RandomState(123).rand()
    assert random.random() == random.Random(123).random()


def test_collate_keeps_lists() -> None:
    a, b = torch.zeros(3, 4, 5), torch.zeros(3, 6, 7)
    images, targets = collate([(a, {"image_id": 1}), (b, {"image_id": 2})])
    assert isinstance(images, list) and images[1] is b
    assert [t["image_id"] for t in targets] == [1, 2]


def test_build_dataset_splits(tmp_path: Path) -> None:
    write_dataset(tmp_path, [img(1), img(2), img(3)], [], ann_file="train.json")
    write_dataset(tmp_path, [img(1), img(2)], [], ann_file="val.json")
    cfg = DataConfig(root=str(tmp_path), hflip=0.3, max_train_images=2)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.train and train.hflip == 0.3 and len(train) == 2
    assert not val.train and val.hflip == 0.0 and len(val) == 2
    with pytest.raises(ValueError, match="test"):
        build_dataset(cfg, "test")


def test_predictions_to_coco_round_trip(tmp_path: Path) -> None:
    anns = [ann(1, 1, [4, 6, 10, 12], cat=90), ann(2, 1, [30, 20, 8, 8], cat=7)]
    write_dataset(tmp_path, [img(1)], anns)
    ds = CocoDetection(tmp_path, "train.json")
    _, target = ds[0]
    scores = torch.tensor([0.9, 0.8])
    results = predictions_to_coco(ds, 1, target["boxes"], scores, target["labels"])

    assert results[0] == {
        "image_id": 1,
        "category_id": 90,
        "bbox": [4.0, 6.0, 10.0, 12.0],
        "score": pytest.approx(0.9),
    }
    assert results[1]["category_id"] == 7
    # Ground truth fed back as detections is a perfect score under pycocotools.
    evaluator = COCOeval(ds.coco, ds.coco.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="label 0"):
        predictions_to_coco(ds, 1, target["boxes"], scores, torch.tensor([0, 1]))
