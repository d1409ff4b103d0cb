"""torchvision's COCO RetinaNets run here exactly as torchvision runs them.

For retinanet_resnet50_fpn and _v2, torchvision's own builder makes a seeded random model
(no network: weights=None), its state dict is saved to a file and loaded through the project's
COCO config, and the project's detections (the path ``distill eval`` scores) and training
losses are compared with ``model.eval()(images)`` and ``model(images, targets)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.io import read_image
from torchvision.models.detection import (
    RetinaNet,
    RetinaNet_ResNet50_FPN_Weights,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
)
from torchvision.ops import box_convert

from distill.cli import main
from distill.config import TORCHVISION_ANCHORS, Config, load_config
from distill.data import load_image
from distill.device import make_accelerator
from distill.engine.build import build_models
from distill.evaluation.evaluate import detect, load_detector
from distill.models.card import write_card
from distill.models.retinanet import build_anchor_generator, build_transform, detection_loss
from tests.conftest import REPO

ARCHS = {
    "retinanet_resnet50_fpn": (retinanet_resnet50_fpn, "teacher_eval.yaml"),
    "retinanet_resnet50_fpn_v2": (retinanet_resnet50_fpn_v2, "teacher_eval_v2.yaml"),
}
# The COCO configs resize to 800 / 1333. An R50-FPN forward at that size costs ~150 GFLOPs an
# image, and torchvision upsamples small images to min_size, so small images save nothing:
# these tests would take minutes on 2 CPU cores. Both sides get the same smaller bounds with
# the COCO ratio (1333 / 800) instead; the resize rule, the anchors (the COCO config's), the
# heads and the post-processing are the ones under test, and they do not depend on the scale.
MIN_SIZE, MAX_SIZE = 96, 160
# (H, W): a landscape capped by max_size (200 * 96 / 60 > 160), a portrait, and one smaller
# than min_size (upsampled).
IMAGE_SIZES = [(60, 200), (150, 100), (40, 50)]
NUM_CLASSES = 91  # torchvision's COCO label space: label = COCO category id, 0 background


def raise_bias(model: RetinaNet) -> RetinaNet:
    """Spread the class scores of a random head (std 0.01 weights make them all alike) and
    lift them over the 0.05 score threshold, the background column kept silent, as trained."""
    head = model.head.classification_head
    with torch.no_grad():
        head.cls_logits.weight.normal_(0, 0.05)
        bias = head.cls_logits.bias.view(head.num_anchors, NUM_CLASSES)
        bias.fill_(-1.5)
        bias[:, 0] = -20.0
    return model.eval()


def reference_model(arch: str) -> RetinaNet:
    """torchvision's builder with seeded random weights at the test's resize, bias raised so
    that detections pass the score threshold."""
    builder, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = builder(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_CLASSES,
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
    )
    return raise_bias(model)


def images_as_files(root: Path) -> list[Path]:
    """Seeded random RGB images saved as PNG (what ``distill eval`` reads back exactly)."""
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        path = root / f"{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def overrides(weights: Path, root: Path) -> list[str]:
    """--set overrides of the COCO config: the weights file, the test's resize and data."""
    return [
        f"teacher.weights={weights}",
        f"data.min_size={MIN_SIZE}",
        f"data.max_size={MAX_SIZE}",
        "data.num_workers=0",
        f"data.root={root}",
        "data.val=val.json",
        "data.val_images=images",
    ]


def project_config(arch: str, weights: Path) -> Config:
    """The project's COCO config for ``arch``, read with --set style overrides."""
    return load_config(
        REPO / "configs" / "coco" / ARCHS[arch][1], overrides(weights, weights.parent)
    )


@pytest.fixture(scope="module", params=list(ARCHS))
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    (root / "images").mkdir()
    paths = images_as_files(root / "images")
    images = [load_image(p) for p in paths]
    model = reference_model(arch)
    weights = root / "torchvision_state_dict.pt"
    torch.save(model.state_dict(), weights)
    with torch.no_grad():
        expected = model(images)
    return arch, root, paths, images, model, weights, expected


def test_anchors_are_torchvisions() -> None:
    ours = build_anchor_generator(TORCHVISION_ANCHORS)
    for builder, _ in ARCHS.values():
        theirs = builder(weights=None, weights_backbone=None).anchor_generator
        assert ours.sizes == theirs.sizes and ours.aspect_ratios == theirs.aspect_ratios
    for name in ("teacher_eval.yaml", "teacher_eval_v2.yaml", "distill.yaml", "student.yaml"):
        cfg = load_config(REPO / "configs" / "coco" / name)
        assert cfg.anchors == TORCHVISION_ANCHORS
        assert (cfg.data.min_size, cfg.data.max_size) == (800, 1333)


def test_eval_detections_equal_torchvisions(setup: Any) -> None:
    arch, _, _, images, _, weights, expected = setup
    cfg = project_config(arch, weights)
    detector = load_detector(cfg, "teacher", str(weights), NUM_CLASSES)
    accelerator = make_accelerator(cfg)
    ours = detect(detector, build_transform(cfg), images, accelerator)  # what eval scores
    worst_box = worst_score = 0.0
    for got, want in zip(ours, expected, strict=True):
        assert len(want["boxes"]) > 10  # there is something to compare
        assert torch.equal(got["labels"], want["labels"])
        worst_box = max(worst_box, float((got["boxes"] - want["boxes"]).abs().max()))
        worst_score = max(worst_score, float((got["scores"] - want["scores"]).abs().max()))
    print(f"{arch}: largest box difference {worst_box:.3g} px, score {worst_score:.3g}")
    assert worst_box <= 1e-3 and worst_score <= 1e-4
    # the detections are those of the whole resize: the capped landscape's boxes reach its
    # right edge in original pixels, beyond what a 266 px frame would hold
    assert float(ours[0]["boxes"][:, 2].max()) > MAX_SIZE


def test_train_losses_equal_torchvisions(setup: Any) -> None:
    arch, _, _, images, model, weights, _ = setup
    gen = torch.Generator().manual_seed(2)
    targets = []
    for h, w in IMAGE_SIZES:
        xy = torch.rand(3, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(3, 2, generator=gen) * 0.35 + 0.05) * torch.tensor([w, h])
        labels = torch.randint(1, NUM_CLASSES, (3,), generator=gen)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})

    # torchvision trains from pretrained weights with FrozenBatchNorm2d in the ResNet; its
    # builder without weights uses BatchNorm2d, so hold those in eval mode: the same function.
    model.train()
    for m in model.backbone.body.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        want = model(images, [dict(t) for t in targets])
    model.eval()

    # the project's train-teacher step: shared transform, the prepared module, detection loss
    cfg = project_config(arch, weights)
    module, _ = build_models(cfg, "teacher", NUM_CLASSES)
    module.train()
    transform = build_transform(cfg)
    with torch.no_grad():
        image_list, moved = transform(images, [dict(t) for t in targets])
        outputs = module(image_list.tensors, image_list.image_sizes)
        got = detection_loss(module.detector, outputs, moved)
    assert set(got) == set(want) == {"classification", "bbox_regression"}
    differences = {key: abs(float(got[key]) - float(want[key])) for key in want}
    print(f"{arch}: loss differences {differences}")
    for key, difference in differences.items():
        assert difference <= 1e-5, (key, got[key], want[key])


def test_distill_eval_ap_equals_pycocotools(setup: Any, tmp_path: Path) -> None:
    """Ground truth = torchvision's own best detections; the AP of ``distill eval`` is the AP
    pycocotools gives torchvision's predictions."""
    arch, root, paths, images, _, weights, expected = setup
    names = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = COCO id
    categories = [{"id": i, "name": n} for i, n in enumerate(names) if i > 0 and n != "N/A"]
    gt_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, (path, image, det) in enumerate(zip(paths, images, expected), start=1):
        h, w = (int(v) for v in image.shape[-2:])
        gt_images.append({"id": i, "file_name": path.name, "width": w, "height": h})
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            x1, y1, x2, y2 = box.tolist()
            xywh = [x1, y1, x2 - x1, y2 - y1]
            results.append(
                {"image_id": i, "category_id": int(label), "bbox": xywh, "score": float(score)}
            )
        # ground truth: the 8 best detections of a COCO category at least 2 px wide, kept inside
        # the image (the dataset would clip them) and shrunk by factors whose IoUs stay clear of
        # COCO's thresholds 0.5:0.05:0.95 (at a threshold, float rounding would decide a match)
        sides = (det["boxes"][:, 2:] - det["boxes"][:, :2]).min(dim=1).values
        best = [
            k
            for k in range(len(det["labels"]))
            if names[int(det["labels"][k])] != "N/A" and float(sides[k]) >= 2
        ]
        for k in best[:8]:
            x1, y1, x2, y2 = det["boxes"][k].clamp(min=0).tolist()
            x2, y2 = min(x2, w), min(y2, h)
            bw, bh = (x2 - x1) * (1, 0.93, 0.86)[k % 3], (y2 - y1) * (1, 0.97, 0.89, 0.81)[k % 4]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(det["labels"][k]),
                    "bbox": [x1, y1, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    gt = {"images": gt_images, "annotations": annotations, "categories": categories}
    (root / "val.json").write_text(json.dumps(gt))

    coco = COCO(str(root / "val.json"))
    evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    want = evaluator.stats

    out = tmp_path / "metrics.json"
    cfg_path = REPO / "configs" / "coco" / ARCHS[arch][1]
    sets = [a for o in overrides(weights, root) for a in ("--set", o)]
    sets += ["--set", "train.mixed_precision=fp16"]  # a training setting: eval ignores it
    args = ["eval", str(cfg_path), *sets, "--model", "teacher", "--weights", str(weights)]
    assert main([*args, "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert 0.2 < want[0] < 1.0  # neither trivial nor perfect
    for key, index in (("map", 0), ("ap50", 1), ("ap75", 2), ("ar100", 8)):
        assert metrics[key] == pytest.approx(float(want[index]), abs=1e-9), key
    assert np.isfinite(want).all()


# (H, W) of the images `distill predict` is given in one folder: a landscape capped by max_size,
# a portrait, one smaller than min_size, odd sides, exactly min x max, a square, a long banner
# and two images of one size (they share a batch).
PREDICT_SIZES = [(60, 200), (150, 100), (40, 50), (97, 131), (96, 160), (101, 101), (30, 170)]
PREDICT_SIZES += [(150, 100)]


def test_predict_equals_torchvision_at_every_size(setup: Any, tmp_path: Path) -> None:
    """``distill predict`` on a folder of PNGs of many sizes gives, image by image, exactly the
    detections of torchvision's own inference path: ``read_image``, the weights' transforms()
    and ``model.eval()([image])``. The configs' training settings (fp16 in coco/distill.yaml,
    set for v1 too) do not stop inference on a CPU."""
    arch, _, _, _, model, weights, _ = setup
    folder = tmp_path / "photos"
    folder.mkdir()
    gen = torch.Generator().manual_seed(3)
    for i, (h, w) in enumerate(PREDICT_SIZES):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")

    config = (
        REPO / "configs" / "coco" / ("distill.yaml" if arch.endswith("_v2") else ARCHS[arch][1])
    )
    # torchvision's state dict with a card naming COCO's categories (label = COCO id); the card's
    # resize is the test's, so the weights are checked against it and categories read from it
    names = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = COCO id
    categories = [
        {"id": i, "name": n, "label": i} for i, n in enumerate(names) if i > 0 and n != "N/A"
    ]
    carded = tmp_path / "teacher.pt"
    carded.write_bytes(weights.read_bytes())
    write_card(carded, load_config(config, overrides(weights, tmp_path)), "teacher", 91, categories)
    sets = [a for o in overrides(carded, tmp_path) for a in ("--set", o)]
    sets += ["--set", "train.mixed_precision=fp16"]  # a GPU training setting; this is a CPU
    out = tmp_path / "out"
    args = ["predict", str(config), *sets, "--model", "teacher", "--weights", str(carded)]
    assert main([*args, str(folder), "--out", str(out)]) == 0
    rows = json.loads((out / "detections.json").read_text())

    preset = RetinaNet_ResNet50_FPN_Weights.COCO_V1.transforms()
    for i, (h, w) in enumerate(PREDICT_SIZES):
        with torch.no_grad():
            want = model([preset(read_image(str(folder / f"{i:02d}.png")))])[0]
        keep = torch.tensor(
            [names[int(label)] != "N/A" for label in want["labels"]], dtype=torch.bool
        )
        got = [row for row in rows if row["file_name"] == f"{i:02d}.png"]
        assert len(got) == int(keep.sum()) > 10, (h, w)
        assert [row["category_id"] for row in got] == want["labels"][keep].tolist(), (h, w)
        assert [row["score"] for row in got] == want["scores"][keep].tolist(), (h, w)
        xywh = box_convert(want["boxes"][keep], "xyxy", "xywh").tolist()
        assert [row["bbox"] for row in got] == xywh, (h, w)

    # --batch-size 8: only the two images of one size share a forward, and so differ from a
    # single image's forward in the last bits only; the others are still exactly equal
    batched = tmp_path / "batched"
    assert main([*args, str(folder), "--out", str(batched), "--batch-size", "8"]) == 0
    again = json.loads((batched / "detections.json").read_text())
    for name in {row["file_name"] for row in rows}:
        one = [r for r in rows if r["file_name"] == name]
        eight = [r for r in again if r["file_name"] == name]
        if name in ("01.png", "07.png"):  # the pair of (150, 100)
            assert [r["score"] for r in eight] == pytest.approx([r["score"] for r in one], abs=1e-5)
        else:
            assert eight == one, name


def test_inference_precision_is_its_own_option(
    setup: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fp16 inference asked for on a CPU is refused in one line naming --precision (the
    config's training precision is not the one checked); bf16 is honoured."""
    arch, root, paths, _, _, weights, _ = setup
    cfg_path = str(REPO / "configs" / "coco" / ARCHS[arch][1])
    sets = [a for o in overrides(weights, root) for a in ("--set", o)]
    common = [*sets, "--model", "teacher", "--weights", str(weights), str(paths[2])]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["predict", cfg_path, *common, "--precision", "fp16", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill: error: --precision=fp16 needs a CUDA GPU"), err
    assert "train.mixed_precision" not in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["predict", cfg_path, *common, "--precision", "bf16", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["predicted"] == 1
