"""YOLO (ultralytics) and Pascal VOC datasets read into ``SourceSplit``s, checked box by box.

- ``yolo``: ultralytics' ``data.yaml`` (``names`` as a list or ``{index: name}``, optional
  ``path`` relative to the yaml's folder, ``train`` / ``val`` / ``test`` image folders or lists
  of folders relative to that); each image's labels in the file that ultralytics reads: the last
  ``images`` folder of its path replaced by ``labels``, suffix ``.txt``, one ``class cx cy w h``
  line (normalised to the upright image) per box. An image without a label file has no boxes
  (a background image), as in ultralytics.
- ``voc``: ``Annotations/ID.xml``, ``JPEGImages/ID.<ext>``, ``ImageSets/Main/<split>.txt``.
  Box corners are taken as written (``x = xmin``, ``w = xmax - xmin``), as globox and CVAT read
  them; detectron2 instead shifts ``xmin``/``ymin`` by the devkit's 1-based pixel index.
  ``difficult`` objects are kept as ordinary boxes (detectron2 keeps them too).

globox parses the files (a YOLO label line, a VOC XML); this module maps the folder layouts,
reads the image sizes (upright, as ``load_image`` shows them) and checks every box. Errors are
one line naming the file: ``DatasetError``, or ``FileNotFoundError`` for what is missing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from globox import Annotation, BoundingBox, ParsingError
from PIL import Image

from distill.data.coco import DatasetError, display_size

DEFAULT_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Corners this far outside the image are exporters' rounding and are clipped to it; farther out,
# the box or the image size is wrong and the conversion stops.
BORDER_TOLERANCE_PX = 1.0


@dataclass
class SourceImage:
    """One image of the source: boxes are (class index 0..K-1, [x, y, w, h] pixels)."""

    path: Path
    file_name: str  # relative to OUT/images: "<split>/..."
    width: int
    height: int
    boxes: list[tuple[int, list[float]]] = field(default_factory=list)


@dataclass
class SourceSplit:
    name: str
    images: list[SourceImage]
    image_folders: list[Path]  # where the source images are (out/images must not overlap them)
    clipped: int = 0  # boxes moved onto the border from within BORDER_TOLERANCE_PX


# --------------------------------------------------------------------------------------------
# YOLO (ultralytics)
# --------------------------------------------------------------------------------------------


def read_yolo(source: Path, splits: Sequence[str] | None) -> tuple[list[str], list[SourceSplit]]:
    """The class names and the splits of an ultralytics dataset (see the module's docstring)."""
    config_path = _find_data_yaml(source)
    config = _read_yaml(config_path)
    names = _yolo_names(config.get("names"), config_path)
    if config.get("nc", len(names)) != len(names):
        raise DatasetError(f"{config_path}: nc is {config['nc']} but 'names' has {len(names)}")
    root = config_path.parent / str(config.get("path") or "")
    present = [s for s in DEFAULT_SPLITS if config.get(s)]
    wanted = list(splits) if splits is not None else present
    if not wanted:
        raise DatasetError(f"{config_path}: none of the splits {', '.join(DEFAULT_SPLITS)} is set")
    read = []
    for name in wanted:
        entry = config.get(name)
        if not entry:
            raise DatasetError(
                f"{config_path}: no split {name!r} (it has {', '.join(present) or 'none'})"
            )
        folders = [root / str(f) for f in (entry if isinstance(entry, list) else [entry])]
        images: dict[str, SourceImage] = {}
        split = SourceSplit(name, [], folders)
        for folder in folders:
            if folder.is_file():
                raise DatasetError(
                    f"{config_path}: split {name!r} is a list of images ({folder}); only image "
                    "folders are read: move the images into images/<split>/"
                )
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"image folder not found: {folder} (split {name!r} of {config_path})"
                )
            labels = _label_path(folder / "x.jpg").parent
            if not labels.is_dir():
                raise FileNotFoundError(f"label folder not found: {labels} (for {folder})")
            for path in _image_files(folder):
                file_name = f"{name}/{path.relative_to(folder).as_posix()}"
                if file_name in images:
                    raise DatasetError(
                        f"{config_path}: split {name!r} has two images named {file_name} "
                        f"({images[file_name].path} and {path})"
                    )
                images[file_name] = _read_yolo_image(path, file_name, names, split)
        split.images = list(images.values())
        read.append(split)
    return names, read


def _find_data_yaml(source: Path) -> Path:
    if source.is_file():
        return source
    if not source.is_dir():
        raise FileNotFoundError(f"YOLO dataset not found: {source}")
    if (source / "data.yaml").is_file():
        return source / "data.yaml"
    found = sorted([*source.glob("*.yaml"), *source.glob("*.yml")])
    if len(found) != 1:
        raise FileNotFoundError(
            f"{source}: no data.yaml, and {len(found)} other .yaml files: give the file itself"
        )
    return found[0]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not a readable YAML file: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _yolo_names(names: Any, where: Path) -> list[str]:
    """``names`` as a list (index = class), from a list or a {0: a, 1: b} mapping."""
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DatasetError(
            f"{where}: 'names' must be a list of class names or {{0: name, 1: name, ...}}, "
            f"got {names!r}"
        )
    return [str(n) for n in names]


def _image_files(folder: Path) -> list[Path]:
    """The image files in ``folder`` and its subfolders, sorted."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _label_path(image: Path) -> Path:
    """Where ultralytics reads an image's labels: the last 'images' folder of the path becomes
    'labels' and the suffix '.txt'."""
    parts = image.absolute().parts
    if "images" not in parts[:-1]:
        raise DatasetError(
            f"{image}: no 'images' folder in its path, so it has no labels folder beside it "
            "(ultralytics reads images/.../x.jpg with labels/.../x.txt)"
        )
    at = len(parts) - 2 - parts[:-1][::-1].index("images")
    return Path(*parts[:at], "labels", *parts[at + 1 :]).with_suffix(".txt")


def _read_yolo_image(
    path: Path, file_name: str, names: list[str], split: SourceSplit
) -> SourceImage:
    width, height = _image_size(path)
    image = SourceImage(path, file_name, width, height)
    label_file = _label_path(path)
    if not label_file.is_file():
        return image  # a background image
    try:
        lines = label_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read label file {label_file}: {_one_line(err)}") from None
    for number, line in enumerate(lines, start=1):
        where = f"{label_file}:{number}"
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise DatasetError(
                f"{where}: {len(fields)} fields, expected 5 (class cx cy w h): {line.strip()!r}"
            )
        try:
            box = BoundingBox.from_yolo_darknet(line, image_size=(width, height))
        except (ParsingError, ValueError, AssertionError) as err:
            raise DatasetError(
                f"{where}: not a box 'class cx cy w h' ({_reason(err)}): {line.strip()!r}"
            ) from None
        index = _class_index(box.label)
        if index is None:
            raise DatasetError(f"{where}: class {box.label!r} is not a class index (0, 1, ...)")
        if not 0 <= index < len(names):
            raise DatasetError(
                f"{where}: class {index} is outside the class list (0..{len(names) - 1}, "
                "the 'names' of data.yaml)"
            )
        image.boxes.append((index, _pixel_box(box, image, where, split)))
    return image


def _class_index(text: str) -> int | None:
    """The class of a label line: "3", or "3.0" as some exporters write it (ultralytics reads
    both); None for anything else."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and value >= 0 else None


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------


def read_voc(
    source: Path, splits: Sequence[str] | None, classes: Sequence[str] | None
) -> tuple[list[str], list[SourceSplit]]:
    """The class names and the splits of a Pascal VOC folder (see the module's docstring)."""
    annotations, jpegs, lists = (
        source / "Annotations",
        source / "JPEGImages",
        source / "ImageSets" / "Main",
    )
    for folder in (annotations, jpegs, lists):
        if not folder.is_dir():
            raise FileNotFoundError(f"Pascal VOC folder not found: {folder}")
    wanted = (
        list(splits)
        if splits is not None
        else [s for s in DEFAULT_SPLITS if (lists / f"{s}.txt").is_file()]
    )
    if not wanted:
        raise FileNotFoundError(f"{lists}: none of {', '.join(DEFAULT_SPLITS)} .txt is there")
    read = []
    labels_of: list[tuple[Path, SourceImage, list[str]]] = []  # each box's name, per image
    for name in wanted:
        split = SourceSplit(name, [], [jpegs])
        for image_id in _voc_ids(lists / f"{name}.txt"):
            xml = annotations / f"{image_id}.xml"
            image, labels = _read_voc_image(xml, jpegs, split)
            split.images.append(image)
            labels_of.append((xml, image, labels))
        read.append(split)
    all_labels = {label for _, _, labels in labels_of for label in labels}
    names = list(classes) if classes is not None else sorted(all_labels)
    if len(set(names)) != len(names):
        raise DatasetError(f"a class is named twice in the class list: {', '.join(names)}")
    if not names:
        raise DatasetError(f"{source}: no objects in the splits {', '.join(wanted)}")
    index_of = {n: i for i, n in enumerate(names)}
    for xml, image, labels in labels_of:
        for k, label in enumerate(labels):
            if label not in index_of:
                raise DatasetError(
                    f"{xml}: object {label!r} is not in the class list ({', '.join(names)})"
                )
            image.boxes[k] = (index_of[label], image.boxes[k][1])
    return names, read


def _voc_ids(list_file: Path) -> list[str]:
    if not list_file.is_file():
        raise FileNotFoundError(f"split list not found: {list_file}")
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read {list_file}: {_one_line(err)}") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    if twice:
        raise DatasetError(f"{list_file}: image ids listed twice: {', '.join(twice[:5])}")
    return ids


def _read_voc_image(xml: Path, jpegs: Path, split: SourceSplit) -> tuple[SourceImage, list[str]]:
    """The image of ``xml`` with its boxes (class index 0 until the names are known) and the
    label names of its boxes, in order."""
    if not xml.is_file():
        raise FileNotFoundError(f"annotation file not found: {xml} (listed in {split.name}.txt)")
    try:
        ann = Annotation.from_pascal_voc(xml)
    except (ParsingError, ValueError, AssertionError) as err:
        raise DatasetError(f"{xml}: not a readable Pascal VOC file ({_reason(err)})") from None
    candidates = [jpegs / f"{xml.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
    found = [p for p in candidates if p.is_file()]
    if len(found) != 1:
        raise FileNotFoundError(
            f"{'no' if not found else 'more than one'} image for {xml} in {jpegs} "
            f"(looked for {xml.stem}.jpg, .png, ...)"
        )
    width, height = _image_size(found[0])
    image = SourceImage(found[0], f"{split.name}/{found[0].name}", width, height)
    if ann.image_size not in (None, (0, 0), (width, height)):
        raise DatasetError(
            f"{xml}: <size> says {ann.image_size[0]}x{ann.image_size[1]} pixels but "
            f"{found[0]} is {width}x{height}"
        )
    for box in ann.boxes:
        image.boxes.append((0, _pixel_box(box, image, f"{xml}: object {box.label!r}", split)))
    return image, [box.label for box in ann.boxes]


# --------------------------------------------------------------------------------------------
# Shared: image sizes, box checks
# --------------------------------------------------------------------------------------------


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as ``load_image`` shows it (EXIF orientation applied)."""
    try:
        with Image.open(path) as im:
            return display_size(im)
    except OSError as err:
        raise DatasetError(f"cannot read image {path}: {_one_line(err)}") from None


def _pixel_box(box: BoundingBox, image: SourceImage, where: str, split: SourceSplit) -> list[float]:
    """``box`` as COCO [x, y, w, h] pixels, clipped to the image if it is at most
    BORDER_TOLERANCE_PX outside; DatasetError if it is empty, not finite or farther out."""
    x1, y1, x2, y2 = box.ltrb
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DatasetError(f"{where}: a box that is not finite ({x1}, {y1}, {x2}, {y2})")
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"{where}: an empty box: x {x1:g}..{x2:g}, y {y1:g}..{y2:g} pixels")
    w, h, tol = image.width, image.height, BORDER_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol:
        raise DatasetError(
            f"{where}: box x {x1:g}..{x2:g}, y {y1:g}..{y2:g} pixels is outside the "
            f"{w}x{h} image {image.path}"
        )
    inside = (max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h)))
    if inside != (x1, y1, x2, y2):
        split.clipped += 1
        x1, y1, x2, y2 = inside
    return [x1, y1, x2 - x1, y2 - y1]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _reason(err: BaseException) -> str:
    """What went wrong in globox: its ParsingError says only "Syntax error in ... file" and is
    raised while handling the error that says where (XML line and column, the bad number)."""
    if isinstance(err, ParsingError) and err.__context__ is not None:
        return f"{str(err).rstrip('.')}: {_one_line(err.__context__)}"
    return _one_line(err)
