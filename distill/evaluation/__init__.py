"""Measuring a model: COCO mAP with pycocotools (``evaluate``), size, compute and latency
(``cost``), detections drawn on images (``draw``), and a KD gain with its confidence interval
over seeds and over images (``intervals``, on COCO's AP re-accumulated over resampled images:
``accumulate``).
"""
