"""YOLO and Pascal VOC datasets converted to COCO: boxes, categories, sizes, the loader reading
the result, and one-line errors for bad input that leave the output folder as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from distill.config import DataConfig
from distill.data import DatasetError, build_dataset
from distill.data.convert import convert_dataset
from distill.data.stats import format_stats

# (class, x1, y1, x2, y2) pixel boxes per image; names in an order that is not sorted
NAMES = ["zebra", "apple", "kite"]
SIZES = {"a.jpg": (64, 48), "b.png": (40, 30), "sub/c.png": (50, 70), "d.jpg": (80, 60)}
BOXES: dict[str, list[tuple[int, float, float, float, float]]] = {
    "a.jpg": [(0, 4, 6, 36, 30), (2, 10, 0, 64, 48)],
    "b.png": [(1, 0.5, 1.5, 20.5, 29)],
    "sub/c.png": [],  # no label file: a background image
    "d.jpg": [(2, 8, 12, 40, 50), (0, 1, 1, 2, 2)],
}
SPLITS = {"train": ["a.jpg", "b.png", "sub/c.png"], "val": ["d.jpg"]}


def save_image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)


def yolo_line(box: tuple[int, float, float, float, float], size: tuple[int, int]) -> str:
    c, x1, y1, x2, y2 = box
    w, h = size
    cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
    return f"{c} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}"


def make_yolo(root: Path, names: Any = None) -> Path:
    """An ultralytics dataset: data.yaml, images/<split>/..., labels/<split>/....txt"""
    for split, files in SPLITS.items():
        for name in files:
            save_image(root / "images" / split / name, SIZES[name])
            if BOXES[name]:
                label = (root / "labels" / split / name).with_suffix(".txt")
                label.parent.mkdir(parents=True, exist_ok=True)
                lines = [yolo_line(b, SIZES[name]) for b in BOXES[name]]
                label.write_text("\n".join(lines) + "\n")
    (root / "labels" / "val").mkdir(parents=True, exist_ok=True)
    config = {
        "path": ".",
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(NAMES)) if names is None else names,
    }
    (root / "data.yaml").write_text(yaml.safe_dump(config))
    return root / "data.yaml"


VocBox = tuple[str, float, float, float, float]  # name, xmin, ymin, xmax, ymax


def voc_xml(file_name: str, size: tuple[int, int], boxes: list[VocBox]) -> str:
    objects = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin>"
        f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, x1, y1, x2, y2 in boxes
    )
    return (
        f"<annotation><folder>VOC</folder><filename>{file_name}</filename><size>"
        f"<width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"{objects}</annotation>"
    )


def make_voc(root: Path) -> Path:
    """A Pascal VOC folder: Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt"""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, files in SPLITS.items():
        ids = []
        for name in files:
            stem = Path(name).stem
            ids.append(stem)
            save_image(root / "JPEGImages" / f"{stem}{Path(name).suffix}", SIZES[name])
            boxes = [(NAMES[c], x1, y1, x2, y2) for c, x1, y1, x2, y2 in BOXES[name]]
            xml = voc_xml(f"{stem}{Path(name).suffix}", SIZES[name], boxes)
            (root / "Annotations" / f"{stem}.xml").write_text(xml)
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def check_converted(out: Path, names: list[str], file_name_of: dict[str, str]) -> None:
    """out/<split>.json hold the source images, sizes and boxes; ``names`` are categories 1..K;
    file_name_of maps each source image name to its file_name under out/images."""
    for split, files in SPLITS.items():
        data = read(out / f"{split}.json")
        assert data["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(names)]
        by_name = {im["file_name"]: im for im in data["images"]}
        assert sorted(by_name) == sorted(file_name_of[f] for f in files)
        for name in files:
            image = by_name[file_name_of[name]]
            assert (image["width"], image["height"]) == SIZES[name]
            assert (out / "images" / image["file_name"]).is_file()
            anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            assert len(anns) == len(BOXES[name])
            for a, (c, x1, y1, x2, y2) in zip(anns, BOXES[name]):
                assert names[a["category_id"] - 1] == NAMES[c]
                assert a["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)
                assert a["area"] == pytest.approx((x2 - x1) * (y2 - y1), abs=1e-2)
                assert a["iscrowd"] == 0
        ids = [a["id"] for a in data["annotations"]]
        assert len(set(ids)) == len(ids)


def check_loads(out: Path, names: list[str]) -> None:
    """distill's dataset reads the conversion: boxes (xyxy) and classes as in the source."""
    cfg = DataConfig(root=str(out), hflip=0.0)
    for split, files in SPLITS.items():
        ds = build_dataset(cfg, split)
        assert ds.class_names == names
        assert len(ds) == len(files)
        for i in range(len(ds)):
            image, target = ds[i]
            entry = ds.coco.imgs[target["image_id"]]
            assert image.shape == (3, entry["height"], entry["width"])
        want = sorted(
            (names.index(NAMES[c]) + 1, x1, y1, x2, y2)
            for f in files
            for c, x1, y1, x2, y2 in BOXES[f]
        )
        got = sorted(
            (int(label), *box.tolist())
            for i in range(len(ds))
            for label, box in zip(ds[i][1]["labels"], ds[i][1]["boxes"])
        )
        assert [g[0] for g in got] == [w[0] for w in want]
        assert torch.tensor([g[1:] for g in got]) == pytest.approx(
            torch.tensor([w[1:] for w in want]), abs=1e-3
        )


YOLO_FILE_NAMES = {f: f"{s}/{f}" for s, files in SPLITS.items() for f in files}
VOC_FILE_NAMES = {f: f"{s}/{Path(f).name}" for s, files in SPLITS.items() for f in files}


@pytest.mark.parametrize("names", [None, NAMES], ids=["names-mapping", "names-list"])
def test_yolo_converts_boxes_categories_and_sizes(tmp_path: Path, names: Any) -> None:
    config = make_yolo(tmp_path / "yolo", names)
    written = convert_dataset("yolo", config, tmp_path / "out")
    assert written == [tmp_path / "out" / "train.json", tmp_path / "out" / "val.json"]
    check_converted(tmp_path / "out", NAMES, YOLO_FILE_NAMES)
    assert (tmp_path / "out/images/train/a.jpg").is_symlink()
    check_loads(tmp_path / "out", NAMES)
    # what `distill data stats OUT` prints: every image file is found under OUT/images
    report = format_stats(tmp_path / "out", ["train.json", "val.json"])
    assert report.count("missing files  0") == 2


def test_yolo_folder_source_and_copied_images(tmp_path: Path) -> None:
    make_yolo(tmp_path / "yolo")
    convert_dataset("yolo", tmp_path / "yolo", tmp_path / "out", splits=["val"], copy_images=True)
    assert not (tmp_path / "out/train.json").exists()
    copied = tmp_path / "out/images/val/d.jpg"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (tmp_path / "yolo/images/val/d.jpg").read_bytes()


def test_voc_converts_boxes_categories_and_sizes(tmp_path: Path) -> None:
    source = make_voc(tmp_path / "voc")
    convert_dataset("voc", source, tmp_path / "out")
    # no class list given: every name of the converted splits, sorted
    check_converted(tmp_path / "out", sorted(NAMES), VOC_FILE_NAMES)
    check_loads(tmp_path / "out", sorted(NAMES))


def test_voc_class_list_sets_category_order(tmp_path: Path) -> None:
    source = make_voc(tmp_path / "voc")
    convert_dataset("voc", source, tmp_path / "out", classes=[*NAMES, "unused"])
    check_converted(tmp_path / "out", [*NAMES, "unused"], VOC_FILE_NAMES)


def test_image_size_is_the_upright_size(tmp_path: Path) -> None:
    """A photo turned by its EXIF orientation: YOLO's fractions are of the upright image, as
    ultralytics and distill's loader see it."""
    config = make_yolo(tmp_path / "yolo")
    photo = tmp_path / "yolo/images/val/d.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 60x80, shown 80x60
    Image.new("RGB", (60, 80)).save(photo, exif=exif)
    convert_dataset("yolo", config, tmp_path / "out")
    image = read(tmp_path / "out/val.json")["images"][0]
    assert (image["width"], image["height"]) == (80, 60)
    ds = build_dataset(DataConfig(root=str(tmp_path / "out")), "val")
    assert ds[0][0].shape == (3, 60, 80)


def test_box_within_a_pixel_of_the_border_is_clipped(tmp_path: Path) -> None:
    config = make_yolo(tmp_path / "yolo")
    # d.jpg is 80x60: x 70.5..80.5 reaches half a pixel past the right border. The class is
    # written "1.0" and a blank line is left, as some exporters do (ultralytics reads both).
    (tmp_path / "yolo/labels/val/d.txt").write_text(f"\n1.0 {75.5 / 80} 0.5 {10 / 80} 0.5\n\n")
    convert_dataset("yolo", config, tmp_path / "out")
    (a,) = read(tmp_path / "out/val.json")["annotations"]
    assert a["bbox"] == pytest.approx([70.5, 15, 9.5, 30])
    assert a["category_id"] == 2


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the file and what is wrong; nothing written
# --------------------------------------------------------------------------------------------


def yolo_broken(root: Path, what: str) -> tuple[Path, str]:
    """A YOLO dataset with one defect; returns the source and words the error must hold."""
    config = make_yolo(root)
    label = root / "labels/train/a.txt"
    first = label.read_text().splitlines()[0]
    if what == "missing folder":
        (root / "images/val/d.jpg").unlink()
        (root / "images/val").rmdir()
        return config, f"image folder not found: {root / 'images/val'}"
    if what == "missing labels":
        shutil.rmtree(root / "labels/val")
        return config, f"label folder not found: {root / 'labels/val'}"
    if what == "fields":
        label.write_text(f"{first}\n0 0.5 0.5 0.2\n")
        return config, f"{label}:2: 4 fields, expected 5"
    if what == "class":
        label.write_text(f"{first}\n3 0.5 0.5 0.2 0.2\n")
        return config, f"{label}:2: class 3 is outside the class list (0..2"
    if what == "class not an index":
        label.write_text(f"{first}\n1.5 0.5 0.5 0.2 0.2\n")
        return config, f"{label}:2: class '1.5' is not a class index"
    if what == "outside":
        label.write_text("0 0.9 0.5 0.5 0.2\n")  # x 41.6..73.6 on a 64 px wide image
        return config, f"{label}:1: box x 41.6..73.6, y 19.2..28.8 pixels is outside the 64x48"
    if what == "not a number":
        label.write_text("0 0.5 half 0.2 0.2\n")
        return config, f"{label}:1: not a box"
    if what == "names":
        (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": 3}))
        return config, f"{config}: 'names' must be a list"
    if what == "image list":
        (root / "train.txt").write_text("./images/train/a.jpg\n")
        (root / "data.yaml").write_text(yaml.safe_dump({"train": "train.txt", "names": NAMES}))
        return config, f"{config}: split 'train' is a list of images ({root / 'train.txt'})"
    if what == "nc":
        (root / "data.yaml").write_text(
            yaml.safe_dump({"val": "images/val", "nc": 2, "names": NAMES})
        )
        return config, f"{config}: nc is 2 but 'names' has 3"
    raise AssertionError(what)


YOLO_DEFECTS = [
    "missing folder",
    "missing labels",
    "fields",
    "class",
    "class not an index",
    "outside",
    "not a number",
    "names",
    "image list",
    "nc",
]


def voc_broken(root: Path, what: str) -> tuple[Path, str]:
    make_voc(root)
    xml = root / "Annotations/a.xml"
    if what == "missing folder":
        for f in (root / "JPEGImages").iterdir():
            f.unlink()
        (root / "JPEGImages").rmdir()
        return root, f"Pascal VOC folder not found: {root / 'JPEGImages'}"
    if what == "unreadable xml":
        xml.write_text("<annotation><size>")
        return root, f"{xml}: not a readable Pascal VOC file"
    if what == "outside":
        xml.write_text(voc_xml("a.jpg", (64, 48), [("kite", 10, 10, 70, 40)]))
        return root, f"{xml}: object 'kite': box x 10..70, y 10..40 pixels is outside the 64x48"
    if what == "empty box":
        xml.write_text(voc_xml("a.jpg", (64, 48), [("kite", 10, 10, 10, 40)]))
        return root, f"{xml}: object 'kite': an empty box"
    if what == "size":
        xml.write_text(voc_xml("a.jpg", (640, 480), []))
        return root, f"{xml}: <size> says 640x480 pixels but"
    if what == "missing image":
        (root / "JPEGImages/b.png").unlink()
        return root, f"no image for {root / 'Annotations/b.xml'} in {root / 'JPEGImages'}"
    if what == "missing xml":
        (root / "Annotations/d.xml").unlink()
        return root, f"annotation file not found: {root / 'Annotations/d.xml'} (listed in val.txt)"
    raise AssertionError(what)


VOC_DEFECTS = [
    "missing folder",
    "unreadable xml",
    "outside",
    "empty box",
    "size",
    "missing image",
    "missing xml",
]


BROKEN = {"yolo": yolo_broken, "voc": voc_broken}


@pytest.mark.parametrize(
    ("fmt", "what"), [("yolo", w) for w in YOLO_DEFECTS] + [("voc", w) for w in VOC_DEFECTS]
)
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, fmt: str, what: str) -> None:
    source, words = BROKEN[fmt](tmp_path / fmt, what)
    with pytest.raises((DatasetError, FileNotFoundError)) as err:
        convert_dataset(fmt, source, tmp_path / "out")
    assert words in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # everything is checked before anything is written


def test_voc_object_outside_the_class_list(tmp_path: Path) -> None:
    source = make_voc(tmp_path / "voc")
    with pytest.raises(DatasetError, match=r"a\.xml: object 'kite' is not in the class list"):
        convert_dataset("voc", source, tmp_path / "out", classes=["zebra", "apple"])


def test_existing_annotation_files_are_kept_unless_overwrite(tmp_path: Path) -> None:
    config = make_yolo(tmp_path / "yolo")
    out = tmp_path / "out"
    out.mkdir()
    (out / "val.json").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{out / 'val.json'} already exists"):
        convert_dataset("yolo", config, out)
    assert (out / "val.json").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["val.json"]  # train not written either
    convert_dataset("yolo", config, out, overwrite=True)
    check_converted(out, NAMES, YOLO_FILE_NAMES)


def test_images_already_in_out_are_kept_unless_overwrite(tmp_path: Path) -> None:
    config = make_yolo(tmp_path / "yolo")
    mine = tmp_path / "out/images/train/a.jpg"
    save_image(mine, (5, 5))
    before = mine.read_bytes()
    with pytest.raises(FileExistsError, match="images/train already holds files"):
        convert_dataset("yolo", config, tmp_path / "out")
    assert mine.read_bytes() == before and not mine.is_symlink()


def test_output_inside_the_source_is_refused(tmp_path: Path) -> None:
    """out = the YOLO root would link images/train/a.jpg onto itself."""
    config = make_yolo(tmp_path / "yolo")
    before = (tmp_path / "yolo/images/train/a.jpg").read_bytes()
    with pytest.raises(DatasetError, match="overlaps the source images"):
        convert_dataset("yolo", config, tmp_path / "yolo", overwrite=True)
    assert (tmp_path / "yolo/images/train/a.jpg").read_bytes() == before
    assert not (tmp_path / "yolo/train.json").exists()


def test_unknown_format_and_split(tmp_path: Path) -> None:
    config = make_yolo(tmp_path / "yolo")
    with pytest.raises(DatasetError, match="unknown dataset format 'coco'"):
        convert_dataset("coco", config, tmp_path / "out")
    with pytest.raises(DatasetError, match="no split 'test' \\(it has train, val\\)"):
        convert_dataset("yolo", config, tmp_path / "out", splits=["test"])
    with pytest.raises(DatasetError, match="classes= is for voc only"):
        convert_dataset("yolo", config, tmp_path / "out", classes=["a"])


def test_the_command_converts_and_reports_bad_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``distill data convert``: the converted dataset's statistics, then a defect as one line
    naming the file and line, exit status 2 (bad input), nothing written."""
    from distill.cli import main

    config = make_yolo(tmp_path / "yolo")
    assert main(["data", "convert", "yolo", str(config), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "train.json" in out and "val.json" in out and out.count("missing files  0") == 2
    check_converted(tmp_path / "out", NAMES, YOLO_FILE_NAMES)
    broken, words = yolo_broken(tmp_path / "broken", "fields")
    assert main(["data", "convert", "yolo", str(broken), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out2").exists()
    # an output that holds a conversion already is kept unless --overwrite
    assert main(["data", "convert", "yolo", str(config), str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "convert", "yolo", str(config), str(tmp_path / "out"), "--overwrite"]) == 0
