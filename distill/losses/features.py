"""Feature distillation between FPN levels: FitNet MSE, CWD, PKD, FGD and MGD.

Every loss compares one level, student (N, C, H, W) against teacher (N, C, H, W) with the same
shape: the student's features have already gone through a learnable 1x1 adapter to the
teacher's channel count (the feature term's adapters, ``distill.kd.feature``; the learnable
parts of a kind, FGD's global-context blocks and MGD's generators, live with the kind in
``distill.kd.features``, which also sums a kind's loss over the distilled levels).

Like the head losses, they run in float32 with autocast off and detach the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.logits import autocast_off

__all__ = [
    "cwd_loss",
    "fgd_attention_spread",
    "fgd_loss",
    "fgd_masks",
    "mgd_loss",
    "mse_loss",
    "pkd_loss",
]


def _check_pair(s: Tensor, t: Tensor) -> None:
    if s.dim() != 4 or s.shape != t.shape:
        raise ValueError(
            f"student features {tuple(s.shape)} and teacher features {tuple(t.shape)} must both "
            "be (N, C, H, W) with the same shape (adapt the student's channels first)"
        )


def mse_loss(s: Tensor, t: Tensor) -> Tensor:
    """FitNet hint loss (Romero et al. 2015).

    s, t: (N, C, H, W) adapted student and teacher features -> scalar float32
    ``loss = sum_{n,c,h,w} (s - t)^2 / (N * C * H * W)``.
    """
    _check_pair(s, t)
    with autocast_off(s):
        return F.mse_loss(s.float(), t.detach().float())


def cwd_loss(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021; mmrazor ``ChannelWiseDivergence``).

    s, t: (N, C, H, W) -> scalar float32. For every (n, c), distributions over the H*W positions
    ``phi_T = softmax(t[n,c] / tau)``, ``phi_S = softmax(s[n,c] / tau)``, and

        loss = tau^2 / (N * C) * sum_{n,c} sum_{hw} phi_T (log phi_T - log phi_S).

    Each per-channel KL compares two distributions that sum to 1, so the value does not grow
    with H*W (tiling a map leaves it unchanged).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    _check_pair(s, t)
    with autocast_off(s):
        n, c = s.shape[:2]
        log_phi_s = F.log_softmax(s.float().flatten(2) / tau, dim=-1)  # (N, C, H*W)
        log_phi_t = F.log_softmax(t.detach().float().flatten(2) / tau, dim=-1)
        kl = F.kl_div(log_phi_s, log_phi_t, reduction="sum", log_target=True)
        return kl * tau**2 / (n * c)


def _standardise_channels(x: Tensor) -> Tensor:
    # PKD's norm: per channel over (N, H, W) jointly, unbiased std, as in mmrazor's PKDLoss.
    n, c, h, w = x.shape
    flat = x.transpose(0, 1).reshape(c, -1)  # (N, C, H, W) -> (C, N*H*W)
    mean = flat.mean(dim=-1, keepdim=True)
    std = flat.std(dim=-1, keepdim=True)
    return ((flat - mean) / (std + 1e-6)).reshape(c, n, h, w).transpose(0, 1)


def pkd_loss(s: Tensor, t: Tensor) -> Tensor:
    """Pearson-correlation feature distillation (Cao et al., NeurIPS 2022; mmrazor ``PKDLoss``).

    s, t: (N, C, H, W) -> scalar float32. Each channel is standardised over (N, H, W) jointly,
    ``x^ = (x - mean_c) / (std_c + 1e-6)`` with the unbiased std, and

        loss = sum_{n,c,h,w} (s^ - t^)^2 / (2 * N * C * H * W)  (= (1 - Pearson r) on average).

    The statistics are taken over the batch, so batch-size independence is only approximate:
    repeating a sample changes the unbiased std by a factor sqrt((m-1)/m * 2m/(2m-1)),
    m = N*H*W, which is negligible for real feature maps.
    """
    _check_pair(s, t)
    with autocast_off(s):
        norm_s = _standardise_channels(s.float())
        norm_t = _standardise_channels(t.detach().float())
        return F.mse_loss(norm_s, norm_t) / 2


def fgd_masks(
    boxes_per_image: Sequence[Tensor],
    image_size: tuple[int, int],
    feature_size: tuple[int, int],
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background masks for one feature level.

    boxes_per_image: list over images of (B_i, 4) xyxy ground-truth boxes in the frame of the
        transformed, padded batch (pixels)
    image_size: (H_img, W_img) of the padded batch; feature_size: (H, W) of the level
    returns: fg (N, H, W), bg (N, H, W), float32

    As FGD's reference code: a box covers the cells ``floor(y1 * H / H_img) .. ceil(y2 * H /
    H_img)`` (both ends inclusive, likewise in x); each covered cell gets ``1 / (number of cells
    the box covers)``, the max over overlapping boxes (small objects weigh as much as large
    ones). ``bg = 1`` where fg is 0, divided by its count per image (so it sums to 1, or is
    all 0 when the whole map is foreground). Unlike the reference, which scales by each image's
    unpadded shape, we scale by the padded batch size the features are computed on.
    """
    img_h, img_w = image_size
    h, w = feature_size
    rows = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1)
    cols = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w)
    fg_per_image, bg_per_image = [], []
    for boxes in boxes_per_image:
        b = boxes.detach().to(device=device, dtype=torch.float32).reshape(-1, 4)
        x1 = torch.floor(b[:, 0] / img_w * w).view(-1, 1, 1)  # (B, 1, 1)
        x2 = torch.ceil(b[:, 2] / img_w * w).view(-1, 1, 1)
        y1 = torch.floor(b[:, 1] / img_h * h).view(-1, 1, 1)
        y2 = torch.ceil(b[:, 3] / img_h * h).view(-1, 1, 1)
        area = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1))  # (B, 1, 1) cells, before clipping
        inside = (rows >= y1) & (rows <= y2) & (cols >= x1) & (cols <= x2)  # (B, H, W)
        fg = (inside * area).amax(dim=0) if len(b) else rows.new_zeros(h, w)
        bg = (fg == 0).float()
        fg_per_image.append(fg)
        bg_per_image.append(bg / bg.sum().clamp_min(1.0))
    return torch.stack(fg_per_image), torch.stack(bg_per_image)


def _fgd_attention(x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    # (N, C, H, W) -> spatial (N, H, W) summing to H*W, channel (N, C) summing to C.
    n, c, h, w = x.shape
    value = x.abs()
    spatial = h * w * F.softmax(value.mean(dim=1).reshape(n, -1) / tau, dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / tau, dim=1)
    return spatial.reshape(n, h, w), channel


def fgd_attention_spread(x: Tensor, tau: float) -> tuple[float, float]:
    """The shares of pixels and of channels FGD's attention of ``x`` (N, C, H, W) at ``tau``
    spreads over: the perplexity (exp of the entropy) of its spatial softmax over H*W and of its
    channel softmax over C, divided by H*W and by C, averaged over the images. 1 is even; 1/(H*W)
    or 1/C is all on one pixel or one channel, where FGD's focal term distils little else."""
    n, c, h, w = x.shape
    spatial, channel = _fgd_attention(x.detach().float(), tau)

    def share(attention: Tensor, size: int) -> float:
        p = attention.reshape(n, size) / size  # each row sums to 1
        entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1)
        return float((entropy.exp() / size).mean())

    return share(spatial, h * w), share(channel, c)


def fgd_loss(
    s: Tensor,
    t: Tensor,
    boxes_per_image: Sequence[Tensor],
    image_size: tuple[int, int],
    tau: float = 0.5,
    alpha: float = 0.001,
    beta: float = 0.0005,
    gamma: float = 0.0005,
    lam: float = 0.000005,
    global_s: Tensor | None = None,
    global_t: Tensor | None = None,
) -> Tensor:
    """Focal and Global Distillation (Yang et al., CVPR 2022; mmdet FGD ``FeatureLoss``).

    s, t: (N, C, H, W) adapted student and teacher features of one level
    boxes_per_image, image_size: ground truth for ``fgd_masks`` (transformed, padded frame)
    global_s, global_t: (N, C, H, W) outputs of the student's and the teacher's
        ``GlobalContextBlock`` (on the adapted student / the teacher features), or both None.
        ``global_t`` is not detached: the teacher-side block is learnable, as in FGD; compute
        it from the (constant) teacher features.
    returns: scalar float32

    With attentions from the teacher ``A^S_t = H*W * softmax_hw(mean_c |t| / tau)`` (N, H, W)
    and ``A^C_t = C * softmax_c(mean_hw |t| / tau)`` (N, C) (likewise A^S_s, A^C_s from s),
    masks M (fg) and B (bg) from ``fgd_masks``:

        focal  = sum_{n,c,h,w} A^S_t A^C_t (s - t)^2 * (alpha * M + beta * B) / N
        attn   = gamma * (sum |A^C_s - A^C_t| + sum |A^S_s - A^S_t|) / N
        global = lam * sum (global_s - global_t)^2 / N
        loss   = focal + attn + global

    This is FGD's own normalisation: sums over positions and channels divided by the batch
    size N. It does not depend on N (each image adds its own sum), but unlike the other losses
    it grows with the image size; the small default weights (FGD's RetinaNet configs,
    ``fgd_retina_*_distill_retina_r50_fpn_2x_coco.py``: temp 0.5, alpha 1e-3, beta 5e-4, gamma
    5e-4, lambda 5e-6) are tuned for that.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    _check_pair(s, t)
    if len(boxes_per_image) != s.shape[0]:
        raise ValueError(f"{len(boxes_per_image)} box sets for a batch of {s.shape[0]}")
    if (global_s is None) != (global_t is None):
        raise ValueError("pass both global_s and global_t, or neither")
    with autocast_off(s):
        s = s.float()
        t = t.detach().float()
        n, _, h, w = s.shape
        fg, bg = fgd_masks(boxes_per_image, image_size, (h, w), device=s.device)
        spatial_t, channel_t = _fgd_attention(t, tau)
        spatial_s, channel_s = _fgd_attention(s, tau)
        # (N, C, H, W) squared error weighted by the teacher's attention, as FGD's code does by
        # multiplying both features with sqrt(attention * mask) before an MSE sum.
        error = (s - t).square() * spatial_t[:, None] * channel_t[:, :, None, None]
        mask = alpha * fg + beta * bg  # (N, H, W)
        loss = (error * mask[:, None]).sum() / n
        attention = (channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()
        loss = loss + gamma * attention / n
        if global_s is not None and global_t is not None:
            diff = global_s.float() - global_t.float()
            loss = loss + lam * diff.square().sum() / n
        return loss


def mgd_loss(generated: Tensor, t: Tensor) -> Tensor:
    """Masked generative distillation's loss on one level.

    generated: (N, C, H, W) the generator's output from the masked, adapted student feature
    t: (N, C, H, W) the teacher's feature
    returns ``sum_{n,c,h,w} (generated - t)^2 / N`` (MGD's sum-reduced MSE per image), float32;
    0 exactly when the generator reproduces the teacher
    """
    _check_pair(generated, t)
    with autocast_off(generated):
        return (generated.float() - t.detach().float()).pow(2).sum() / generated.shape[0]
