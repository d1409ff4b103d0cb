"""Distillation losses: hand-computed values, invariants, precision and wiring."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import ConfigError, DistillConfig, load_config, replace
from distill.kd import Batch, combine, distill_terms, kd_scale, kd_terms, kd_weights, needs_teacher
from distill.kd.feature import FeatureKD, build_adapters
from distill.kd.features.fgd import GlobalContextBlock, build_global_blocks
from distill.losses import (
    box_distill_loss,
    cwd_loss,
    fgd_attention_spread,
    fgd_loss,
    fgd_masks,
    mse_loss,
    pkd_loss,
    soft_label_loss,
    teacher_confidence,
)
from distill.models.retinanet import DenseOutputs


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def distill(**keys: object) -> DistillConfig:
    """A ``distill`` section with dotted keys set: ``distill(**{"logit.weight": 1.0})``."""
    return replace(DistillConfig(), **keys)


def feature_kd_loss(
    kind: str,
    student: dict[str, Tensor],
    teacher: dict[str, Tensor],
    levels: tuple[str, ...],
    *,
    tau: float | None = None,
    boxes_per_image: list[Tensor] | None = None,
    image_size: tuple[int, int] = (64, 64),
    global_s: dict[str, Tensor] | None = None,
    global_t: dict[str, Tensor] | None = None,
    reduction: str = "sum",
) -> Tensor:
    """The feature term's loss (``FeatureKD.losses``) of adapted student features vs the
    teacher's, with the kind's temperature ``tau`` (cwd, fgd) and FGD's global outputs."""
    keys: dict[str, object] = {
        "feature.kind": kind, f"feature.{kind}.weight": 1.0, "feature.levels": levels,
        "feature.level_reduction": reduction,
    }  # fmt: skip
    if tau is not None and kind in ("cwd", "fgd"):
        keys[f"feature.{kind}.tau"] = tau
    term = FeatureKD(distill(**keys).feature)
    n = next(iter(student.values())).shape[0]
    boxes = boxes_per_image if boxes_per_image is not None else [torch.zeros(0, 4)] * n
    extras = {f"global_s/{k}": v for k, v in (global_s or {}).items()}
    extras |= {f"global_t/{k}": v for k, v in (global_t or {}).items()}
    empty = torch.zeros(0)
    s = DenseOutputs({}, empty, empty, [], [], adapted=dict(student), extras=extras)
    t = DenseOutputs(dict(teacher), empty, empty, [], [])
    return term.losses(s, t, Batch([{"boxes": b} for b in boxes], image_size))["feature"]


def kd_of(student: DenseOutputs, teacher: DenseOutputs | None, cfg: DistillConfig) -> dict:
    """``distill_terms`` of the terms ``cfg`` turns on, on ``TARGETS`` in a 32 px batch."""
    return distill_terms(kd_terms(cfg), student, teacher, Batch(TARGETS, (32, 32)))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# Head logits
# --------------------------------------------------------------------------------------------


def test_bce_matches_binary_kl_by_hand() -> None:
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4) * 3
    temp = 2.0
    total = 0.0
    for n in range(2):
        for a in range(3):
            for k in range(4):
                q = sigmoid(s[n, a, k].item() / temp)
                p = sigmoid(t[n, a, k].item() / temp)
                total += temp**2 * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    expected = total / (2 * 3)  # sum over classes, mean over the N*A anchors
    loss = soft_label_loss(s, t, temp, "bce")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kl_matches_softmax_with_background_by_hand() -> None:
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4) * 3
    temp = 1.5
    total = 0.0
    for n in range(2):
        for a in range(3):
            ls = [x / temp for x in s[n, a].tolist()] + [0.0]  # implicit background logit
            lt = [x / temp for x in t[n, a].tolist()] + [0.0]
            zs, zt = sum(math.exp(x) for x in ls), sum(math.exp(x) for x in lt)
            q = [math.exp(x) / zs for x in ls]
            p = [math.exp(x) / zt for x in lt]
            total += temp**2 * sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    loss = soft_label_loss(s, t, temp, "kl")
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)


def test_weighted_reduction_by_hand() -> None:
    s, t = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    w = torch.tensor([[0.5, 0.0, 2.0]])
    per_anchor = []
    for a in range(3):
        v = 0.0
        for k in range(2):
            q, p = sigmoid(s[0, a, k].item()), sigmoid(t[0, a, k].item())
            v += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        per_anchor.append(v)
    expected = (0.5 * per_anchor[0] + 2.0 * per_anchor[2]) / 2.5
    assert soft_label_loss(s, t, 1.0, "bce", w).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["bce", "kl"])
def test_zero_weight_anchors_do_not_matter(kind: str) -> None:
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    w = torch.rand(2, 5)
    w[0, 1] = w[1, 3] = 0.0
    changed = s.clone()
    changed[0, 1] += 10.0
    changed[1, 3] -= 7.0
    before = soft_label_loss(s, t, 2.0, kind, w)
    after = soft_label_loss(changed, t, 2.0, kind, w)
    torch.testing.assert_close(before, after)
    # ...while an anchor with weight > 0 does matter
    changed[0, 0] += 3.0
    assert soft_label_loss(changed, t, 2.0, kind, w) > before
    zero = soft_label_loss(s, t, 2.0, kind, torch.zeros(2, 5))
    assert zero.item() == 0.0


@pytest.mark.parametrize("kind", ["bce", "kl"])
def test_soft_label_zero_when_student_equals_teacher(kind: str) -> None:
    x = torch.randn(2, 6, 3) * 10
    assert soft_label_loss(x.clone(), x, 4.0, kind).abs().item() < 1e-6
    assert soft_label_loss(x.clone(), x, 4.0, kind, teacher_confidence(x)).abs().item() < 1e-6
    assert soft_label_loss(torch.randn(2, 6, 3), x, 4.0, kind).item() > 1e-3


@pytest.mark.parametrize("temp", [0.5, 1.0, 4.0])
def test_bce_gradient(temp: float) -> None:
    s = torch.randn(2, 4, 3, requires_grad=True)
    t = torch.randn(2, 4, 3) * 4
    w = torch.rand(2, 4)
    soft_label_loss(s, t, temp, "bce", w).backward()
    expected = temp * (torch.sigmoid(s.detach() / temp) - torch.sigmoid(t / temp))
    expected = expected * w[..., None] / w.sum()
    assert s.grad is not None
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-6)


def test_teacher_confidence() -> None:
    t = torch.tensor([[[0.0, 2.0, -1.0], [-3.0, -4.0, -5.0]]], requires_grad=True)
    conf = teacher_confidence(t)
    assert conf.shape == (1, 2)
    assert not conf.requires_grad
    torch.testing.assert_close(conf, torch.tensor([[sigmoid(2.0), sigmoid(-3.0)]]))


# --------------------------------------------------------------------------------------------
# Box KD
# --------------------------------------------------------------------------------------------


def _decode(delta: list[float], anchor: list[float]) -> list[float]:
    w, h = anchor[2] - anchor[0], anchor[3] - anchor[1]
    cx, cy = anchor[0] + w / 2 + delta[0] * w, anchor[1] + h / 2 + delta[1] * h
    pw, ph = w * math.exp(delta[2]), h * math.exp(delta[3])
    return [cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2]


def _giou_loss(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return 1.0 - (inter / union - (hull - union) / hull)


def test_box_l1_and_giou_by_hand() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 2.0, 12.0, 18.0], [0.0, 0.0, 8.0, 8.0]])
    s = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.1, -0.2, 0.3, 0.0], [5.0, 5.0, 1.0, 1.0]]])
    t = torch.tensor([[[0.5, 0.0, 0.0, 0.0], [0.0, 0.1, math.log(2.0), -0.2], [0.0, 0.0, 0, 0]]])
    w = torch.tensor([[1.0, 0.5, 0.0]])  # the third anchor is not selected

    l1 = [sum(abs(a - b) for a, b in zip(s[0, i].tolist(), t[0, i].tolist())) for i in range(3)]
    expected_l1 = (1.0 * l1[0] + 0.5 * l1[1]) / 1.5
    assert box_distill_loss(s, t, [anchors], w, "l1").item() == pytest.approx(expected_l1)

    g = [
        _giou_loss(_decode(s[0, i].tolist(), anchors[i].tolist()), _decode(t[0, i].tolist(), a))
        for i, a in enumerate(anchors.tolist())
    ]
    assert g[0] == pytest.approx(2 / 3)  # [0,0,10,10] vs [5,0,15,10]
    expected_giou = (1.0 * g[0] + 0.5 * g[1]) / 1.5
    for anchor_arg in ([anchors], anchors[None]):
        loss = box_distill_loss(s, t, anchor_arg, w, "giou")
        assert loss.item() == pytest.approx(expected_giou, rel=1e-5)


def test_box_zero_when_equal_and_when_nothing_selected() -> None:
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 30.0, 20.0]])] * 2
    d = torch.randn(2, 2, 4) * 0.3
    w = torch.ones(2, 2)
    assert box_distill_loss(d.clone(), d, anchors, w, "l1").item() == 0.0
    assert box_distill_loss(d.clone(), d, anchors, w, "giou").item() < 1e-5
    other = torch.randn(2, 2, 4)
    assert box_distill_loss(other, d, anchors, torch.zeros(2, 2), "giou").item() == 0.0


# --------------------------------------------------------------------------------------------
# Feature KD
# --------------------------------------------------------------------------------------------


def test_mse_by_hand() -> None:
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    expected = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / 24
    assert mse_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_by_hand() -> None:
    s, t = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3) * 2
    tau = 2.0
    total = 0.0
    for n in range(2):
        for c in range(3):
            xs = [v / tau for v in s[n, c].flatten().tolist()]
            xt = [v / tau for v in t[n, c].flatten().tolist()]
            zs, zt = sum(math.exp(v) for v in xs), sum(math.exp(v) for v in xt)
            for vs, vt in zip(xs, xt):
                pt, ps = math.exp(vt) / zt, math.exp(vs) / zs
                total += pt * math.log(pt / ps)
    expected = tau**2 * total / (2 * 3)
    assert cwd_loss(s, t, tau).item() == pytest.approx(expected, rel=1e-5)


def test_pkd_by_hand() -> None:
    s, t = torch.randn(2, 3, 2, 2) * 3 + 1, torch.randn(2, 3, 2, 2)

    def standardise(x: Tensor, c: int) -> list[float]:
        values = x[:, c].flatten().tolist()  # over (N, H, W) jointly
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))  # unbiased
        return [(v - mean) / (std + 1e-6) for v in values]

    total = 0.0
    for c in range(3):
        total += sum((a - b) ** 2 for a, b in zip(standardise(s, c), standardise(t, c)))
    expected = total / s.numel() / 2
    assert pkd_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    # Pearson: invariant to a per-channel affine change of the student
    assert pkd_loss(s * 5 - 2, t).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("loss_fn", [mse_loss, cwd_loss, pkd_loss])
def test_feature_zero_when_equal(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    x = torch.randn(2, 4, 3, 3) * 5
    assert loss_fn(x.clone(), x).abs().item() < 1e-6
    assert loss_fn(torch.randn(2, 4, 3, 3), x).item() > 1e-3


def test_fgd_masks_by_hand() -> None:
    boxes = [
        torch.tensor([[0.0, 0.0, 12.0, 12.0], [24.0, 24.0, 32.0, 32.0]]),
        torch.zeros(0, 4),
        torch.tensor([[0.0, 0.0, 12.0, 12.0], [0.0, 0.0, 4.0, 4.0]]),
    ]
    fg, bg = fgd_masks(boxes, (32, 32), (4, 4))  # stride 8
    assert fg.shape == bg.shape == (3, 4, 4)
    expected = torch.zeros(4, 4)
    expected[:3, :3] = 1 / 9  # cells floor(0)..ceil(1.5) = 0..2 inclusive
    expected[3, 3] = 1 / 4  # cells 3..4 of which only 3 exists: area counted before clipping
    torch.testing.assert_close(fg[0], expected)
    torch.testing.assert_close(bg[0], (expected == 0).float() / 6)
    torch.testing.assert_close(fg[1], torch.zeros(4, 4))
    torch.testing.assert_close(bg[1], torch.full((4, 4), 1 / 16))
    overlap = torch.zeros(4, 4)
    overlap[:3, :3] = 1 / 9
    overlap[:2, :2] = 1 / 4  # the max over overlapping boxes: the small box wins
    torch.testing.assert_close(fg[2], overlap)


def _fgd_reference(
    s: Tensor,
    t: Tensor,
    boxes: list[Tensor],
    image_size: tuple[int, int],
    tau: float,
    alpha: float,
    beta: float,
    gamma: float,
    lam: float,
    global_s: Tensor,
    global_t: Tensor,
) -> float:
    """FGD's FeatureLoss step by step, with its sqrt-weighted features and mask loops."""
    n, c, h, w = s.shape

    def attention(x: Tensor) -> tuple[Tensor, Tensor]:
        value = x.abs()
        spatial = h * w * torch.softmax((value.mean(1) / tau).view(n, -1), dim=1).view(n, h, w)
        channel = c * torch.softmax(value.mean(2).mean(2) / tau, dim=1)
        return spatial, channel

    s_t, c_t = attention(t)
    s_s, c_s = attention(s)
    mask_fg, mask_bg = torch.zeros(n, h, w), torch.ones(n, h, w)
    for i in range(n):
        for box in boxes[i].tolist():
            x1 = math.floor(box[0] / image_size[1] * w)
            x2 = math.ceil(box[2] / image_size[1] * w)
            y1 = math.floor(box[1] / image_size[0] * h)
            y2 = math.ceil(box[3] / image_size[0] * h)
            area = 1.0 / (y2 + 1 - y1) / (x2 + 1 - x1)
            region = mask_fg[i, y1 : y2 + 1, x1 : x2 + 1]
            mask_fg[i, y1 : y2 + 1, x1 : x2 + 1] = torch.clamp(region, min=area)
        mask_bg[i] = (mask_fg[i] == 0).float()
        if mask_bg[i].sum() > 0:
            mask_bg[i] /= mask_bg[i].sum()
    scale = torch.sqrt(s_t[:, None]) * torch.sqrt(c_t[:, :, None, None])
    fg_s, fg_t = s * scale * mask_fg[:, None].sqrt(), t * scale * mask_fg[:, None].sqrt()
    bg_s, bg_t = s * scale * mask_bg[:, None].sqrt(), t * scale * mask_bg[:, None].sqrt()
    fg_loss = F.mse_loss(fg_s, fg_t, reduction="sum") / n
    bg_loss = F.mse_loss(bg_s, bg_t, reduction="sum") / n
    mask_loss = (c_s - c_t).abs().sum() / n + (s_s - s_t).abs().sum() / n
    rela_loss = F.mse_loss(global_s, global_t, reduction="sum") / n
    loss = alpha * fg_loss + beta * bg_loss + gamma * mask_loss + lam * rela_loss
    return loss.item()


def test_fgd_matches_reference() -> None:
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4) * 2
    g_s, g_t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    boxes = [torch.tensor([[2.0, 3.0, 17.0, 12.0], [20.0, 0.0, 31.0, 9.0]]), torch.zeros(0, 4)]
    args = (0.5, 0.1, 0.05, 0.2, 0.01)  # large weights so every term shows in the value
    expected = _fgd_reference(s, t, boxes, (32, 32), *args, g_s, g_t)
    loss = fgd_loss(s, t, boxes, (32, 32), *args, global_s=g_s, global_t=g_t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    without_global = fgd_loss(s, t, boxes, (32, 32), *args)
    rela = 0.01 * F.mse_loss(g_s, g_t, reduction="sum").item() / 2
    assert loss.item() - without_global.item() == pytest.approx(rela, rel=1e-4)
    # the focal and attention terms vanish when the student equals the teacher
    assert fgd_loss(t.clone(), t, boxes, (32, 32), *args).item() == 0.0


def test_fgd_attention_spread_is_the_share_of_pixels_and_channels_it_covers() -> None:
    even = torch.ones(2, 8, 4, 4)
    assert fgd_attention_spread(even, 0.5) == pytest.approx((1.0, 1.0))
    # one pixel and one channel far above the rest: all of the attention on one of each
    peaked = even.clone()
    peaked[:, :, 1, 2] = 100.0
    peaked[:, 3] = 100.0
    pixels, channels = fgd_attention_spread(peaked, 0.5)
    assert pixels == pytest.approx(1 / 16, abs=1e-6) and channels == pytest.approx(1 / 8, abs=1e-6)
    # the same features at a temperature of their scale: spread again; the share is that of
    # the perplexity, exp(entropy), of the softmax over 16 pixels
    wide = fgd_attention_spread(peaked, 1e4)
    assert wide[0] > 0.99 and wide[1] > 0.99
    p = F.softmax(peaked.abs().mean(dim=1).flatten(1) / 2.0, dim=1)
    expected = float(((-(p * p.log()).sum(dim=1)).exp() / 16).mean())
    assert fgd_attention_spread(peaked, 2.0)[0] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Invariances: batch size, image size, precision, gradients
# --------------------------------------------------------------------------------------------


def _twice(x: Tensor) -> Tensor:
    return torch.cat([x, x])


@pytest.mark.parametrize("kind", ["bce", "kl"])
@pytest.mark.parametrize("weighted", [False, True])
def test_soft_label_batch_and_image_size_independent(kind: str, weighted: bool) -> None:
    s, t = torch.randn(1, 6, 3), torch.randn(1, 6, 3) * 3
    w = teacher_confidence(t) if weighted else None
    one = soft_label_loss(s, t, 2.0, kind, w)
    w2 = _twice(w) if w is not None else None
    torch.testing.assert_close(soft_label_loss(_twice(s), _twice(t), 2.0, kind, w2), one)
    # a larger image: the same anchors twice over
    w_wide = torch.cat([w, w], dim=1) if w is not None else None
    wide = soft_label_loss(torch.cat([s, s], dim=1), torch.cat([t, t], dim=1), 2.0, kind, w_wide)
    torch.testing.assert_close(wide, one)


@pytest.mark.parametrize("kind", ["l1", "giou"])
def test_box_batch_independent(kind: str) -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 2.0, 12.0, 18.0], [1.0, 1.0, 5.0, 9.0]])
    s, t = torch.randn(1, 3, 4) * 0.3, torch.randn(1, 3, 4) * 0.3
    w = torch.tensor([[1.0, 0.0, 1.0]])
    one = box_distill_loss(s, t, [anchors], w, kind)
    two = box_distill_loss(_twice(s), _twice(t), [anchors, anchors], _twice(w), kind)
    torch.testing.assert_close(two, one)


@pytest.mark.parametrize("kind", ["mse", "cwd", "pkd", "fgd"])
def test_feature_batch_independent(kind: str) -> None:
    levels = ("p3", "p4")
    s = {"p3": torch.randn(1, 4, 8, 8), "p4": torch.randn(1, 4, 4, 4)}
    t = {"p3": torch.randn(1, 4, 8, 8), "p4": torch.randn(1, 4, 4, 4)}
    boxes = [torch.tensor([[3.0, 5.0, 30.0, 40.0]])]
    one = feature_kd_loss(kind, s, t, levels, tau=2.0, boxes_per_image=boxes, image_size=(64, 64))
    two = feature_kd_loss(
        kind,
        {k: _twice(v) for k, v in s.items()},
        {k: _twice(v) for k, v in t.items()},
        levels,
        tau=2.0,
        boxes_per_image=boxes * 2,
        image_size=(64, 64),
    )
    if kind == "pkd":  # statistics over the batch: approximately independent only
        assert two.item() == pytest.approx(one.item(), rel=0.03)
        assert two.item() != one.item()
    else:
        torch.testing.assert_close(two, one)


@pytest.mark.parametrize("loss_fn", [mse_loss, cwd_loss])
def test_feature_image_size_independent(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    s, t = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    tiled = loss_fn(s.tile(1, 1, 2, 2), t.tile(1, 1, 2, 2))
    torch.testing.assert_close(tiled, loss_fn(s, t))


def test_feature_kd_loss_sums_over_levels_as_the_papers() -> None:
    s = {
        "p3": torch.randn(2, 3, 4, 4),
        "p4": torch.randn(2, 3, 2, 2),
        "p5": torch.randn(2, 3, 1, 1),
    }
    t = {k: torch.randn_like(v) for k, v in s.items()}
    expected = cwd_loss(s["p3"], t["p3"], 2.0) + cwd_loss(s["p4"], t["p4"], 2.0)
    torch.testing.assert_close(feature_kd_loss("cwd", s, t, ("p3", "p4"), tau=2.0), expected)
    mean = feature_kd_loss("cwd", s, t, ("p3", "p4"), tau=2.0, reduction="mean")
    torch.testing.assert_close(mean, expected / 2)
    with pytest.raises(ConfigError, match=r"level_reduction.*'max' is not one of sum \| mean"):
        load_config(None, ["distill.feature.level_reduction=max"])
    with pytest.raises(ConfigError, match=r"distill\.feature\.kind.*'attention' is not one of"):
        load_config(None, ["distill.feature.kind=attention"])


def _extreme(shape: tuple[int, ...]) -> Tensor:
    return torch.where(torch.rand(shape) < 0.5, -50.0, 50.0) + torch.randn(shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temp", [0.5, 1.0, 4.0, 16.0])
def test_head_losses_finite_under_autocast(dtype: torch.dtype, temp: float) -> None:
    s = _extreme((2, 8, 3)).to(dtype).requires_grad_()
    t = _extreme((2, 8, 3)).to(dtype)
    deltas_s = (torch.randn(2, 8, 4) * 5).to(dtype).requires_grad_()
    deltas_t = (torch.randn(2, 8, 4) * 5).to(dtype)
    anchors = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(8, 1)] * 2
    with torch.autocast("cpu", dtype=dtype):
        losses = [
            soft_label_loss(s, t, temp, "bce", teacher_confidence(t)),
            soft_label_loss(s, t, temp, "kl"),
            box_distill_loss(deltas_s, deltas_t, anchors, torch.ones(2, 8), "l1"),
            box_distill_loss(deltas_s, deltas_t, anchors, torch.ones(2, 8), "giou"),
        ]
    for loss in losses:
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)
    torch.stack(losses).sum().backward()
    assert s.grad is not None and deltas_s.grad is not None
    assert torch.isfinite(s.grad).all() and torch.isfinite(deltas_s.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mse", "cwd", "pkd", "fgd"])
def test_feature_losses_finite_under_autocast(dtype: torch.dtype, kind: str) -> None:
    s = {"p3": _extreme((2, 4, 4, 4)).to(dtype).requires_grad_()}
    t = {"p3": _extreme((2, 4, 4, 4)).to(dtype)}
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.zeros(0, 4)]
    with torch.autocast("cpu", dtype=dtype):
        loss = feature_kd_loss(
            kind, s, t, ("p3",), tau=0.5, boxes_per_image=boxes, image_size=(32, 32)
        )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grad = s["p3"].grad
    assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", ["mse", "cwd", "pkd", "fgd"])
def test_gradients_reach_student_and_adapters_not_teacher(kind: str) -> None:
    levels = ("p3", "p4")
    adapters = build_adapters(levels, student_channels=3, teacher_channels=4)
    blocks = build_global_blocks(levels, channels=4)
    raw = {"p3": torch.randn(2, 3, 4, 4, requires_grad=True), "p4": torch.randn(2, 3, 2, 2)}
    raw["p4"].requires_grad_()
    teacher = {"p3": torch.randn(2, 4, 4, 4, requires_grad=True)}
    teacher["p4"] = torch.randn(2, 4, 2, 2, requires_grad=True)
    adapted = {k: adapters[k](v) for k, v in raw.items()}
    global_s = {k: blocks[f"student_{k}"](v) for k, v in adapted.items()}
    # the caller feeds the teacher-side block constant teacher features
    global_t = {k: blocks[f"teacher_{k}"](v.detach()) for k, v in teacher.items()}
    loss = feature_kd_loss(
        kind,
        adapted,
        teacher,
        levels,
        boxes_per_image=[torch.tensor([[0.0, 0.0, 10.0, 20.0]])] * 2,
        image_size=(32, 32),
        global_s=global_s if kind == "fgd" else None,
        global_t=global_t if kind == "fgd" else None,
    )
    loss.backward()
    for level in levels:
        adapter = adapters[level]
        assert isinstance(adapter, nn.Conv2d)
        for grad in (raw[level].grad, adapter.weight.grad):
            assert grad is not None and grad.abs().sum() > 0
        assert teacher[level].grad is None
        if kind == "fgd":
            for side in ("student", "teacher"):
                last = _last_conv(blocks[f"{side}_{level}"]).weight.grad
                assert last is not None and last.abs().sum() > 0


@pytest.mark.parametrize("kind", ["bce", "kl"])
def test_head_gradients_never_reach_teacher(kind: str) -> None:
    s = torch.randn(2, 5, 3, requires_grad=True)
    t = torch.randn(2, 5, 3, requires_grad=True)
    d_s = torch.randn(2, 5, 4, requires_grad=True)
    d_t = torch.randn(2, 5, 4, requires_grad=True)
    anchors = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(5, 1)] * 2
    loss = soft_label_loss(s, t, 2.0, kind, teacher_confidence(t))
    loss = loss + box_distill_loss(d_s, d_t, anchors, teacher_confidence(t), "giou")
    loss.backward()
    assert s.grad is not None and d_s.grad is not None
    assert t.grad is None and d_t.grad is None


def _last_conv(block: nn.Module) -> nn.Conv2d:
    assert isinstance(block, GlobalContextBlock)
    last = block.channel_add[-1]
    assert isinstance(last, nn.Conv2d)
    return last


def test_global_context_block() -> None:
    block = GlobalContextBlock(8)
    x = torch.randn(2, 8, 5, 3)
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x)  # the last conv starts at zero, as FGD's
    nn.init.normal_(_last_conv(block).weight)
    out = block(x)
    assert not torch.allclose(out, x)
    # one context vector per image: the residual is constant over positions
    residual = out - x
    torch.testing.assert_close(residual, residual[:, :, :1, :1].expand_as(residual))
    blocks = build_global_blocks(("p3", "p4"), 8)
    assert set(blocks) == {"student_p3", "student_p4", "teacher_p3", "teacher_p4"}
    assert all(isinstance(b, GlobalContextBlock) for b in blocks.values())
    assert blocks["student_p3"] is not blocks["teacher_p3"]


# --------------------------------------------------------------------------------------------
# Combining
# --------------------------------------------------------------------------------------------


def test_kd_scale() -> None:
    cfg = DistillConfig(warmup_steps=4, stop_epoch=2)
    assert [kd_scale(cfg, step, 0) for step in (0, 1, 2, 4, 100)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert kd_scale(cfg, 100, 1) == 1.0
    assert kd_scale(cfg, 100, 2) == 0.0 and kd_scale(cfg, 100, 5) == 0.0
    assert kd_scale(DistillConfig(), 0, 0) == 1.0
    assert kd_scale(DistillConfig(), 0, 100) == 1.0  # no stop_epoch


def _dense(
    n: int = 2, a: int = 12, k: int = 3, adapted: bool = True, extras: bool = False
) -> DenseOutputs:
    features = {"p3": torch.randn(n, 4, 4, 4), "p4": torch.randn(n, 4, 2, 2)}
    xy = torch.rand(a, 2) * 40
    anchors = torch.cat([xy, xy + 8 + torch.rand(a, 2) * 20], dim=1)
    return DenseOutputs(
        features=features,
        cls_logits=torch.randn(n, a, k) * 3,
        bbox_regression=torch.randn(n, a, 4) * 0.2,
        anchors=[anchors] * n,
        num_anchors_per_level=[a - 3, 3],
        adapted={key: torch.randn_like(v) for key, v in features.items()} if adapted else {},
        extras={
            f"global_{side}/{key}": torch.randn_like(v)
            for key, v in features.items()
            for side in "st"
        }
        if extras
        else {},
    )


TARGETS = [{"boxes": torch.tensor([[2.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([1])}] * 2


def test_all_zero_weights_is_the_plain_detection_loss_bitwise() -> None:
    cfg = DistillConfig()
    assert not needs_teacher(cfg)
    kd = kd_of(_dense(), None, cfg)  # the teacher did not even run
    assert kd == {}
    det = {
        "classification": torch.rand((), requires_grad=True) * 1.37,
        "bbox_regression": torch.rand((), requires_grad=True) / 3.1,
    }
    total, log = combine(det, kd, kd_weights(kd_terms(cfg)), kd_scale(cfg, 0, 0))
    assert torch.equal(total, det["classification"] + det["bbox_regression"])
    assert log["loss/total"] == total.item()
    assert log["kd/scale"] == 1.0
    assert set(log) == {"loss/classification", "loss/bbox_regression", "loss/total", "kd/scale"}


def test_distill_terms_and_combine() -> None:
    cfg = distill(**{
        "feature.kind": "cwd", "feature.cwd.weight": 2.0, "feature.cwd.tau": 2.0,
        "feature.levels": ("p3", "p4"), "logit.kind": "kl", "logit.weight": 0.5,
        "logit.temperature": 4.0, "box.kind": "giou", "box.weight": 3.0,
        "box.score_threshold": 0.6, "warmup_steps": 10,
    })  # fmt: skip
    assert needs_teacher(cfg)
    student, teacher = _dense(), _dense(adapted=False)
    with pytest.raises(ValueError, match="no teacher"):
        kd_of(student, None, cfg)
    kd = kd_of(student, teacher, cfg)
    assert set(kd) == {"feature", "logit", "box"}
    feature = sum(cwd_loss(student.adapted[k], teacher.features[k], 2.0) for k in ("p3", "p4"))
    torch.testing.assert_close(kd["feature"], feature)
    conf = teacher_confidence(teacher.cls_logits)
    logit = soft_label_loss(student.cls_logits, teacher.cls_logits, 4.0, "kl", conf)
    torch.testing.assert_close(kd["logit"], logit)
    selected = (conf >= 0.6).float()
    assert 0 < selected.sum() < selected.numel()  # the threshold does select
    box = box_distill_loss(
        student.bbox_regression, teacher.bbox_regression, student.anchors, selected, "giou"
    )
    torch.testing.assert_close(kd["box"], box)

    det = {"classification": torch.tensor(1.5), "bbox_regression": torch.tensor(0.25)}
    # half way through the warmup
    total, log = combine(det, kd, kd_weights(kd_terms(cfg)), kd_scale(cfg, 5, 0))
    weighted = 2.0 * feature + 0.5 * logit + 3.0 * box
    torch.testing.assert_close(total, 1.75 + 0.5 * weighted)
    assert log["kd/scale"] == 0.5
    assert log["kd/box"] == pytest.approx(box.item())
    assert log["kd_weighted/box"] == pytest.approx(0.5 * 3.0 * box.item())
    parts = [v for key, v in log.items() if key.startswith(("loss/c", "loss/b", "kd_weighted/"))]
    assert log["loss/total"] == pytest.approx(float(sum(parts)), rel=1e-6)  # device tensors


def test_anchor_weighting_none_and_box_threshold() -> None:
    cfg = distill(**{
        "logit.weight": 1.0, "logit.anchor_weighting": "none", "logit.temperature": 2.0,
        "box.weight": 1.0, "box.kind": "l1", "box.score_threshold": 0.7,
    })  # fmt: skip
    student, teacher = _dense(adapted=False), _dense(adapted=False)
    kd = kd_of(student, teacher, cfg)
    assert set(kd) == {"logit", "box"}
    plain = soft_label_loss(student.cls_logits, teacher.cls_logits, 2.0, "bce")
    torch.testing.assert_close(kd["logit"], plain)
    # moving the student's boxes on anchors the teacher is unsure about changes nothing
    unsure = teacher_confidence(teacher.cls_logits) < 0.7
    assert unsure.any() and (~unsure).any()
    student.bbox_regression[unsure] += 5.0
    moved = kd_of(student, teacher, cfg)
    torch.testing.assert_close(moved["box"], kd["box"])
    student.bbox_regression[~unsure] += 5.0
    assert kd_of(student, teacher, cfg)["box"] > kd["box"]


def test_fgd_term_uses_global_extras() -> None:
    cfg = distill(
        **{"feature.kind": "fgd", "feature.fgd.weight": 1.0, "feature.levels": ("p3", "p4")}
    )
    teacher = _dense(adapted=False)
    student = _dense(extras=True)
    no_extras = dataclasses.replace(student, extras={})
    plain = kd_of(no_extras, teacher, cfg)["feature"]
    with_global = kd_of(student, teacher, cfg)["feature"]
    levels = ("p3", "p4")
    boxes = [t["boxes"] for t in TARGETS]
    expected = sum(
        fgd_loss(
            student.adapted[k], teacher.features[k], boxes, (32, 32),
            tau=cfg.feature.fgd.tau,  # FGD's own temperature (0.5), not CWD's
            global_s=student.extras[f"global_s/{k}"], global_t=student.extras[f"global_t/{k}"],
        )
        for k in levels
    )  # fmt: skip
    torch.testing.assert_close(with_global, expected)
    assert not torch.allclose(plain, with_global)
