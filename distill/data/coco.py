"""COCO-format detection dataset: validation, category mapping, box cleaning, loading helpers.

    ds = CocoDetection("data/shapes", "train.json", train=True, hflip=0.5)
    image, target = ds[0]  # (3, H, W) float32 in [0, 1]; {"boxes": (n, 4) xyxy, "labels": (n,)}
    loader = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate,
                        generator=make_generator(0), worker_init_fn=seed_worker, num_workers=2)

Labels follow torchvision's convention: 0 is background, the K categories of the file are
labels 1..K in sorted category-id order, so models use ``num_classes = K + 1``.

All checks and box cleaning happen once at construction, so that a bad file fails before
training starts and the counts of dropped and clipped boxes can be logged.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import posixpath
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms.functional import convert_image_dtype
from PIL import ExifTags, Image, ImageOps
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from distill.config import DataConfig
from distill.data.transforms import random_hflip

log = logging.getLogger("distill.data")

# the draw of the training images held out of training (data.holdout_images): fixed, so that
# every seed of a search or its confirmation holds out the same images
HOLDOUT_SEED = 20_261_207

REQUIRED_KEYS = ("images", "annotations", "categories")
# EXIF orientations that turn the image a quarter: its width and height swap when shown
QUARTER_TURNS = (5, 6, 7, 8)


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file, image or annotation."""


class CocoDetection(Dataset[tuple[Tensor, dict[str, Any]]]):
    """A COCO-format detection dataset (boxes only).

    ``ann_file`` and ``images`` are relative to ``root`` (absolute paths also work);
    ``file_name`` entries are relative to the image folder and may not leave it.

    Item ``i`` is ``(image, target)``: image (3, H, W) float32 RGB in [0, 1]; target
    ``{"boxes": (n, 4) float32 xyxy pixels, "labels": (n,) int64 in 1..K, "image_id": int}``.
    Crowd annotations are not in the targets; boxes that are empty, non-finite or wholly outside
    the image are dropped, boxes partly outside are clipped. ``coco`` holds the same cleaned
    boxes plus the crowd ones (for ``COCOeval``) and only the images this dataset serves.
    ``skip_empty_images``: the images with no box left for training (none annotated, or only
    crowd or dropped boxes) are left out, counted in ``num_empty_images`` (after
    ``max_images``, which takes the first image ids: fewer may remain).

    Images without ``width``/``height`` in the JSON get them from the image file's header at
    construction (so those files must exist then).
    """

    def __init__(
        self,
        root: Path | str,
        ann_file: str,
        images: str = "images",
        train: bool = False,
        hflip: float = 0.0,
        skip_bad_images: bool = False,
        max_images: int | None = None,
        seed: int = 0,
        category_ids_as_labels: bool = False,
        skip_empty_images: bool = False,
        holdout: int = 0,
        holdout_part: bool = False,
    ) -> None:
        if not 0.0 <= hflip <= 1.0:
            raise DatasetError(f"hflip must be a probability in [0, 1], got {hflip}")
        if max_images is not None and max_images < 1:
            raise DatasetError(f"max_images must be at least 1 (or None), got {max_images}")
        self.root = Path(root)
        self.ann_path = self.root / ann_file
        self.image_dir = self.root / images
        self.train = train
        self.hflip = hflip
        # Flips are a pure function of (seed, epoch, index): the same in every worker layout
        # and after a resume mid-epoch, whatever RNG state the workers start from.
        self.seed = seed
        self.epoch = 0

        data = _read_annotation_file(self.ann_path)
        where = str(self.ann_path)
        if not self.image_dir.is_dir():  # found now, not when the first image is read
            raise DatasetError(f"image folder not found: {self.image_dir} (for {where})")
        categories = _check_categories(data["categories"], where)
        image_entries = _check_images(data["images"], where)
        annotations = _check_annotations(data["annotations"], image_entries, categories, where)

        cat_ids = sorted(categories)
        if category_ids_as_labels:
            # label = category id (torchvision's COCO label space: 91 outputs, ids 1..90 with
            # gaps), so a COCO_V1 teacher keeps its classification layer; unused ids get no boxes.
            if cat_ids[0] < 1:
                raise DatasetError(f"{where}: category ids must be >= 1 to be used as labels")
            self.cat_id_to_label = {c: c for c in cat_ids}
            self.label_to_cat_id = {c: c for c in cat_ids}
            self.class_names = [
                str(categories[c].get("name", c)) if c in categories else f"unused_{c}"
                for c in range(1, cat_ids[-1] + 1)
            ]
        else:
            self.cat_id_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
            self.label_to_cat_id = {i + 1: c for i, c in enumerate(cat_ids)}
            self.class_names = [str(categories[c].get("name", c)) for c in cat_ids]
        self.num_categories: int = len(self.class_names)  # K; models have K + 1 outputs

        ids = sorted(image_entries)
        if holdout > 0:  # the held-out images, or all the others
            held = set(holdout_ids(ids, holdout, where))
            ids = [i for i in ids if (i in held) == holdout_part]
        ids = ids[:max_images]
        skipped: list[str] = []
        kept: list[dict[str, Any]] = []
        self._paths: list[Path] = []
        for image_id in ids:
            entry = dict(image_entries[image_id])
            # Read what was checked: 'a/../x.png' is x.png even if folder 'a' does not exist.
            path = self.image_dir / posixpath.normpath(entry["file_name"])
            if skip_bad_images:
                problem = _image_problem(path, entry)
                if problem is not None:
                    skipped.append(f"{path} ({problem})")
                    continue
            if "width" not in entry or "height" not in entry:
                entry["width"], entry["height"] = _read_size(path, image_id)
            kept.append(entry)
            self._paths.append(path)
        self.num_skipped_images = len(skipped)
        if skipped:
            log.warning(
                "%s: skipped %d unreadable image(s), e.g. %s",
                where,
                len(skipped),
                "; ".join(skipped[:3]),
            )
        if not kept:
            raise DatasetError(f"{where}: no usable images")

        # Boxes of all kept images, cleaned in one vectorised pass.
        size_of = {e["id"]: (e["width"], e["height"]) for e in kept}
        anns = [a for a in annotations if a["image_id"] in size_of]
        xywh = np.array([[_as_float(v) for v in a["bbox"]] for a in anns], dtype=np.float64)
        wh = np.array([size_of[a["image_id"]] for a in anns], dtype=np.float64)
        xyxy, keep, clipped = clean_boxes(xywh.reshape(-1, 4), wh.reshape(-1, 2))
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        self.num_dropped_boxes = int((~keep).sum())
        self.num_clipped_boxes = int(clipped.sum())

        self.num_empty_images = 0  # left out for want of a box (skip_empty_images)
        if skip_empty_images:
            with_box = {anns[j]["image_id"] for j in np.flatnonzero(keep & ~crowd)}
            if not with_box:
                raise DatasetError(f"{where}: no image has a box to train on (skip_empty_images)")
            self.num_empty_images = len(kept) - len(with_box)
            self._paths = [path for e, path in zip(kept, self._paths) if e["id"] in with_box]
            kept = [e for e in kept if e["id"] in with_box]
            on = np.array([a["image_id"] in with_box for a in anns], dtype=bool)
            anns = [a for a, a_on in zip(anns, on) if a_on]
            xyxy, keep, crowd = xyxy[on], keep[on], crowd[on]
        self.image_ids: list[int] = [e["id"] for e in kept]
        self._sizes = [(e["width"], e["height"]) for e in kept]
        self.num_crowd_boxes = int((keep & crowd).sum())

        # Per-image targets as flat arrays + offsets: cheap to index, and no per-image Python
        # objects for forked DataLoader workers to copy on access.
        train_idx = np.flatnonzero(keep & ~crowd)
        row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        rows = np.array([row_of[anns[j]["image_id"]] for j in train_idx], dtype=np.int64)
        order = train_idx[np.argsort(rows, kind="stable")]
        self._boxes = xyxy[order].astype(np.float32).reshape(-1, 4)
        self._labels = np.array(
            [self.cat_id_to_label[anns[j]["category_id"]] for j in order], dtype=np.int64
        )
        counts = np.bincount(rows, minlength=len(self.image_ids))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        self.coco = make_coco(
            {
                "info": data.get("info", {}),
                "licenses": data.get("licenses", []),
                "images": kept,
                "annotations": _eval_annotations(anns, xyxy, keep, crowd),
                "categories": [categories[c] for c in cat_ids],
            }
        )
        left_out = (
            f"; left out {self.num_empty_images} images without a box" if skip_empty_images else ""
        )
        log.info(
            "%s: %d images, %d boxes for training; dropped %d empty/non-finite/outside boxes, "
            "clipped %d to the image; %d crowd boxes kept for evaluation only%s",
            where,
            len(self.image_ids),
            len(self._labels),
            self.num_dropped_boxes,
            self.num_clipped_boxes,
            self.num_crowd_boxes,
            left_out,
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        i = range(len(self.image_ids))[index]  # IndexError and negative indices as for lists
        image_id = self.image_ids[i]
        path = self._paths[i]
        image = load_image(path, image_id)
        width, height = self._sizes[i]
        if image.shape[-2:] != (height, width):
            raise DatasetError(
                f"image {path} (id {image_id}) is {image.shape[-1]}x{image.shape[-2]} pixels "
                f"but the annotation file says {width}x{height}"
            )
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        target = {
            "boxes": torch.from_numpy(self._boxes[lo:hi].copy()),
            "labels": torch.from_numpy(self._labels[lo:hi].copy()),
            "image_id": image_id,
        }
        if self.train and self.hflip > 0:
            coin = torch.Generator().manual_seed(hash((self.seed, self.epoch, image_id)) % 2**63)
            image, target = random_hflip(image, target, self.hflip, coin)
        return image, target

    def labels_of(self, index: int) -> np.ndarray:
        """The labels (1..K) of image ``index``'s training boxes, without reading the image."""
        return self._labels[int(self._offsets[index]) : int(self._offsets[index + 1])]

    def set_epoch(self, epoch: int) -> None:
        """Flips of epoch ``epoch`` (call before iterating; workers get a copy per epoch)."""
        self.epoch = epoch


# --------------------------------------------------------------------------------------------
# Construction-time checks
# --------------------------------------------------------------------------------------------


def _read_annotation_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not a valid JSON file: {err}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetError(f"{path}: missing required key(s) {', '.join(missing)}")
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _entry_id(entry: Any, kind: str, position: int, where: str) -> int:
    """The integer ``id`` of a JSON entry; errors name the list and the position."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: {kind} #{position} is not an object: {entry!r}")
    value = entry.get("id")
    if not isinstance(value, int) or isinstance(value, bool):
        raise DatasetError(f"{where}: {kind} #{position} has no integer 'id': {entry!r}")
    return value


def _check_categories(entries: list[Any], where: str) -> dict[int, dict[str, Any]]:
    categories: dict[int, dict[str, Any]] = {}
    for pos, entry in enumerate(entries):
        cat_id = _entry_id(entry, "category", pos, where)
        if cat_id in categories:
            raise DatasetError(f"{where}: category id {cat_id} appears twice")
        categories[cat_id] = entry
    if not categories:
        raise DatasetError(f"{where}: 'categories' is empty")
    return categories


def _check_images(entries: list[Any], where: str) -> dict[int, dict[str, Any]]:
    images: dict[int, dict[str, Any]] = {}
    for pos, entry in enumerate(entries):
        image_id = _entry_id(entry, "image", pos, where)
        if image_id in images:
            raise DatasetError(f"{where}: image id {image_id} appears twice")
        _check_file_name(entry.get("file_name"), image_id, where)
        has = [k in entry for k in ("width", "height")]
        if any(has) and not all(has):
            raise DatasetError(f"{where}: image {image_id} has only one of width/height")
        for key in ("width", "height"):
            value = entry.get(key)
            if key in entry and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise DatasetError(f"{where}: image {image_id} has {key} {value!r}")
        images[image_id] = entry
    return images


def _check_file_name(file_name: Any, image_id: int, where: str) -> None:
    """Refuse names that would read outside the image folder (absolute, or climbing via ..)."""
    if not isinstance(file_name, str) or not file_name:
        raise DatasetError(f"{where}: image {image_id} has no file_name (got {file_name!r})")
    # Backslashes count as separators too, so Windows-made files cannot sneak '..\\' past us.
    posix = file_name.replace("\\", "/")
    normal = posixpath.normpath(posix)
    drive = len(posix) > 1 and posix[1] == ":"
    if posix.startswith("/") or drive or normal == ".." or normal.startswith("../"):
        raise DatasetError(
            f"{where}: image {image_id} has file_name {file_name!r}, which is not inside "
            "the image folder (absolute or '..' paths are not allowed)"
        )


def _check_annotations(
    entries: list[Any],
    images: dict[int, dict[str, Any]],
    categories: dict[int, dict[str, Any]],
    where: str,
) -> list[dict[str, Any]]:
    seen: set[int] = set()
    for pos, ann in enumerate(entries):
        ann_id = _entry_id(ann, "annotation", pos, where)
        if ann_id in seen:
            raise DatasetError(f"{where}: annotation id {ann_id} appears twice")
        seen.add(ann_id)
        for key, known in (("image_id", images), ("category_id", categories)):
            if key not in ann:
                raise DatasetError(f"{where}: annotation {ann_id} has no '{key}'")
            if not isinstance(ann[key], int) or ann[key] not in known:
                raise DatasetError(
                    f"{where}: annotation {ann_id} has {key} {ann[key]!r}, which does not exist"
                )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DatasetError(
                f"{where}: annotation {ann_id} needs a bbox [x, y, w, h], got {bbox!r}"
            )
        if not all(v is None or isinstance(v, int | float) for v in bbox):
            raise DatasetError(f"{where}: annotation {ann_id} has a non-numeric bbox {bbox!r}")
    return entries


def _as_float(value: int | float | None) -> float:
    # JSON has no NaN; exporters often write null instead. It is dropped like NaN.
    return math.nan if value is None else float(value)


def clean_boxes(xywh: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert COCO boxes to xyxy, clip them to their image and flag the unusable ones.

    xywh:  (n, 4) float boxes [x, y, w, h] in pixels (may hold NaN/inf)
    sizes: (n, 2) (width, height) of each box's image
    Returns xyxy (n, 4) clipped to the image, keep (n,) bool (finite, w > 0, h > 0 and some
    area left inside the image), clipped (n,) bool (kept and changed by clipping).
    """
    x, y, w, h = xywh.T
    with np.errstate(invalid="ignore", over="ignore"):
        xyxy = np.stack([x, y, x + w, y + h], axis=1)
        limits = np.stack([sizes[:, 0], sizes[:, 1], sizes[:, 0], sizes[:, 1]], axis=1)
        inside = np.minimum(np.maximum(xyxy, 0.0), limits)
        keep = (
            np.isfinite(xyxy).all(axis=1)
            & (w > 0)
            & (h > 0)
            # Wholly outside boxes clip to zero width or height.
            & (inside[:, 2] > inside[:, 0])
            & (inside[:, 3] > inside[:, 1])
        )
        clipped = keep & (inside != xyxy).any(axis=1)
    return inside, keep, clipped


def display_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as viewers show it: ``im.size`` swapped when its EXIF
    orientation turns it a quarter (as ``load_image`` does). COCO's width / height are those of
    the displayed image. A JPEG's header holds its EXIF; a PNG's eXIf chunk may come after the
    pixels, and PIL decodes the file to find it."""
    width, height = im.size
    if im.getexif().get(ExifTags.Base.Orientation, 1) in QUARTER_TURNS:
        return height, width
    return width, height


def _read_size(path: Path, image_id: int) -> tuple[int, int]:
    """(width, height) of the displayed image (``display_size``), from the file's header."""
    try:
        with Image.open(path) as im:
            return display_size(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path} (image id {image_id})") from None
    except OSError as err:
        raise DatasetError(f"cannot read image {path} (image id {image_id}): {err}") from None


def _image_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Why the image cannot be used (missing, corrupt, truncated, size differs from JSON), or
    None. The pixels are decoded: ``Image.verify()`` alone reads a JPEG's headers only and
    passes a truncated JPEG, which would stop training when the loader reaches it. A JPEG is
    decoded at 1/8 scale (``draft``): all of its data is read, at a fraction of the cost."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.verify()  # checksums (PNG) that decoding does not check
        with Image.open(path) as im:
            size = display_size(im)
            if im.format == "JPEG":
                im.draft("RGB", (1, 1))
            im.load()
    except Exception as err:  # PIL raises many types for corrupt files
        return f"unreadable: {err}"
    if "width" in entry and size != (entry["width"], entry["height"]):
        return f"{size[0]}x{size[1]} pixels, JSON says {entry['width']}x{entry['height']}"
    return None


def _eval_annotations(
    anns: list[dict[str, Any]], xyxy: np.ndarray, keep: np.ndarray, crowd: np.ndarray
) -> list[dict[str, Any]]:
    """Copies of the kept annotations with cleaned xywh boxes and the keys COCOeval reads."""
    out = []
    for j in np.flatnonzero(keep):
        ann = dict(anns[j])
        x1, y1, x2, y2 = (float(v) for v in xyxy[j])
        ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        ann["iscrowd"] = int(crowd[j])
        # COCOeval's area ranges use 'area' (the mask area in COCO); boxes stand in if absent.
        area = ann.get("area")
        if not isinstance(area, int | float) or not math.isfinite(area):
            ann["area"] = (x2 - x1) * (y2 - y1)
        out.append(ann)
    return out


def make_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools COCO object over an in-memory dict (no second read of the file)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_image(path: Path, image_id: int | None = None) -> Tensor:
    """Read an image file as (3, H, W) float32 RGB in [0, 1], upright; errors name the file.

    Upright: the EXIF orientation is applied (``ImageOps.exif_transpose``), so a phone photo is
    the image viewers show, of COCO's width x height. 16-bit images (PNG ``I;16``) become 8 bits
    by ``to_8bit``, not by PIL's ``convert``, which clips them to 255 (an almost white image).

    The conversion is that of torchvision's detection weights (``weights.transforms()``,
    ``convert_image_dtype``: ``x / 255``), not ``x * (1 / 255)``, which differs in the last bit
    for some values and so moves scores near a threshold: predictions equal torchvision's.
    """
    what = f"{path}" if image_id is None else f"{path} (image id {image_id})"
    try:
        with Image.open(path) as im:
            ImageOps.exif_transpose(im, in_place=True)
            eight_bit = to_8bit(im)
            rgb = eight_bit.convert("RGB")  # grayscale, palette and RGBA alike
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {what}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DatasetError(f"cannot read image {what}: {err}") from None
    return convert_image_dtype(F.pil_to_tensor(rgb), torch.float32)


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (modes ``I;16*``, and ``I`` holding 0..65535) as 8-bit ``L``,
    scaled by 1/257 and rounded (0 -> 0, 65535 -> 255); other images as they are.

    1/257 maps the type's range onto 8 bits, as image viewers and libpng (16 to 8 bits) do, so
    the picture has the brightness the file says, the same for every image. Stretching each
    image's own range instead would change brightness and contrast from image to image (and
    make a flat image noise), which the model would see and which no other loader does.
    """
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    values = np.asarray(im).astype(np.int64)
    if im.mode == "I" and (values.min(initial=0) < 0 or values.max(initial=0) > 65535):
        raise ValueError(f"a 32-bit integer image (values {values.min()}..{values.max()})")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def collate(
    batch: Sequence[tuple[Tensor, dict[str, Any]]],
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Images of different sizes cannot be stacked: keep lists, as torchvision detectors take."""
    return [image for image, _ in batch], [target for _, target in batch]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed.

    torch already seeds each worker with ``base_seed + worker_id``, where ``base_seed`` comes
    from the DataLoader's generator; this carries that seed over to the other two RNGs.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for ``DataLoader(generator=...)``: fixes shuffling and worker seeds."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def holdout_ids(ids: list[int], size: int, where: str) -> list[int]:
    """The ``size`` image ids of ``ids`` held out of training (``data.holdout_images``): drawn
    with ``HOLDOUT_SEED``, so the same whatever the run's seed."""
    if size >= len(ids):
        raise DatasetError(
            f"data.holdout_images {size}: {where} has {len(ids)} images; hold out fewer, so "
            "that some are left to train on"
        )
    return sorted(random.Random(HOLDOUT_SEED).sample(ids, size))


def build_dataset(cfg: DataConfig, split: str, seed: int = 0) -> CocoDetection:
    """The "train", "holdout" or "val" dataset of a config. "train" leaves out the
    ``data.holdout_images`` that "holdout" serves (not flipped, scored as a validation set);
    only training images are flipped, and only training images without a box are left out
    (``data.skip_empty_images``)."""
    if split == "holdout":
        if cfg.holdout_images < 1:
            raise DatasetError("the holdout split needs data.holdout_images >= 1")
        return CocoDetection(
            cfg.root,
            cfg.train,
            images=cfg.images,
            train=False,
            skip_bad_images=cfg.skip_bad_images,
            category_ids_as_labels=cfg.category_ids_as_labels,
            holdout=cfg.holdout_images,
            holdout_part=True,
        )
    if split == "train":
        return CocoDetection(
            cfg.root,
            cfg.train,
            images=cfg.images,
            train=True,
            hflip=cfg.hflip,
            skip_bad_images=cfg.skip_bad_images,
            max_images=cfg.max_train_images,
            seed=seed,
            category_ids_as_labels=cfg.category_ids_as_labels,
            skip_empty_images=cfg.skip_empty_images,
            holdout=cfg.holdout_images,
        )
    if split == "val":
        return CocoDetection(
            cfg.root,
            cfg.val,
            images=cfg.val_images or cfg.images,
            train=False,
            skip_bad_images=cfg.skip_bad_images,
            max_images=cfg.max_val_images,
            category_ids_as_labels=cfg.category_ids_as_labels,
        )
    raise DatasetError(f"split must be 'train', 'holdout' or 'val', got {split!r}")


def predictions_to_coco(
    dataset: CocoDetection, image_id: int, boxes_xyxy: Tensor, scores: Tensor, labels: Tensor
) -> list[dict[str, Any]]:
    """Detections of one image as COCO result dicts, for ``dataset.coco.loadRes``.

    boxes_xyxy: (n, 4) in original image pixels; scores: (n,); labels: (n,) in 1..K.
    Returns [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] * n.
    """
    xywh = box_convert(boxes_xyxy.detach().float().cpu(), "xyxy", "xywh").tolist()
    results = []
    for box, score, label in zip(xywh, scores.detach().cpu().tolist(), labels.cpu().tolist()):
        cat_id = dataset.label_to_cat_id.get(int(label))
        if cat_id is None:
            raise DatasetError(
                f"label {label} has no category: labels are 1..{dataset.num_categories}"
            )
        results.append(
            {"image_id": image_id, "category_id": cat_id, "bbox": box, "score": float(score)}
        )
    return results
