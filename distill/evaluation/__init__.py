"""Measuring a model: COCO mAP with pycocotools (``evaluate``), size, compute and latency
(``cost``), and detections drawn on images (``draw``).
"""
