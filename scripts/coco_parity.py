"""Parity with torchvision at the COCO configs' own resize (800 / 1333), no network needed.

    python scripts/coco_parity.py            # both archs, a 480x640 and a 200x150 image

tests/test_coco_parity.py checks the same at 96 / 160 to stay cheap; this measures the largest
box and score differences between ``model.eval()(images)`` of torchvision's builder (seeded
random weights, classification bias raised so that there are detections) and the project's
detections (``distill.evaluation.evaluate.detect``) with the weights loaded through the COCO config.
About 2 CPU-minutes per arch on 2 cores.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.config import load_config, override  # noqa: E402
from distill.device import make_accelerator  # noqa: E402
from distill.evaluation.evaluate import detect, load_detector  # noqa: E402
from distill.models.retinanet import build_transform  # noqa: E402
from tests.test_coco_parity import ARCHS, NUM_CLASSES, raise_bias  # noqa: E402

SIZES = ((480, 640), (200, 150))  # (H, W): a COCO-like landscape, a portrait below min_size


def main() -> None:
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), generator=gen).float() / 255 for h, w in SIZES]
    for arch, (builder, config) in ARCHS.items():
        torch.manual_seed(0)
        model = raise_bias(builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES))
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "state_dict.pt"
            torch.save(model.state_dict(), weights)
            cfg = load_config(
                REPO / "configs" / "coco" / config, [override("teacher.weights", weights)]
            )
            ours = load_detector(cfg, "teacher", str(weights), NUM_CLASSES)
        transform, accelerator = build_transform(cfg), make_accelerator(cfg)
        box = score = 0.0
        labels_equal = True
        for image in images:  # one at a time: a batch of 800 px images needs much memory
            with torch.no_grad():
                want = model.eval()([image])[0]
            got = detect(ours, transform, [image], accelerator)[0]
            labels_equal &= torch.equal(got["labels"], want["labels"])
            box = max(box, float((got["boxes"] - want["boxes"]).abs().max()))
            score = max(score, float((got["scores"] - want["scores"]).abs().max()))
        print(
            f"{arch} at {cfg.data.min_size} / {cfg.data.max_size}: largest box difference "
            f"{box:.3g} px, score {score:.3g}, labels equal: {labels_equal}"
        )


if __name__ == "__main__":
    main()
