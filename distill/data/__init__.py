"""COCO-format detection data: the dataset, batching, seeding, flips and result conversion.

The built-in synthetic benchmark lives in ``distill.data.shapes`` (imported on its own).
"""

from distill.data.coco import (
    CocoDetection,
    DatasetError,
    build_dataset,
    clean_boxes,
    collate,
    load_image,
    make_generator,
    predictions_to_coco,
    seed_worker,
)
from distill.data.transforms import hflip, random_hflip

__all__ = [
    "CocoDetection",
    "DatasetError",
    "build_dataset",
    "clean_boxes",
    "collate",
    "hflip",
    "load_image",
    "make_generator",
    "predictions_to_coco",
    "random_hflip",
    "seed_worker",
]
