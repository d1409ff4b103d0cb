"""CrossKD and MGD: their formulas on small tensors, the cross-head path against the teacher's
own head, MGD's masks, and both in training (alone, combined, in lockstep)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import box_iou

from distill.config import DistillConfig, load_config, replace
from distill.engine.checkpoint import state_digest
from distill.engine.loop import train, train_group
from distill.engine.trainable import TrainableModule
from distill.kd import Batch, combine, distill_terms, kd_terms, kd_weights
from distill.kd.crosshead import CrossHead, align_scale, channel_stats, held_tower_outputs
from distill.kd.features.mgd import mgd_mask
from distill.losses import crosskd_box_loss, kd_quality_focal_loss, match_anchors, mgd_loss
from distill.models.retinanet import DenseOutputs
from distill.models.weights import load_state_dict_file
from tests.conftest import REPO
from tests.test_gpu_path import QUIET_EVAL, assert_same_weights

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
SIZES = ((8, 8), (4, 4), (2, 2))  # three small FPN levels


def small_head(channels: int = 16, num_classes: int = 3) -> RetinaNetHead:
    torch.manual_seed(0)
    head = RetinaNetHead(channels, 2, num_classes, norm_layer=partial(nn.GroupNorm, 4))
    for param in head.parameters():  # a trained head's outputs are not all near the prior
        nn.init.normal_(param, std=0.2)
    return head.eval().requires_grad_(False)


def features(channels: int = 16, batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=gen) for h, w in SIZES]


@pytest.mark.parametrize("layer", [0, 1, 4])
def test_the_cross_head_on_the_teachers_own_features_is_the_teacher_head(layer: int) -> None:
    """Handing the teacher's own tower features at ``layer`` to the cross head (same width: no
    mapper; the alignment to their own statistics is the identity) gives the teacher head's
    outputs, anchor for anchor."""
    head, fpn = small_head(), features()
    with held_tower_outputs(head, layer) as held:
        expected = head(fpn)
    if layer == 0:
        held = {"cls": fpn, "reg": fpn}
    assert len(held["cls"]) == len(held["reg"]) == len(SIZES)
    stats = {b: torch.stack([channel_stats(x) for x in held[b]]) for b in ("cls", "reg")}
    cross = CrossHead(head, 16, layer, layer)
    assert len(cross.mappers) == 0 and not list(cross.parameters())  # the teacher's not in it
    out = cross(held, stats)
    torch.testing.assert_close(out["cls"], expected["cls_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["reg"], expected["bbox_regression"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer", [1, 2])
def test_the_held_tower_output_is_the_blocks_output_before_its_relu(layer: int) -> None:
    """As the reference's ``conv(x, activate=False)``: conv then norm of the block's input, by
    hand, negative values kept (a hold of the in-place ReLU's input without a copy would have
    none); the head's own outputs are unchanged by the hold."""
    head, fpn = small_head(), features()
    with held_tower_outputs(head, layer) as held:
        out = head(fpn)
    plain = head(fpn)
    torch.testing.assert_close(out["cls_logits"], plain["cls_logits"], atol=0, rtol=0)
    for name, branch in (("cls", head.classification_head), ("reg", head.regression_head)):
        assert len(held[name]) == len(SIZES)
        for x, kept in zip(fpn, held[name]):
            for block in branch.conv[: layer - 1]:
                x = block(x)
            conv, norm, relu = branch.conv[layer - 1]
            assert isinstance(relu, nn.ReLU)
            by_hand = norm(conv(x))
            torch.testing.assert_close(kept, by_hand)
            assert (kept < 0).any()
            torch.testing.assert_close(torch.relu(kept), branch.conv[layer - 1](x))


def test_a_gradient_reaches_the_students_tower_through_the_hold() -> None:
    """The hold is a copy within the graph: the cross-head loss reaches the student's tower
    convs up to the hand-over, with the gradient of the same path written out by hand (conv,
    norm, no ReLU), and nothing after the hand-over."""
    teacher, student = small_head(16), small_head(8).requires_grad_(True)
    cross = CrossHead(teacher, 8, layer=2, teacher_layer=2)
    fpn = features(8)
    with held_tower_outputs(teacher, 2) as t_held:
        teacher(features(16, seed=2))
    stats = {b: torch.stack([channel_stats(x) for x in t_held[b]]) for b in ("cls", "reg")}
    with held_tower_outputs(student, 2) as held:
        student(fpn)
    out = cross(held, stats)
    loss = (out["cls"] ** 2).sum() + (out["reg"] ** 2).sum()
    params = [b.conv[i][0].weight for b in (student.classification_head,
              student.regression_head) for i in (0, 1)]  # fmt: skip
    grads = torch.autograd.grad(loss, params)
    assert all(g.abs().sum() > 0 for g in grads)
    by_hand = {}
    for name, branch in (("cls", student.classification_head), ("reg", student.regression_head)):
        conv, norm, _ = branch.conv[1]
        by_hand[name] = [norm(conv(branch.conv[0](x))) for x in fpn]
    out = cross(by_hand, stats)
    expected = torch.autograd.grad((out["cls"] ** 2).sum() + (out["reg"] ** 2).sum(), params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    branch = student.classification_head
    later = [branch.conv[2][0].weight, branch.cls_logits.weight]  # after the hand-over
    assert torch.autograd.grad(loss, later, allow_unused=True) == (None, None)


def test_a_tower_block_without_a_final_relu_is_refused() -> None:
    head = small_head()
    conv, norm, _ = head.regression_head.conv[1]
    head.regression_head.conv[1] = nn.Sequential(conv, norm)
    refused = pytest.raises(ValueError, match=r"before its activation.*ending with GroupNorm")
    with refused, held_tower_outputs(head, 2):
        pass
    assert not head.classification_head.conv[1][2]._forward_pre_hooks  # nothing left behind
    with held_tower_outputs(head, 1) as held:  # the blocks before it are fine
        head(features())
    assert len(held["reg"]) == len(SIZES)


def test_a_narrower_student_is_mapped_and_only_the_student_side_learns() -> None:
    teacher = small_head(16)
    cross = CrossHead(teacher, 8, layer=1, teacher_layer=3)
    assert {name: tuple(m.weight.shape) for name, m in cross.mappers.items()} == {
        "cls": (16, 8, 1, 1),
        "reg": (16, 8, 1, 1),
    }
    student = [x.requires_grad_(True) for x in features(8)]
    with held_tower_outputs(teacher, 3) as held:
        teacher(features(16, seed=2))
    stats = {b: torch.stack([channel_stats(x) for x in held[b]]) for b in ("cls", "reg")}
    out = cross({"cls": student, "reg": student}, stats)
    cls_logits, bbox_regression = out["cls"], out["reg"]
    assert cls_logits.shape == (2, sum(h * w for h, w in SIZES) * 2, 3)
    assert bbox_regression.shape == (2, cls_logits.shape[1], 4)
    (cls_logits.sum() + bbox_regression.sum()).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in student)
    assert all(m.weight.grad is not None for m in cross.mappers.values())
    # a branch whose loss is off has no mapper (DDP would wait for its gradient) and no output
    cls_only = CrossHead(teacher, 8, layer=1, teacher_layer=3, branches=["cls"])
    assert list(cls_only.mappers) == ["cls"]
    assert list(cls_only({"cls": student}, stats)) == ["cls"]


def test_the_cross_head_aligns_rectifies_and_runs_the_teachers_remaining_layers() -> None:
    """On features with negative values (where the ReLU matters): mapper, alignment, ReLU, the
    teacher's blocks from ``teacher_layer`` on, its output convs, in torchvision's layout."""
    teacher = small_head(16)
    cross = CrossHead(teacher, 8, layer=1, teacher_layer=2, branches=["cls"])
    student = features(8)
    stats = torch.stack([torch.stack([torch.full((16,), -0.5), torch.ones(16)])] * len(SIZES))
    out = cross({"cls": student}, {"cls": stats})["cls"]
    branch = teacher.classification_head
    expected = []
    for x, level_stats in zip(student, stats):
        x = torch.relu(align_scale(cross.mappers["cls"](x), level_stats))
        logits = branch.cls_logits(branch.conv[3](branch.conv[2](x)))  # (N, A*K, H, W)
        n, _, h, w = logits.shape
        expected.append(logits.view(n, 2, 3, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 3))
    torch.testing.assert_close(out, torch.cat(expected, dim=1))
    unrectified = torch.relu(align_scale(cross.mappers["cls"](student[0]), stats[0]))
    assert not torch.equal(unrectified, align_scale(cross.mappers["cls"](student[0]), stats[0]))


def test_channel_statistics_of_a_single_position_are_finite() -> None:
    """Batch 1 and a 1x1 level (P7 of a 128-px image): std 0, not NaN."""
    x = torch.randn(1, 4, 1, 1)
    assert torch.isfinite(channel_stats(x)).all()
    assert torch.isfinite(align_scale(x, channel_stats(torch.randn(2, 4, 3, 3)))).all()


def test_align_scale_gives_the_teachers_channel_statistics() -> None:
    s = torch.randn(3, 4, 5, 5) * 7 + 2
    t_stats = torch.tensor([[0.0, 1.0, -2.0, 5.0], [1.0, 0.5, 3.0, 0.1]])
    aligned = align_scale(s, t_stats)
    torch.testing.assert_close(channel_stats(aligned), t_stats, atol=1e-4, rtol=1e-4)


def test_kd_quality_focal_loss_is_the_papers_formula() -> None:
    s = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])  # (N=1, A=2, K=2)
    t = torch.tensor([[[1.5, -3.0], [2.0, 1.0]]])
    p_s, p_t = torch.sigmoid(s), torch.sigmoid(t)
    bce = -(p_t * torch.log(p_s) + (1 - p_t) * torch.log(1 - p_s))
    every = torch.ones(1, 2)
    for beta in (1.0, 2.0):
        expected = (bce * (p_s - p_t).abs() ** beta).sum() / 3.0
        loss = kd_quality_focal_loss(s, t, beta, every, torch.tensor(3.0))
        torch.testing.assert_close(loss, expected)
    assert kd_quality_focal_loss(t, t, 1.0, every, torch.tensor(3.0)) == 0  # same probabilities
    # no foreground: divided by 1, not by 0
    torch.testing.assert_close(
        kd_quality_focal_loss(s, t, 1.0, every, torch.tensor(0.0)),
        kd_quality_focal_loss(s, t, 1.0, every, torch.tensor(1.0)),
    )
    # an anchor left out (valid 0) adds nothing: the first anchor's share alone
    first = (bce * (p_s - p_t).abs())[0, 0].sum() / 3.0
    loss = kd_quality_focal_loss(s, t, 1.0, torch.tensor([[1.0, 0.0]]), torch.tensor(3.0))
    torch.testing.assert_close(loss, first)
    with pytest.raises(ValueError, match="anchor weights"):
        kd_quality_focal_loss(s, t, 1.0, torch.ones(2), torch.tensor(3.0))


def test_crosskd_box_loss_weights_giou_by_the_teachers_score() -> None:
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])]
    teacher_deltas = torch.zeros(1, 2, 4)
    cross = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]])  # 2nd: 10 px right
    t_logits = torch.tensor([[[0.0, -4.0], [2.0, 1.0]]])  # max probabilities 0.5, sigmoid(2)
    # the second pair: box [30, 20, 50, 40] vs [20, 20, 40, 40]: IoU 200/600, hull = union
    giou = 200 / 600
    expected = torch.sigmoid(torch.tensor(2.0)) * (1 - giou) / 2.0
    every, two = torch.ones(1, 2), torch.tensor(2.0)
    loss = crosskd_box_loss(cross, teacher_deltas, anchors, t_logits, every, two)
    torch.testing.assert_close(loss, expected)
    assert crosskd_box_loss(teacher_deltas, teacher_deltas, anchors, t_logits, every, two) == 0
    # the second anchor left out: nothing is left (the first pair agrees)
    none = torch.tensor([[1.0, 0.0]])
    assert crosskd_box_loss(cross, teacher_deltas, anchors, t_logits, none, two) == 0
    with pytest.raises(ValueError, match="anchor mask"):
        crosskd_box_loss(cross, teacher_deltas, anchors, t_logits, torch.ones(2, 1), two)


def test_match_anchors_counts_foreground_as_the_references_avg_factor() -> None:
    """RetinaNet's matcher: the foreground anchors, at least 1 per image (mmdet's
    ``SamplingResult.num_pos``, summed into ``avg_factor``); an image without boxes counts 1
    and all its anchors take part."""
    anchors = [torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30], [0, 0, 10, 40]])]
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    foreground, valid = match_anchors(anchors, boxes)
    assert foreground == 2  # IoU 1 and 0.95; 0 and 0.25 are background
    assert foreground.dtype == torch.float32 and foreground.shape == ()
    assert torch.equal(valid, torch.ones(1, 4))  # no anchor in the ignore zone
    foreground, valid = match_anchors(anchors, [torch.zeros(0, 4)])
    assert foreground == 1 and torch.equal(valid, torch.ones(1, 4))
    foreground, valid = match_anchors(anchors * 2, [boxes[0], torch.zeros(0, 4)])
    assert foreground == 3 and valid.shape == (2, 4)


def _qfl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The quality focal KD of one anchor at beta 1, written out: (K,) logits -> scalar."""
    p_s, p_t = torch.sigmoid(s), torch.sigmoid(t)
    return (-(p_t * torch.log(p_s) + (1 - p_t) * torch.log(1 - p_s)) * (p_s - p_t).abs()).sum()


def test_an_anchor_in_the_ignore_zone_takes_no_part_in_either_crosskd_term() -> None:
    """One box, three anchors: IoU 1 (foreground), 0.45 (the matcher's ignore zone), 0.225
    (background). Both CrossKD terms of ``distill_terms`` are the foreground's and the
    background's shares over the normaliser, the ignore-zone anchor's none (as mmdet's
    label weight 0 in the reference), with the normaliser averaged over processes."""
    box = torch.tensor([[0.0, 0.0, 9.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 9.0, 10.0], [0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 40.0]])
    torch.testing.assert_close(box_iou(box, anchors), torch.tensor([[1.0, 0.45, 0.225]]))
    foreground, valid = match_anchors([anchors], [box])
    assert foreground == 1 and torch.equal(valid, torch.tensor([[1.0, 0.0, 1.0]]))

    t_logits = torch.tensor([[[2.0, -1.0], [1.0, 0.5], [-0.5, -3.0]]])  # (N=1, A=3, K=2)
    s_logits = torch.tensor([[[0.0, 1.0], [-2.0, 2.0], [1.0, -1.0]]], requires_grad=True)
    t_deltas = torch.zeros(1, 3, 4)
    # shifted right by half / a quarter of the anchor's width: GIoU 1/3 and 0.6 (hull = union)
    s_deltas = torch.tensor([[[0.5, 0, 0, 0], [0.5, 0, 0, 0], [0.25, 0, 0, 0]]], requires_grad=True)
    one_minus_giou = torch.tensor([2 / 3, 2 / 3, 0.4])
    conf = torch.sigmoid(t_logits).amax(dim=-1)[0]  # (A,)

    def outputs(cls: torch.Tensor, deltas: torch.Tensor, extras: bool) -> DenseOutputs:
        crosskd = {"crosskd/cls_logits": cls, "crosskd/bbox_regression": deltas}
        return DenseOutputs({}, cls, deltas, [anchors], [3], extras=crosskd if extras else {})

    cfg = replace(DistillConfig(), **{"crosskd.cls_weight": 1.0, "crosskd.box_weight": 1.0,
                                      "crosskd.beta": 1.0, "crosskd.layer": 0})  # fmt: skip
    other_process = 3.0  # another process's foreground: the normaliser is (1 + 3) / 2
    batch = Batch([{"boxes": box, "labels": torch.tensor([1])}], (40, 40),
                  lambda x: (x + other_process) / 2)  # fmt: skip
    terms = distill_terms(
        kd_terms(cfg), outputs(s_logits, s_deltas, True), outputs(t_logits, t_deltas, False), batch
    )
    shares = [_qfl(s_logits[0, a], t_logits[0, a]) for a in range(3)]
    assert all(share > 0.05 for share in shares)  # each anchor would add to the term
    torch.testing.assert_close(terms["crosskd_cls"], (shares[0] + shares[2]) / 2)
    box_shares = conf * one_minus_giou
    torch.testing.assert_close(terms["crosskd_box"], (box_shares[0] + box_shares[2]) / 2)
    # the ignore-zone anchor gets no gradient; the other two do
    terms["crosskd_cls"].backward(retain_graph=True)
    terms["crosskd_box"].backward()
    for grad in (s_logits.grad, s_deltas.grad):
        assert grad is not None
        assert grad[0, 1].abs().sum() == 0
        assert grad[0, 0].abs().sum() > 0 and grad[0, 2].abs().sum() > 0


def test_mgd_masks_the_ratio_of_positions_and_repeats_with_its_seed() -> None:
    shape = (4, 3, 64, 64)
    mask = mgd_mask(shape, 0.65, torch.Generator().manual_seed(0))
    assert mask.shape == (4, 1, 64, 64) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs((1 - mask.mean().item()) - 0.65) < 0.01  # the masked share
    assert torch.equal(mask, mgd_mask(shape, 0.65, torch.Generator().manual_seed(0)))
    assert not torch.equal(mask, mgd_mask(shape, 0.65, torch.Generator().manual_seed(1)))
    assert mgd_mask(shape, 0.0, torch.Generator().manual_seed(0)).min() == 1  # nothing masked
    with pytest.raises(ValueError, match="ratio"):
        mgd_mask(shape, 1.0)


def test_mgd_loss_is_zero_when_the_generator_reproduces_the_teacher() -> None:
    t = torch.randn(2, 4, 3, 3)
    assert mgd_loss(t.clone(), t) == 0
    g = t + 0.5
    torch.testing.assert_close(mgd_loss(g, t), torch.tensor(0.25 * t.numel() / 2))  # sum / N


def test_the_student_modules_masks_change_each_step_and_a_checkpoint_keeps_their_stream() -> None:
    cfg = load_config(SMOKE, ["distill.feature.kind=mgd", "distill.feature.mgd.weight=1"])
    from distill.engine.build import build_models

    module, _ = build_models(cfg, "student", 9)
    module.train()
    images = torch.rand(2, 3, 64, 64)
    first = module(images, [(64, 64)] * 2).extras["mgd/p3"]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    second = module(images, [(64, 64)] * 2).extras["mgd/p3"]
    assert not torch.equal(first, second)  # a new mask each training forward
    again, _ = build_models(cfg, "student", 9)
    again.train()
    again.load_state_dict(state)  # as a resumed run: the counter comes with the weights
    torch.testing.assert_close(again(images, [(64, 64)] * 2).extras["mgd/p3"], second)


def smoke(tmp: Path, name: str, extra: list[str]) -> list[str]:
    return [f"data.root={tmp}", "train.max_steps=2", "train.epochs=1", "data.max_val_images=2",
            *QUIET_EVAL, *extra]  # fmt: skip


MGD = ["distill.feature.kind=mgd", "distill.feature.mgd.weight=0.01"]
CROSSKD = ["distill.crosskd.cls_weight=1", "distill.crosskd.box_weight=1",
           "distill.crosskd.layer=1", "distill.crosskd.teacher_layer=3"]  # fmt: skip


def test_mgd_and_crosskd_train_in_lockstep_as_alone_and_leave_no_blocks_in_student_pt(
    shapes_root: Path, tmp_path: Path
) -> None:
    """Two trainees on one teacher forward (MGD; CrossKD with CWD and the soft labels) end with
    the weights of separate runs, bitwise; their KD blocks (generators, mappers) train with
    them but ``student.pt`` holds the detector alone."""
    points = {"mgd": [*MGD, "distill.logit.weight=0", "distill.box.weight=0"], "crosskd": CROSSKD}
    cfgs = [
        load_config(SMOKE, [*smoke(shapes_root, n, x), f"output.dir={tmp_path / 'group' / n}"])
        for n, x in points.items()
    ]
    results = train_group(cfgs, "student", tmp_path / "group")
    assert all(r["step"] == 2 for r in results)
    plain_keys = None
    for name, extra in points.items():
        alone = tmp_path / "alone" / name
        train(load_config(SMOKE, [*smoke(shapes_root, name, extra), f"output.dir={alone}"]))
        assert_same_weights(tmp_path / "group" / name / "student.pt", alone / "student.pt")
        keys = set(load_state_dict_file(alone / "student.pt"))
        assert plain_keys is None or keys == plain_keys
        plain_keys = keys
        assert not [k for k in keys if "generator" in k or "mapper" in k or "adapter" in k]


def test_the_kd_terms_of_a_crosskd_step_are_finite_and_reach_the_student(shapes_root: Path) -> None:
    from distill.engine.build import build_models
    from distill.engine.step import teacher_forward
    from distill.models.retinanet import build_transform

    cfg = load_config(SMOKE, [f"data.root={shapes_root}", *MGD, *CROSSKD])
    module, teacher = build_models(cfg, "student", 9)
    assert teacher is not None and isinstance(module, TrainableModule)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    image_list, targets = build_transform(cfg)(images, targets)
    from accelerate import Accelerator

    teacher_out = teacher_forward(Accelerator(cpu=True), teacher, image_list, [module.terms])
    assert teacher_out.extras["crosskd/cls/3"].shape == (5, 2, 256)
    # statistics of the features before the ReLU: some channel means are negative
    assert all((teacher_out.extras[f"crosskd/{b}/3"][:, 0] < 0).any() for b in ("cls", "reg"))
    out = module(image_list.tensors, image_list.image_sizes, teacher_out)
    terms = distill_terms(module.terms, out, teacher_out, Batch(targets, (64, 64)))
    assert set(terms) == {"feature", "logit", "box", "crosskd_cls", "crosskd_box"}
    assert all(torch.isfinite(v) for v in terms.values())
    # (a random teacher is nowhere sure enough for the box term's 0.3 threshold: that one is 0)
    assert all(terms[name] > 0 for name in ("feature", "logit", "crosskd_cls", "crosskd_box"))
    # wired as specified: per foreground anchor, without the ignore zone (MGD further down)
    foreground, valid = match_anchors(out.anchors, [t["boxes"] for t in targets])
    assert foreground >= 2 and 0 < valid.sum() < valid.numel()
    cross_cls = out.extras["crosskd/cls_logits"]
    expected = kd_quality_focal_loss(cross_cls, teacher_out.cls_logits, 1.0, valid, foreground)
    torch.testing.assert_close(terms["crosskd_cls"], expected)
    cross_box = out.extras["crosskd/bbox_regression"]
    expected = crosskd_box_loss(
        cross_box,
        teacher_out.bbox_regression,
        out.anchors,
        teacher_out.cls_logits,
        valid,
        foreground,
    )
    torch.testing.assert_close(terms["crosskd_box"], expected)
    levels = cfg.distill.feature.levels
    generated = sum(mgd_loss(out.extras[f"mgd/{lv}"], teacher_out.features[lv]) for lv in levels)
    torch.testing.assert_close(terms["feature"], generated)
    # the cross-head path reaches the student's own tower through the teacher's head
    (terms["crosskd_cls"] + terms["crosskd_box"]).backward(retain_graph=True)
    head = module.detector.head.classification_head.conv[0][0].weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    # DDP (find_unused_parameters off) needs a gradient for every trainable parameter
    module.zero_grad(set_to_none=True)
    weights = kd_weights(module.terms)
    total, _ = combine({"classification": out.cls_logits.sum() * 0}, terms, weights, 0.0)
    total.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    # the teacher's head is used, not owned: not trained, not changed by a step
    owned = {id(p) for p in module.parameters()}
    assert not any(id(p) in owned for p in teacher.parameters())
    before = state_digest(teacher)
    torch.optim.SGD(module.parameters(), lr=1.0).step()
    assert state_digest(teacher) == before


def test_a_crosskd_layer_beyond_a_head_is_a_config_error_naming_the_key() -> None:
    from distill.config import ConfigError
    from distill.engine.build import build_models

    for extra, key in (("distill.crosskd.layer=2", "layer 2"),
                       ("distill.crosskd.teacher_layer=5", "teacher_layer 5")):  # fmt: skip
        cfg = load_config(SMOKE, ["distill.crosskd.cls_weight=1", "distill.crosskd.layer=1", extra])
        with pytest.raises(ConfigError, match=f"distill.crosskd.{key} is beyond"):
            build_models(cfg, "student", 9)
