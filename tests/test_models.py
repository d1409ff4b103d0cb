"""Teacher, students, the dense forward, weights files and ``distill summary``.

Tiny images (64-96 px), batch 1-2, random weights; R50 teachers are built once per module.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights, retinanet_resnet50_fpn
from torchvision.models.detection.image_list import ImageList

import distill.evaluation.cost as summary_module
from distill.cli import main
from distill.config import AnchorConfig, Config, load_config, replace
from distill.deploy.latency import format_deployed
from distill.evaluation.cost import DEFAULT_NUM_CLASSES, _num_classes, format_summary
from distill.models.retinanet import (
    LEVELS,
    STRIDES,
    DenseOutputs,
    FreezableRetinaNet,
    build_anchor_generator,
    build_transform,
    check_compatible,
    dense_forward,
    detection_loss,
    feature_strides,
    postprocess,
)
from distill.models.weights import (
    CLS_LOGITS_KEYS,
    WeightsMismatchError,
    load_state_dict_file,
    resolve_weights,
    save_state_dict_file,
)
from students import STUDENTS, build_student
from teachers import build_teacher

NUM_CLASSES = 5  # 4 dataset classes + background
CFG = replace(Config(), **{"data.image_size": 64})


def images_and_targets(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[list[Tensor], list]:
    """Raw images (3, H, W) in [0, 1] and targets; the last image has no boxes."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = []
    for i, (h, w) in enumerate(sizes):
        if i == len(sizes) - 1 and len(sizes) > 1:
            targets.append(
                {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
            )
            continue
        boxes = torch.tensor([[4.0, 6.0, w / 2, h / 2], [w / 3, h / 4, w - 2.0, h - 3.0]])
        targets.append({"boxes": boxes, "labels": torch.tensor([1, NUM_CLASSES - 1])})
    return images, targets


def transformed(cfg: Config, sizes: list[tuple[int, int]]) -> ImageList:
    images, _ = images_and_targets(sizes)
    return build_transform(cfg)(images)[0]


def state_equal(a: dict[str, Tensor], b: dict[str, Tensor], skip: tuple[str, ...] = ()) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k not in skip)


@pytest.fixture(scope="module")
def teacher() -> FreezableRetinaNet:
    return build_teacher(CFG, NUM_CLASSES)


@pytest.fixture(scope="module")
def teacher_v2() -> FreezableRetinaNet:
    return build_teacher(replace(CFG, **{"teacher.arch": "retinanet_resnet50_fpn_v2"}), NUM_CLASSES)


@pytest.fixture(scope="module")
def coco_like_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A trainable 91-class v1 teacher after one train-mode forward (BN buffers moved), saved."""
    model = build_teacher(CFG, 91, frozen=False)
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    with torch.no_grad():
        model.backbone(torch.rand(2, 3, 64, 64))
    state = model.state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "teacher91.pt"
    save_state_dict_file(state, path)
    return path, state


# --------------------------------------------------------------------------------------------
# Anchors, strides, shapes
# --------------------------------------------------------------------------------------------


def test_anchor_generator_follows_config() -> None:
    gen = build_anchor_generator(AnchorConfig())
    assert gen.sizes[0] == (16, 20, 25) and gen.sizes[-1] == (256, 322, 406)
    assert gen.num_anchors_per_location() == [9] * 5
    # torchvision's own RetinaNet anchors, from the config that describes them
    coco = build_anchor_generator(AnchorConfig(sizes=(32, 64, 128, 256, 512)))
    assert coco.sizes == tuple(
        (x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512)
    )
    with pytest.raises(ValueError, match="one base size per level"):
        build_anchor_generator(AnchorConfig(sizes=(32, 64, 128, 256)))


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64)])
def test_teacher_and_student_anchors_are_equal(teacher: FreezableRetinaNet, size) -> None:
    cfg = replace(CFG, **{"data.image_size": 96})
    student = build_student(cfg, NUM_CLASSES)
    images = transformed(cfg, [size, size])
    with torch.no_grad():
        t, s = dense_forward(teacher, images), dense_forward(student, images)
    assert tuple(images.tensors.shape[-2:]) == ((96, 96) if size == (64, 64) else size)
    assert len(t.anchors) == len(s.anchors) == 2
    for a_t, a_s in zip(t.anchors, s.anchors):
        assert torch.equal(a_t, a_s)
        assert a_t.shape == (t.cls_logits.shape[1], 4)
    assert t.num_anchors_per_level == s.num_anchors_per_level
    assert t.cls_logits.shape == s.cls_logits.shape


@pytest.mark.parametrize("arch", sorted(STUDENTS))
def test_student_output_shapes_and_strides(arch: str) -> None:
    cfg = replace(CFG, **{"data.image_size": 96, "student.arch": arch, "student.fpn_channels": 64})
    student = build_student(cfg, NUM_CLASSES)
    assert feature_strides(student) == list(STRIDES)
    for sizes in ([(64, 64)], [(64, 96), (48, 80)]):
        images = transformed(cfg, sizes)
        out = dense_forward(student, images)
        n, (h, w) = len(sizes), images.tensors.shape[-2:]
        assert list(out.features) == list(LEVELS)
        for level, stride in zip(LEVELS, STRIDES):
            assert out.features[level].shape == (
                n,
                64,
                math.ceil(h / stride),
                math.ceil(w / stride),
            )
        a = sum(out.num_anchors_per_level)
        assert out.num_anchors_per_level == [
            9 * f.shape[-2] * f.shape[-1] for f in out.features.values()
        ]
        assert out.cls_logits.shape == (n, a, NUM_CLASSES)
        assert out.bbox_regression.shape == (n, a, 4)
        assert [x.shape for x in out.anchors] == [(a, 4)] * n


def test_teacher_features_are_p3_to_p7(teacher: FreezableRetinaNet, teacher_v2) -> None:
    assert feature_strides(teacher) == feature_strides(teacher_v2) == list(STRIDES)
    with torch.no_grad():
        out = dense_forward(teacher, transformed(CFG, [(64, 64)]))
    assert isinstance(out, DenseOutputs)
    assert {k: tuple(v.shape) for k, v in out.features.items()} == {
        "p3": (1, 256, 8, 8),
        "p4": (1, 256, 4, 4),
        "p5": (1, 256, 2, 2),
        "p6": (1, 256, 1, 1),
        "p7": (1, 256, 1, 1),
    }
    # v2 gets the run's anchors, not torchvision's default ones
    assert teacher_v2.anchor_generator.sizes == build_anchor_generator(CFG.anchors).sizes


def test_student_head_options() -> None:
    build = STUDENTS["retinanet_mobilenet_v3_small_fpn"]
    model = build(NUM_CLASSES, fpn_channels=64, head_channels=32, head_convs=3, norm="gn")
    tower = model.head.classification_head.conv
    assert len(tower) == 3 and len(model.head.regression_head.conv) == 3
    assert tower[0][0].in_channels == 64 and tower[0][0].out_channels == 32
    assert model.head.classification_head.cls_logits.in_channels == 32
    assert any(isinstance(m, nn.GroupNorm) for m in model.backbone.fpn.modules())
    plain = build(NUM_CLASSES, head_convs=0, norm="none")
    assert len(plain.head.classification_head.conv) == 0
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    out = dense_forward(plain, transformed(CFG, [(64, 64)]))
    assert out.cls_logits.shape[-1] == NUM_CLASSES
    with pytest.raises(ValueError, match="head_convs >= 1"):
        build(NUM_CLASSES, fpn_channels=64, head_channels=32, head_convs=0)
    with pytest.raises(ValueError, match=r"student\.norm"):
        build(NUM_CLASSES, norm="bn")


def test_check_compatible_names_the_difference(teacher: FreezableRetinaNet) -> None:
    student = build_student(CFG, NUM_CLASSES)
    check_compatible(teacher, student)
    build = STUDENTS["retinanet_mobilenet_v3_small_fpn"]
    other_sizes = build(NUM_CLASSES, anchors=AnchorConfig(sizes=(32, 64, 128, 256, 512)))
    with pytest.raises(ValueError, match="anchor sizes"):
        check_compatible(student, other_sizes)
    two_ratios = build(NUM_CLASSES, anchors=AnchorConfig(aspect_ratios=(0.5, 1.0)))
    with pytest.raises(ValueError, match="anchors per location"):
        check_compatible(student, two_ratios)
    with pytest.raises(ValueError, match="classes"):
        check_compatible(student, build(NUM_CLASSES + 1))


# --------------------------------------------------------------------------------------------
# Frozen teacher
# --------------------------------------------------------------------------------------------


def test_teacher_stays_in_eval_mode_under_parent_train(teacher_v2: FreezableRetinaNet) -> None:
    parent = nn.Module()
    parent.t = teacher_v2
    parent.s = build_student(CFG, NUM_CLASSES)
    parent.train()
    assert all(not m.training for m in teacher_v2.modules())
    assert all(m.training for m in parent.s.modules())
    assert not any(p.requires_grad for p in teacher_v2.parameters())


def test_teacher_untouched_by_student_training(teacher_v2: FreezableRetinaNet) -> None:
    # v2's backbone BatchNorm is trainable in torchvision: the case that matters.
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher_v2.backbone.body.modules())
    before = {k: v.clone() for k, v in teacher_v2.state_dict().items()}
    student = build_student(CFG, NUM_CLASSES)
    parent = nn.ModuleDict({"teacher": teacher_v2, "student": student})
    parent.train()
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    transform = build_transform(CFG)
    for step in range(3):
        images, targets = images_and_targets([(64, 64), (48, 64)], seed=step)
        image_list, targets = transform(images, targets)
        t = dense_forward(teacher_v2, image_list)  # deliberately without no_grad
        s = dense_forward(student, image_list)
        losses = detection_loss(student, s, targets)
        kd = (s.cls_logits - t.cls_logits).pow(2).mean() + (
            s.bbox_regression - t.bbox_regression
        ).abs().mean()
        optimizer.zero_grad()
        (sum(losses.values()) + kd).backward()
        optimizer.step()
    assert all(p.grad is None for p in teacher_v2.parameters())
    assert state_equal(before, teacher_v2.state_dict())
    assert not state_equal(student_before, student.state_dict())


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def test_trainable_teacher_checkpoint_loads_into_frozen_build(coco_like_checkpoint) -> None:
    path, state = coco_like_checkpoint
    assert load_state_dict_file(path).keys() == state.keys()
    frozen = build_teacher(replace(CFG, **{"teacher.weights": str(path)}), 91)
    assert state_equal(state, frozen.state_dict())  # same keys, same tensors, BN buffers too
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_zero_init_residual_starts_blocks_as_identity(coco_like_checkpoint) -> None:
    from torchvision.models.resnet import Bottleneck

    def last_bn_scales(model: nn.Module) -> list[Tensor]:
        return [m.bn3.weight for m in model.backbone.body.modules() if isinstance(m, Bottleneck)]

    cfg = replace(CFG, **{"teacher.zero_init_residual": True})
    scales = last_bn_scales(build_teacher(cfg, NUM_CLASSES, frozen=False))
    assert len(scales) == 16 and all(bool((w == 0).all()) for w in scales)  # 3+4+6+3 blocks
    assert all(bool((w == 1).all()) for w in last_bn_scales(build_teacher(CFG, NUM_CLASSES)))
    # an init choice only: loaded weights are never overwritten
    path, state = coco_like_checkpoint
    loaded = build_teacher(replace(cfg, **{"teacher.weights": str(path)}), 91)
    assert state_equal(state, loaded.state_dict())


def test_class_count_change_keeps_every_other_weight(coco_like_checkpoint, caplog) -> None:
    path, state = coco_like_checkpoint
    cfg = replace(CFG, **{"teacher.weights": str(path)})
    with caplog.at_level(logging.WARNING, logger="distill.models"):
        model = build_teacher(cfg, NUM_CLASSES, frozen=False)
    assert "91 classes" in caplog.text and "cls_logits" in caplog.text
    loaded = model.state_dict()
    assert state_equal(state, loaded, skip=CLS_LOGITS_KEYS)
    assert loaded[CLS_LOGITS_KEYS[0]].shape == (9 * NUM_CLASSES, 256, 3, 3)
    torch.testing.assert_close(
        loaded[CLS_LOGITS_KEYS[1]], torch.full((9 * NUM_CLASSES,), -math.log(99.0))
    )
    # Trainable from pretrained weights: backbone BatchNorm and conv1/layer1 stay fixed.
    model.train()
    body = model.backbone.body
    assert model.training and not body.bn1.training and body.layer3.training
    assert not body.conv1.weight.requires_grad and not body.layer2[0].bn1.weight.requires_grad
    assert (
        body.layer2[0].conv1.weight.requires_grad
        and model.head.regression_head.bbox_reg.weight.requires_grad
    )


def test_mismatched_checkpoint_lists_the_mismatches(coco_like_checkpoint, tmp_path) -> None:
    _, state = coco_like_checkpoint
    bad = dict(state)
    dropped = [k for k in bad if k.startswith("backbone.fpn.layer_blocks")]
    for k in dropped:
        del bad[k]
    bad["head.extra.weight"] = torch.zeros(1)
    bad["backbone.body.conv1.weight"] = torch.zeros(64, 3, 5, 5)
    path = tmp_path / "bad.pt"
    save_state_dict_file(bad, path)
    with pytest.raises(WeightsMismatchError) as info:
        build_teacher(replace(CFG, **{"teacher.weights": str(path)}), 91)
    message = str(info.value)
    assert str(path) in message
    assert f"missing in the weights ({len(dropped)})" in message and dropped[0] in message
    assert "unexpected in the weights (1): head.extra.weight" in message
    assert "backbone.body.conv1.weight [64, 3, 5, 5] vs model [64, 3, 7, 7]" in message


def test_weights_names_and_paths(tmp_path) -> None:
    enum = RetinaNet_ResNet50_FPN_Weights
    assert resolve_weights("COCO_V1", enum, "teacher") is enum.COCO_V1
    assert resolve_weights("DEFAULT", enum, "teacher") is enum.COCO_V1
    assert resolve_weights("RetinaNet_ResNet50_FPN_Weights.COCO_V1", enum, "t") is enum.COCO_V1
    (tmp_path / "t.pt").touch()
    assert resolve_weights(str(tmp_path / "t.pt"), enum, "teacher") == tmp_path / "t.pt"
    missing = str(tmp_path / "runs" / "teacher.pt")
    with pytest.raises(FileNotFoundError, match="COCO_V1") as info:
        build_teacher(replace(CFG, **{"teacher.weights": missing}), NUM_CLASSES)
    assert missing in str(info.value)


def test_student_backbone_weights_from_a_local_file(tmp_path) -> None:
    classifier = mobilenet_v3_small()
    path = tmp_path / "mnv3s.pt"
    save_state_dict_file(classifier.state_dict(), path)
    model = STUDENTS["retinanet_mobilenet_v3_small_fpn"](NUM_CLASSES, backbone_weights=str(path))
    body = model.backbone.body.state_dict()
    features = classifier.features.state_dict()
    assert body.keys() == features.keys()
    assert all(torch.equal(body[k], features[k]) for k in body)
    model.train()
    assert not any(
        m.training for m in model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert model.backbone.fpn.training


def test_weights_files_round_trip_and_refusals(tmp_path) -> None:
    state = {"a": torch.arange(3.0), "b.c": torch.ones(2, 2, dtype=torch.int64)}
    path = tmp_path / "deep" / "dir" / "w.pt"
    save_state_dict_file(state, path)
    assert state_equal(load_state_dict_file(path), state)
    assert [p.name for p in path.parent.iterdir()] == ["w.pt"]  # no temporary left behind
    assert state_equal(torch.load(path, weights_only=True), state)

    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_state_dict_file(tmp_path / "nope.pt")
    pickled = tmp_path / "pickled.pt"
    torch.save({"a": torch.zeros(1), "evil": _NotATensor()}, pickled)
    with pytest.raises(ValueError, match=r"pickled\.pt.*other than tensors"):
        load_state_dict_file(pickled)
    nested = tmp_path / "nested.pt"
    torch.save({"model": state, "epoch": 3}, nested)
    with pytest.raises(ValueError, match=r"nested\.pt.*'model'"):
        load_state_dict_file(nested)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"truncated\.pt"):
        load_state_dict_file(truncated)
    with pytest.raises(ValueError, match="not a Tensor"):
        save_state_dict_file({"x": 3}, tmp_path / "x.pt")  # type: ignore[dict-item]


class _NotATensor:
    pass


# --------------------------------------------------------------------------------------------
# The split forward is torchvision's RetinaNet
# --------------------------------------------------------------------------------------------


def test_plain_student_is_torchvision_retinanet() -> None:
    torch.manual_seed(0)
    model = build_student(CFG, NUM_CLASSES)
    sizes = [(64, 80), (72, 64)]
    images, targets = images_and_targets(sizes)
    transform = build_transform(CFG)  # fresh: in training mode, as a shared transform will be

    model.train()
    expected = model(images, [dict(t) for t in targets])
    image_list, resized_targets = transform(images, [dict(t) for t in targets])
    losses = detection_loss(model, dense_forward(model, image_list), resized_targets)
    assert losses.keys() == expected.keys() == {"classification", "bbox_regression"}
    for k in losses:
        torch.testing.assert_close(losses[k], expected[k], rtol=0, atol=0)
        assert losses[k].item() > 0

    model.eval()
    model.score_thresh = 0.005  # random weights score around the 0.01 prior
    model.detections_per_img = 40
    expected_dets = model(images)
    image_list, _ = transform(images)
    dets = postprocess(model, transform, dense_forward(model, image_list), image_list, sizes)
    assert transform.training  # restored after postprocess
    for got, want, (h, w) in zip(dets, expected_dets, sizes):
        assert 0 < len(got["boxes"]) <= 40
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        assert got["boxes"][:, 2].max() <= w and got["boxes"][:, 3].max() <= h  # original frame


def test_losses_and_anchors_stay_float32_under_autocast() -> None:
    model = build_student(CFG, NUM_CLASSES).train()
    images, targets = images_and_targets([(64, 64), (64, 48)])
    image_list, targets = build_transform(CFG)(images, targets)
    reference = dense_forward(model, image_list).anchors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense_forward(model, image_list)
        losses = detection_loss(model, out, targets)
    assert out.cls_logits.dtype == torch.bfloat16
    assert all(torch.equal(a, r) for a, r in zip(out.anchors, reference))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------------------------------
# distill summary
# --------------------------------------------------------------------------------------------


def test_summary_command_counts_the_default_models(tmp_path, caplog, capsys, monkeypatch) -> None:
    """``distill summary CONFIG --json`` on the default models (128 px, 3 classes): FLOPs and
    parameters as torchvision's own models give them; without --json, the table."""
    (tmp_path / "train.json").write_text(json.dumps({"categories": [{"id": i} for i in range(3)]}))
    config = tmp_path / "summary.yaml"  # every other key at its default
    config.write_text(f"data: {{root: {tmp_path}}}\n")
    weights = f"teacher.weights={tmp_path / 'not-yet' / 'teacher.pt'}"
    assert load_config(config).student == Config().student
    with caplog.at_level(logging.WARNING, logger="distill.models"):
        # a GPU training setting does not stop a summary on a CPU (issue 35)
        fp16 = ["--set", "train.mixed_precision=fp16"]
        assert main(["summary", str(config), "--set", weights, *fp16, "--json"]) == 0
    assert "not-yet" in caplog.text  # a warning, not an error
    result = json.loads(capsys.readouterr().out)
    assert result["num_classes"] == 4 and result["image_size"] == 128
    for name in ("teacher", "student"):
        assert isinstance(result[name]["params"], int)
        assert result[name]["latency_ms"] > 0
    # the teacher: torchvision's own RetinaNet R50-FPN (v1, the default arch), built apart
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4).eval()
    image = torch.rand(1, 3, 128, 128)
    flops = count_flops(lambda: reference.head(list(reference.backbone(image).values())))
    assert result["teacher"]["gflops"] == pytest.approx(flops / 1e9, rel=1e-9)
    assert result["teacher"]["params"] == sum(p.numel() for p in reference.parameters())
    # the student: torchvision's MobileNetV3-Large features counted the same way, plus its
    # FPN (128 channels) and 2-conv head (9 anchors, 4 classes) by hand: a KxK conv costs
    # 2 Cin Cout K^2 H W FLOPs. At 128 px, C3/C4/C5 (40/112/960 ch) are 16/8/4 px, P6 2, P7 1.
    features = mobilenet_v3_large(weights=None).features.eval()
    c, pixels = 128, [16 * 16, 8 * 8, 4 * 4, 2 * 2, 1 * 1]
    fpn = 2 * c * (40 * 256 + 112 * 64 + 960 * 16) + 2 * 9 * c * c * sum(pixels)  # P3-P7 3x3
    # 2 + 2 tower convs, then 9 anchors x (4 class logits + 4 box deltas) output convs
    head = (2 + 2) * 2 * 9 * c * c * sum(pixels) + 2 * 9 * c * 9 * (4 + 4) * sum(pixels)
    student = count_flops(lambda: features(image)) + fpn + head
    assert result["student"]["gflops"] == pytest.approx(student / 1e9, rel=1e-9)
    assert result["ratio"]["gflops"] <= 1 / 5
    assert result["ratio"]["params"] == result["student"]["params"] / result["teacher"]["params"]
    # the table: the same result, formatted (summarize is not run again)
    monkeypatch.setattr(summary_module, "summarize", lambda cfg, **options: result)
    assert main(["summary", str(config), "--no-deploy", "--set", weights]) == 0
    table = capsys.readouterr().out
    assert table == format_deployed(result) + "\n"  # the deployment table too, where it ran
    assert table.startswith(format_summary(result))
    assert f"{result['teacher']['gflops']:.2f}" in table.splitlines()[1]
    assert table.splitlines()[3].startswith("student/teacher")


def count_flops(forward: Callable[[], object]) -> int:
    """FLOPs of ``forward()`` under torch's FlopCounterMode (a multiply-add is 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return int(counter.get_total_flops())


def test_summary_class_count_without_annotations(tmp_path, caplog) -> None:
    cfg = replace(Config(), **{"data.root": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="distill.models"):
        assert _num_classes(cfg) == DEFAULT_NUM_CLASSES
    assert "DEFAULT_NUM_CLASSES" in caplog.text
