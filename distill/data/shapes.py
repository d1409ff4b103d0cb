"""The built-in ``shapes`` benchmark: a synthetic COCO-format detection dataset made on CPU.

It stands in for COCO where nothing can be downloaded, and it is built so that distillation has
something to show on a CPU:

- classes come in pairs told apart only by a detail (circle/ring, square/square_cross,
  triangle/triangle_down, ellipse/striped_ellipse), which a small student confuses more often
  than a large teacher;
- box sides run from ~10 px to ~110 px at 128-px images (scaled with the image size), so all
  three COCO size buckets occur and every object fits RetinaNet's 16..256-px anchors;
- textured backgrounds, clutter that belongs to no class (strokes, spiky stars) and partial
  occlusion make it a detection problem rather than a classification one, while every object
  stays learnable: it contrasts with what lies under it, later objects hide at most
  ``max_hidden`` of it (at most half) and never its distinguishing detail.

Layout written by :func:`generate_shapes` (``file_name`` is relative to ``OUT/images``)::

    OUT/shapes.json                    the arguments it was made with (overwrite protection)
    OUT/train.json, OUT/val.json       COCO annotations; bbox is the full object's box, xywh
    OUT/images/train/000000.png ...    RGB, size x size
    OUT/images/val/000000.png ...

Every image is drawn from its own generator seeded by ``(seed, split, index)``, so a dataset is
byte-identical however many processes make it, and adding images leaves earlier ones unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from distill.fileio import write_text_atomic

log = logging.getLogger(__name__)

# Category id i + 1 is CLASSES[i]; neighbours in pairs differ only by a detail.
CLASSES: tuple[str, ...] = (
    "circle",
    "ring",
    "square",
    "square_cross",
    "triangle",
    "triangle_down",
    "ellipse",
    "striped_ellipse",
)
SPLITS: tuple[str, ...] = ("train", "val")
# Bump when the drawing changes, so that an old dataset is not mistaken for a current one.
GENERATOR_VERSION = 1
# The benchmark's split sizes (configs/shapes/ and scripts/bench_kd.py): at 2000 training images
# the 26-epoch teacher reached mAP 0.574 on training images but 0.435 on val.
BENCHMARK_TRAIN, BENCHMARK_VAL = 7200, 500

# `distill demo`'s task: three classes that differ in outline, not in a detail, and 2-6 objects
# an image (rarely fewer: a crowded placement may drop one), so that every step has many
# positives to learn from. Learning curves of a from-scratch ResNet50-FPN on it and on the first
# demo task: README, "How the recipes were chosen".
DEMO_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
DEMO_MIN_OBJECTS, DEMO_MAX_OBJECTS, DEMO_MIN_SIZE, DEMO_MAX_SIZE = 2, 6, 24.0, 96.0
# `distill demo`'s default folders for this task and its runs; the first demo task (4 classes,
# 0-4 objects) used data/shapes-demo and runs/demo, whose teacher learnt other classes.
DEMO_DATA, DEMO_OUT = Path("data/shapes-demo-v2"), Path("runs/demo-v2")

_REFERENCE_SIZE = 128  # sizes in Difficulty are pixels at this image size
_SUPERSAMPLE = 2  # samples per pixel side: anti-aliased edges keep small details readable
_PLACE_TRIES = 12  # positions tried per object before it is dropped
_COLOUR_TRIES = 12
_KEY_VISIBLE = 0.8  # share of a detail (the cross of square_cross) that must stay visible


@dataclass(frozen=True)
class Difficulty:
    """Knobs of one preset; sizes are in pixels at 128-px images and scale with the image."""

    max_objects: int  # objects per image drawn uniformly from min_objects.. (some dropped)
    min_size: float  # smallest sqrt(box area)
    max_size: float  # largest sqrt(box area); drawn log-uniformly in between
    max_distractors: int  # clutter items per image drawn uniformly from 0..max_distractors
    texture: float  # 0..1: how far background patterns swing between two colours
    max_hidden: float  # largest fraction of an object that later objects may cover (<= 0.5)
    min_contrast: float  # least RGB distance (0..441) between an object and what lies under it
    classes: tuple[str, ...] = CLASSES  # the classes drawn (ids stay CLASSES.index + 1)
    min_objects: int = 0  # objects per image are drawn from min_objects..max_objects

    def __post_init__(self) -> None:
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"min_objects must be in 0..max_objects ({self.max_objects}), "
                f"got {self.min_objects}"
            )


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(6, 14.0, 112.0, 2, 0.3, 0.25, 120.0),
    "medium": Difficulty(10, 10.0, 116.0, 5, 0.55, 0.4, 90.0),
    "hard": Difficulty(12, 8.0, 120.0, 10, 0.8, 0.5, 70.0),
    # `distill demo`: a task a from-scratch ResNet50-FPN learns within minutes on a CPU (many,
    # large, high-contrast objects of DEMO_CLASSES; curves: README, "How the recipes were chosen").
    "demo": Difficulty(
        DEMO_MAX_OBJECTS,
        DEMO_MIN_SIZE,
        DEMO_MAX_SIZE,
        max_distractors=0,
        texture=0.2,
        max_hidden=0.25,
        min_contrast=140.0,
        classes=DEMO_CLASSES,
        min_objects=DEMO_MIN_OBJECTS,
    ),
}


def get_difficulty(name: str) -> Difficulty:
    """The preset called ``name``; ValueError listing the presets otherwise."""
    if name not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {name!r}; choose one of {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[name]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: depends on nothing but ``(seed, split, index)``."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


@dataclass
class RenderedImage:
    """One drawn image and its objects, in drawing order (later objects lie on top)."""

    image: np.ndarray  # (S, S, 3) uint8
    boxes: np.ndarray  # (N, 4) float64 xyxy in pixels: the full (unoccluded) object's box
    labels: np.ndarray  # (N,) int64 category ids, 1-based into CLASSES
    masks: np.ndarray  # (N, S, S) bool: each object's full opaque pixels, before occlusion


@dataclass
class _Spec:
    """An object to place: class index, box size and the parameters of its detail."""

    cls: int
    w: float
    h: float
    param: float  # ring: inner/outer radius; square_cross: arm half-width / side; stripes: px
    angle: float  # stripe direction
    phase: float


class _Occupancy:
    """Which object is seen at each pixel, to keep every object's occlusion within limits."""

    def __init__(self, size: int, max_hidden: float) -> None:
        self.owner = np.full((size, size), -1, np.int64)  # -1: no object
        self.key_owner = np.full((size, size), -1, np.int64)  # visible detail pixels only
        self.area = np.zeros(0, np.int64)  # full opaque pixels per object
        self.visible = np.zeros(0, np.int64)
        self.key_area = np.zeros(0, np.int64)
        self.key_visible = np.zeros(0, np.int64)
        self.min_visible = 1 - max_hidden

    def _hidden(self, owner: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(n,) pixels of each placed object that ``mask`` (on ``owner``'s window) covers."""
        return np.bincount(owner[mask] + 1, minlength=len(self.area) + 1)[1:]

    def allows(self, rows: slice, cols: slice, mask: np.ndarray) -> bool:
        """False if ``mask`` on top would hide too much of an object or of its detail."""
        hidden = self._hidden(self.owner[rows, cols], mask)
        key_hidden = self._hidden(self.key_owner[rows, cols], mask)
        return bool(
            np.all(self.visible - hidden >= self.min_visible * self.area)
            and np.all(self.key_visible - key_hidden >= _KEY_VISIBLE * self.key_area)
        )

    def add(self, rows: slice, cols: slice, mask: np.ndarray, key: np.ndarray) -> None:
        """Put an object with opaque pixels ``mask`` and detail ``key`` on top."""
        n = len(self.area)
        self.visible -= self._hidden(self.owner[rows, cols], mask)
        self.key_visible -= self._hidden(self.key_owner[rows, cols], mask)
        self.owner[rows, cols][mask] = n
        self.key_owner[rows, cols][mask] = -1
        self.key_owner[rows, cols][key & mask] = n
        self.area = np.append(self.area, mask.sum())
        self.visible = np.append(self.visible, mask.sum())
        self.key_area = np.append(self.key_area, (key & mask).sum())
        self.key_visible = np.append(self.key_visible, (key & mask).sum())


def render_image(rng: np.random.Generator, size: int, difficulty: Difficulty) -> RenderedImage:
    """Draw one ``size`` x ``size`` image: background, clutter, then objects largest first."""
    canvas = _background(rng, size, difficulty.texture)
    _draw_distractors(rng, canvas, difficulty.max_distractors)
    occupancy = _Occupancy(size, difficulty.max_hidden)
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []

    count = int(rng.integers(difficulty.min_objects, difficulty.max_objects + 1))
    specs = [_sample_spec(rng, size, difficulty) for _ in range(count)]
    # Painter's order: big objects behind small ones, so few placements hide too much.
    specs.sort(key=lambda s: -s.w * s.h)
    margin = size / _REFERENCE_SIZE
    for spec in specs:
        for _ in range(_PLACE_TRIES):
            x0 = rng.uniform(margin, size - margin - spec.w)
            y0 = rng.uniform(margin, size - margin - spec.h)
            rows, cols, cov, sec, key = _rasterize(spec, x0, y0)
            mask = cov >= 0.5
            if not occupancy.allows(rows, cols, mask):
                continue
            colours = _pick_colours(rng, canvas[rows, cols], spec, difficulty.min_contrast)
            if colours is None:
                continue
            main, second = colours
            region = canvas[rows, cols]
            canvas[rows, cols] = (
                region * (1 - cov)[..., None]
                + main * (cov - sec)[..., None]
                + second * sec[..., None]
            )
            occupancy.add(rows, cols, mask, key)
            boxes.append((x0, y0, x0 + spec.w, y0 + spec.h))
            labels.append(spec.cls + 1)
            full = np.zeros((size, size), bool)
            full[rows, cols] = mask
            masks.append(full)
            break

    return RenderedImage(
        image=np.clip(np.rint(canvas), 0, 255).astype(np.uint8),
        boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        masks=np.asarray(masks, bool).reshape(-1, size, size),
    )


def _sample_spec(rng: np.random.Generator, size: int, d: Difficulty) -> _Spec:
    scale = size / _REFERENCE_SIZE
    name = d.classes[int(rng.integers(len(d.classes)))]
    side = math.exp(rng.uniform(math.log(d.min_size), math.log(d.max_size))) * scale
    if name in ("circle", "ring"):
        aspect = 1.0  # h / w
    elif name in ("ellipse", "striped_ellipse"):
        # Clearly elongated, so that an ellipse is never a circle; covers anchor ratios 0.5 / 2.
        aspect = math.exp(rng.uniform(math.log(1.6), math.log(2.4)) * rng.choice([-1.0, 1.0]))
    elif name in ("square", "square_cross"):
        aspect = math.exp(rng.uniform(-0.15, 0.15))
    else:
        aspect = math.exp(rng.uniform(-0.3, 0.3))
    w, h = side / math.sqrt(aspect), side * math.sqrt(aspect)
    shrink = min(1.0, 0.92 * size / max(w, h))  # the whole object stays inside the image
    w, h = w * shrink, h * shrink
    param = 0.0
    if name == "ring":
        param = rng.uniform(0.45, 0.65)
    elif name == "square_cross":
        param = max(rng.uniform(0.07, 0.1), 0.8 * scale / min(w, h))  # arms >= 1.6 px wide
    elif name == "striped_ellipse":
        # At least 3 px per period (1.5-px stripes) so stripes survive the anti-aliasing.
        param = max(3.0 * scale, min(w, h) / rng.uniform(3.0, 4.5))
    return _Spec(CLASSES.index(name), w, h, param, rng.uniform(0, math.pi), rng.uniform())


def _rasterize(
    spec: _Spec, x0: float, y0: float
) -> tuple[slice, slice, np.ndarray, np.ndarray, np.ndarray]:
    """Coverage of an object whose box starts at (x0, y0), on the pixels its box touches.

    Returns (rows, cols, cov, sec, key): cov (H, W) in [0, 1] is the object's coverage, sec the
    part of it in the second colour (cross or stripes), key (H, W) bool its distinguishing detail.
    """
    c0, r0 = math.floor(x0), math.floor(y0)
    c1, r1 = math.ceil(x0 + spec.w), math.ceil(y0 + spec.h)
    step = 1.0 / _SUPERSAMPLE
    xs = (np.arange(c0, c1, step) + step / 2)[None, :]  # sample centres, in pixels
    ys = (np.arange(r0, r1, step) + step / 2)[:, None]
    u = (xs - x0) / spec.w - 0.5  # box-relative, -0.5..0.5
    v = (ys - y0) / spec.h - 0.5
    name = CLASSES[spec.cls]
    d2 = u * u + v * v  # in box units: the inscribed circle or ellipse is d2 <= 0.25
    second = np.zeros((1, 1), bool)
    if name in ("circle", "ellipse"):
        inside = d2 <= 0.25
    elif name == "ring":
        inside = (d2 <= 0.25) & (d2 > 0.25 * spec.param**2)
    elif name == "striped_ellipse":
        inside = d2 <= 0.25
        proj = (xs * math.cos(spec.angle) + ys * math.sin(spec.angle)) / spec.param + spec.phase
        second = inside & (proj % 1.0 < 0.5)
    elif name == "square":
        inside = np.ones((ys.size, xs.size), bool)
    elif name == "square_cross":  # a plus sign of half-width param, arms 0.64 of the side
        inside = np.ones((ys.size, xs.size), bool)
        au, av = np.abs(u), np.abs(v)
        second = ((au <= spec.param) & (av <= 0.32)) | ((av <= spec.param) & (au <= 0.32))
    elif name == "triangle":  # apex at the top centre
        inside = v + 0.5 >= 2 * np.abs(u)
    else:  # triangle_down: apex at the bottom centre
        inside = 0.5 - v >= 2 * np.abs(u)
    inside = inside & (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    cov = _coverage(inside)
    one_colour = second.shape == (1, 1)
    sec = np.zeros_like(cov) if one_colour else _coverage(second & inside)
    key = sec >= 0.5 if name == "square_cross" else np.zeros(cov.shape, bool)
    return slice(r0, r1), slice(c0, c1), cov, sec, key


def _coverage(samples: np.ndarray) -> np.ndarray:
    """(H*k, W*k) bool samples -> (H, W) float32 share of samples set, k = _SUPERSAMPLE."""
    k = _SUPERSAMPLE
    total = np.zeros((samples.shape[0] // k, samples.shape[1] // k), np.float32)
    for dy in range(k):  # k*k strided adds beat a float mean over a reshaped bool array
        for dx in range(k):
            total += samples[dy::k, dx::k]
    return total / (k * k)


def _pick_colours(
    rng: np.random.Generator, under: np.ndarray, spec: _Spec, min_contrast: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Main and second colour that stand out; None if none does (the placement is retried).

    Contrast is the 10th percentile of the RGB distance to the pixels under the object's box,
    so a mixed background (stripes, other objects) must be beaten almost everywhere.
    """
    pixels = under.reshape(-1, 3)
    pixels = pixels[:: max(1, len(pixels) // 256)]  # a few hundred pixels estimate it well
    cand = rng.uniform(0, 255, (_COLOUR_TRIES, 3))
    dist = np.linalg.norm(pixels[None, :, :] - cand[:, None, :], axis=2)  # (C, P)
    contrast = np.percentile(dist, 10, axis=1)
    best = int(np.argmax(contrast))
    if contrast[best] < 0.5 * min_contrast:
        return None
    good = np.flatnonzero(contrast >= min_contrast)
    main = cand[good[0]] if good.size else cand[best]
    if CLASSES[spec.cls] not in ("square_cross", "striped_ellipse"):
        return main, main
    # The detail must stand out from the main colour; stripes also from the background,
    # or the ellipse's outline would break up.
    to_main = np.linalg.norm(cand - main, axis=1)
    score = to_main if CLASSES[spec.cls] == "square_cross" else np.minimum(to_main, contrast)
    return main, cand[int(np.argmax(score))]


def _background(rng: np.random.Generator, size: int, texture: float) -> np.ndarray:
    """(S, S, 3) float32: a colour, pulled toward a second one by a flat / gradient / stripe /
    blotch pattern whose amplitude is ``texture``, plus pixel noise."""
    base = rng.uniform(0, 255, 3)
    other = rng.uniform(0, 255, 3)
    kind = int(rng.integers(4))
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    theta = rng.uniform(0, 2 * math.pi)
    proj = coords[None, :] * math.cos(theta) + coords[:, None] * math.sin(theta)
    if kind == 0:
        t = np.zeros((size, size))
    elif kind == 1:  # linear gradient
        t = (proj - proj.min()) / (proj.max() - proj.min())
    elif kind == 2:  # stripes, soft or hard, 4..24 px period at 128 px
        period = rng.uniform(4, 24) / _REFERENCE_SIZE
        t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period + rng.uniform(0, 2 * math.pi))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float64)
    else:  # blotches: bilinear upsampling of a coarse random grid
        k = int(rng.integers(3, 9))
        grid = rng.uniform(0, 1, (k, k))
        pos = coords * (k - 1)
        i0 = np.minimum(pos.astype(np.int64), k - 2)
        frac = pos - i0
        interp = np.zeros((size, k))  # (S, k): row s mixes grid rows i0 and i0 + 1
        interp[np.arange(size), i0] = 1 - frac
        interp[np.arange(size), i0 + 1] = frac
        t = interp @ grid @ interp.T
    img = base + (other - base) * (texture * t)[..., None]
    img = img + rng.normal(0, 4 + 16 * texture, (size, size, 1))  # luminance noise
    return np.clip(img, 0, 255).astype(np.float32)


def _draw_distractors(rng: np.random.Generator, canvas: np.ndarray, max_count: int) -> None:
    """Paint clutter that is no class: polylines and spiky stars, anti-aliased like objects."""
    size = canvas.shape[0]
    scale = size / _REFERENCE_SIZE
    ss = _SUPERSAMPLE
    for _ in range(int(rng.integers(0, max_count + 1))):
        layer = Image.new("L", (size * ss, size * ss), 0)
        draw = ImageDraw.Draw(layer)
        if rng.random() < 0.6:
            point = rng.uniform(0, size, 2)
            points = [point]
            for _ in range(int(rng.integers(1, 4))):
                step = rng.uniform(0.08, 0.35) * size
                angle = rng.uniform(0, 2 * math.pi)
                point = point + step * np.array([math.cos(angle), math.sin(angle)])
                points.append(point)
            width = max(1, round(rng.uniform(1.0, 3.0) * scale * ss))
            xy = [(float(p[0] * ss), float(p[1] * ss)) for p in points]
            draw.line(xy, fill=255, width=width, joint="curve")
        else:
            centre = rng.uniform(0, size, 2)
            radius = rng.uniform(5, 18) * scale
            tips = int(rng.integers(4, 8))
            angles = np.linspace(0, 2 * math.pi, 2 * tips, endpoint=False) + rng.uniform(0, 6.3)
            radii = (
                np.where(
                    np.arange(2 * tips) % 2 == 0,
                    rng.uniform(0.8, 1.0, 2 * tips),
                    rng.uniform(0.25, 0.5, 2 * tips),
                )
                * radius
            )
            xy = [
                (
                    float((centre[0] + r * math.cos(a)) * ss),
                    float((centre[1] + r * math.sin(a)) * ss),
                )
                for r, a in zip(radii, angles)
            ]
            draw.polygon(xy, fill=255)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        bbox = layer.getbbox()
        if bbox is None:  # drawn wholly outside the image
            continue
        # Composite only over the drawn part, in whole pixels.
        c0, r0 = bbox[0] // ss, bbox[1] // ss
        c1, r1 = -(-bbox[2] // ss), -(-bbox[3] // ss)
        crop = np.asarray(layer.crop((c0 * ss, r0 * ss, c1 * ss, r1 * ss)), np.float32)
        cov = crop.reshape(r1 - r0, ss, c1 - c0, ss).mean(axis=(1, 3))[..., None] / 255
        region = canvas[r0:r1, c0:c1]
        canvas[r0:r1, c0:c1] = region * (1 - cov) + colour * cov


# --------------------------------------------------------------------------------------------
# Writing a dataset
# --------------------------------------------------------------------------------------------


def _render_chunk(
    job: tuple[Path, str, int, int, int, int, str],
) -> list[list[tuple[int, list[float]]]]:
    """Draw and save images ``start..stop`` of one split; (category, xywh) per object per image."""
    out, split, start, stop, size, seed, difficulty = job
    preset = DIFFICULTIES[difficulty]
    result = []
    for index in range(start, stop):
        drawn = render_image(image_rng(seed, split, index), size, preset)
        # Fixed PNG settings and no metadata: same pixels, same bytes.
        Image.fromarray(drawn.image).save(
            out / "images" / split / f"{index:06d}.png", format="PNG", compress_level=6
        )
        objects = []
        for (x0, y0, x1, y1), label in zip(drawn.boxes.tolist(), drawn.labels.tolist()):
            x, y = round(x0, 2), round(y0, 2)
            objects.append((label, [x, y, round(round(x1, 2) - x, 2), round(round(y1, 2) - y, 2)]))
        result.append(objects)
    return result


def _coco(
    split: str,
    size: int,
    objects_per_image: list[list[tuple[int, list[float]]]],
    classes: tuple[str, ...] = CLASSES,
) -> dict:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, objects in enumerate(objects_per_image):
        images.append(
            {
                "id": index + 1,
                "file_name": f"{split}/{index:06d}.png",
                "width": size,
                "height": size,
            }
        )
        for label, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label,
                    "bbox": [x, y, w, h],
                    # No masks: the area is the box's, as pycocotools computes it for detections.
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i + 1, "name": n, "supercategory": "shape"}
        for i, n in enumerate(CLASSES)
        if n in classes
    ]
    return {
        "info": {
            "description": f"distill shapes benchmark, {split}",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def generate_shapes(
    out: Path,
    num_train: int = BENCHMARK_TRAIN,
    num_val: int = BENCHMARK_VAL,
    size: int = 128,
    seed: int = 0,
    difficulty: str = "easy",
    workers: int | None = None,
) -> None:
    """Write the shapes benchmark to ``out`` (layout in the module docstring).

    ``workers`` processes draw the images (default: up to 2, fewer for small sets); the files
    do not depend on it. ``out`` must be empty or missing, or hold a shapes dataset made with
    the same arguments: a complete one is left as it is (skipped, nothing is rewritten), an
    unfinished one is generated again. Anything else is refused with FileExistsError.
    """
    preset = get_difficulty(difficulty)
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got train={num_train} val={num_val}")
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    manifest: dict[str, Any] = {
        "generator": "distill.data.shapes",
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "size": size,
        "seed": seed,
        "difficulty": difficulty,
        "preset": asdict(preset),  # a retuned preset makes an old dataset a different one
    }
    # Defaults are left out, as in the manifests of datasets made before these knobs existed.
    if preset.classes == CLASSES:
        del manifest["preset"]["classes"]
    if preset.min_objects == 0:
        del manifest["preset"]["min_objects"]
    manifest = json.loads(json.dumps(manifest))  # as read back: tuples become lists
    if _existing_matches(out, manifest):
        log.info("%s already holds this shapes dataset; skipping generation", out)
        return

    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    _write_json(out / "shapes.json", {**manifest, "complete": False})
    counts = {"train": num_train, "val": num_val}
    total = num_train + num_val
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if total >= 200 else 1
    chunk = 50
    jobs = [
        (out, split, start, min(start + chunk, counts[split]), size, seed, difficulty)
        for split in SPLITS
        for start in range(0, counts[split], chunk)
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_render_chunk, jobs))
    else:
        results = [_render_chunk(job) for job in jobs]
    for split in SPLITS:
        per_image = [obj for job, res in zip(jobs, results) if job[1] == split for obj in res]
        _write_json(out / f"{split}.json", _coco(split, size, per_image, preset.classes))
    _write_json(out / "shapes.json", {**manifest, "complete": True})


def _existing_matches(out: Path, manifest: dict[str, Any]) -> bool:
    """True if ``out`` holds this dataset complete; False if it is free or unfinished."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    path = out / "shapes.json"
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileExistsError(
            f"{out} is not empty and is not a shapes dataset (no shapes.json); "
            "choose an empty folder or delete it"
        ) from None
    except (OSError, ValueError) as err:
        raise FileExistsError(
            f"{path} cannot be read ({err}); delete {out} or choose another folder"
        ) from None
    if not isinstance(old, dict):
        old = {}
    changed = [k for k in manifest if old.get(k) != manifest[k]]
    if changed:
        preset = old.get("preset")
        was: dict[str, Any] = preset if isinstance(preset, dict) else {}
        details = ", ".join(
            [f"{k}: {old.get(k)!r} -> {manifest[k]!r}" for k in changed if k != "preset"]
            + [
                f"preset.{k}: {was.get(k)!r} -> {v!r}"
                for k, v in manifest["preset"].items()
                if was.get(k) != v
            ]
        )
        raise FileExistsError(
            f"{out} holds a shapes dataset made with other arguments "
            f"({details or 'preset changed'}); delete it or choose another folder"
        )
    return bool(old.get("complete")) and all((out / f"{s}.json").is_file() for s in SPLITS)
