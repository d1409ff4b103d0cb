"""Statistics of COCO-format annotation files, as printed by ``distill data stats``.

Size buckets follow COCO's rule on the box area ``w * h``: small < 32², medium up to 96²,
large above (the same area pycocotools gives detections, and the shapes benchmark's
annotations).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

SMALL_MAX_AREA = 32**2
LARGE_MIN_AREA = 96**2


def size_bucket(area: float) -> str:
    """COCO size bucket of an area in px²: small, medium or large."""
    if area < SMALL_MAX_AREA:
        return "small"
    return "medium" if area <= LARGE_MIN_AREA else "large"


def dataset_stats(path: Path, images_dir: Path | None = None) -> dict[str, Any]:
    """Counts of one annotation file (see ``format_stats``); FileNotFoundError if it is missing.

    With ``images_dir``, also counts images whose file is not there.
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    data = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    images = data.get("images", [])
    annotations = data.get("annotations", [])
    per_image = Counter(a["image_id"] for a in annotations)
    per_class = Counter(a["category_id"] for a in annotations)
    per_bucket = Counter(size_bucket(a["bbox"][2] * a["bbox"][3]) for a in annotations)
    stats: dict[str, Any] = {
        "images": len(images),
        "boxes": len(annotations),
        "empty_images": sum(1 for im in images if per_image[im["id"]] == 0),
        "max_per_image": max(per_image.values(), default=0),
        "per_bucket": {b: per_bucket[b] for b in ("small", "medium", "large")},
        # Every category appears, with 0 if unused; ids not among the categories too.
        "per_class": {names[i]: per_class[i] for i in names}
        | {f"unknown id {i}": n for i, n in per_class.items() if i not in names},
    }
    stats["mean_per_image"] = stats["boxes"] / stats["images"] if images else 0.0
    if images_dir is not None:
        stats["missing_files"] = sum(
            1 for im in images if not (images_dir / im["file_name"]).is_file()
        )
    return stats


def format_stats(root: Path, ann_files: list[str], images: str = "images") -> str:
    """A readable report of each annotation file in ``root``.

    Per file: images (empty ones, missing image files under ``root/images``), boxes in total and
    per image, per COCO size bucket and per class name. FileNotFoundError names a missing file.
    """
    root = Path(root)
    blocks = []
    for ann in ann_files:
        s = dataset_stats(root / ann, root / images)
        boxes = s["boxes"]

        def share(n: int, total: int) -> str:
            return f"{n} ({100 * n / total:.1f}%)" if total else str(n)

        lines = [
            f"{ann}: {s['images']} images in {root / images}",
            f"  empty images   {share(s['empty_images'], s['images'])}",
            f"  missing files  {s['missing_files']}",
            f"  boxes          {boxes}  ({s['mean_per_image']:.2f} per image, "
            f"at most {s['max_per_image']})",
            "  by size        "
            + "   ".join(f"{b} {share(n, boxes)}" for b, n in s["per_bucket"].items()),
            "  by class",
        ]
        width = max((len(name) for name in s["per_class"]), default=0)
        lines += [f"    {name:<{width}}  {share(n, boxes)}" for name, n in s["per_class"].items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
