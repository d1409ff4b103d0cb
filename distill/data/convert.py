"""A YOLO or Pascal VOC dataset converted to a COCO-format dataset that ``CocoDetection`` reads.

    written = convert_dataset("yolo", Path("datasets/coco8/data.yaml"), Path("data/coco8"))
    # -> [data/coco8/train.json, data/coco8/val.json]; the images are symlinked into
    #    data/coco8/images/<split>/, so `distill data stats data/coco8` and `data.root:
    #    data/coco8` work as they are.

The layouts read are those of ``distill.data.formats``. Everything is read and checked before
anything is written, so bad input leaves ``out`` as it was; each file is written whole or not at
all. Errors are one line naming the file: ``DatasetError``, ``FileNotFoundError`` (a missing
folder or file), ``FileExistsError`` (``out`` already holds what would be written).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from distill.data.coco import DatasetError
from distill.data.formats import SourceImage, SourceSplit, read_voc, read_yolo
from distill.fileio import fsync_dir, temporary_beside, write_atomic, write_text_atomic

log = logging.getLogger("distill.data")

FORMATS = ("yolo", "voc")


def convert_dataset(
    fmt: str,
    source: Path,
    out: Path,
    *,
    splits: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    copy_images: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Convert the ``fmt`` ("yolo" or "voc") dataset at ``source`` to COCO format in ``out``.

    source: for yolo the ``data.yaml`` file or its folder; for voc the folder holding
        ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``.
    splits: the splits to convert (``out/<split>.json`` each); default: those of train, val and
        test that the source defines.
    classes: voc only: the category names in order (an object of another name is an error);
        default: every name in the converted splits, sorted. yolo takes ``names`` of data.yaml.
    copy_images: copy the images into ``out/images/<split>/`` instead of symlinking them there.
    overwrite: replace annotation files and images that ``out`` already holds (else refused).

    Categories are ids 1..K in class order, the same in every split; image and annotation ids
    start at 1. Returns the annotation files written, in split order.
    """
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if classes is not None and fmt != "voc":
        raise DatasetError("classes= is for voc only: yolo reads its class names in data.yaml")
    if splits is not None:
        if len(set(splits)) != len(splits):
            raise DatasetError(f"a split is given twice: {', '.join(splits)}")
        for name in splits:  # a file and a folder name in out
            if not re.fullmatch(r"[\w-][\w.-]*", name):
                raise DatasetError(
                    f"split names are plain names (letters, digits, _ . -): {name!r}"
                )
    source = Path(source)
    if fmt == "yolo":
        names, read = read_yolo(source, splits)
    else:
        names, read = read_voc(source, splits, classes)
    out = Path(out)
    _check_out(out, read, overwrite)
    written = []
    for split in read:
        _place_images(split.images, out / "images", copy_images)
        path = out / f"{split.name}.json"
        write_text_atomic(path, json.dumps(coco_dict(split.images, names)))
        boxes = sum(len(im.boxes) for im in split.images)
        log.info(
            "%s: %d images (%d without boxes), %d boxes (%d clipped onto the image border)",
            path,
            len(split.images),
            sum(1 for im in split.images if not im.boxes),
            boxes,
            split.clipped,
        )
        written.append(path)
    return written


def coco_dict(images: list[SourceImage], names: Sequence[str]) -> dict[str, Any]:
    """The COCO annotation file of ``images``: categories 1..K named ``names``; ids from 1."""
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, image in enumerate(images, start=1):
        coco_images.append(
            {
                "id": image_id,
                "file_name": image.file_name,
                "width": image.width,
                "height": image.height,
            }
        )
        for index, xywh in image.boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": index + 1,
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    return {"images": coco_images, "annotations": annotations, "categories": categories}


def _check_out(out: Path, splits: list[SourceSplit], overwrite: bool) -> None:
    """Refuse to write over what ``out`` holds (unless ``overwrite``) or into the source."""
    target = (out / "images").resolve()
    for split in splits:
        for folder in split.image_folders:
            folder = folder.resolve()
            if target == folder or target in folder.parents or folder in target.parents:
                raise DatasetError(
                    f"{out / 'images'} overlaps the source images in {folder}: "
                    "choose another output folder"
                )
        if overwrite:
            continue
        ann = out / f"{split.name}.json"
        if ann.exists():
            raise FileExistsError(
                f"{ann} already exists (overwrite=True, --overwrite, replaces it)"
            )
        images = out / "images" / split.name
        if images.is_dir() and any(images.iterdir()):
            raise FileExistsError(
                f"{images} already holds files (overwrite=True, --overwrite, replaces them)"
            )


def _place_images(images: list[SourceImage], folder: Path, copy: bool) -> None:
    """Symlink (or copy) each image to ``folder / file_name``, each file whole or not at all."""
    parents = set()
    for image in images:
        dest = folder / image.file_name
        if copy:
            with image.path.open("rb") as src:
                write_atomic(dest, partial(shutil.copyfileobj, src))
            continue
        with temporary_beside(dest) as tmp:
            tmp.unlink()  # a free name, for the link
            tmp.symlink_to(image.path.resolve())
            os.replace(tmp, dest)
        parents.add(dest.parent)
    for parent in parents:
        fsync_dir(parent)
