"""The KD normalisers (issue 43, item 6): anchors in the batch's padding take no part in the
logit and box KD terms (as in CrossKD's), and every anchor-weighted term divides by its weight
sum over all processes, so that 1 process and N processes give the same loss and gradient."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from distill.config import DistillConfig, replace
from distill.kd import Batch, distill_terms, kd_terms
from distill.losses import anchors_inside, match_anchors, soft_label_loss
from distill.models.retinanet import DenseOutputs

STRIDE = 8  # one square anchor per STRIDE x STRIDE cell of the padded batch
GRID = (12, 12)  # cells of the largest padded batch (96 x 96 px)
K = 3

# a term's case -> (its loss's name, the keys of the distill section that turn it on alone)
TERMS = {
    "logit none": ("logit", {"logit.weight": 1.0, "logit.anchor_weighting": "none"}),
    "logit teacher_max": ("logit", {"logit.weight": 1.0, "logit.anchor_weighting": "teacher_max"}),
    "logit kl": ("logit", {"logit.weight": 1.0, "logit.kind": "kl"}),
    "box l1": ("box", {"box.weight": 1.0, "box.kind": "l1", "box.score_threshold": 0.3}),
    "box giou": ("box", {"box.weight": 1.0, "box.kind": "giou", "box.score_threshold": 0.3}),
}


def grid_anchors(rows: int, cols: int) -> Tensor:
    """(rows * cols, 4) xyxy: one STRIDE-sided anchor per cell, row by row."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    corner = torch.stack([x, y, x, y], dim=-1).reshape(-1, 4).float() * STRIDE
    return corner + torch.tensor([0.0, 0.0, STRIDE, STRIDE])


class Maps:
    """Per-cell student and teacher outputs of images on the largest grid; ``outputs`` cuts
    out a batch of some images padded to a smaller grid (the top-left cells, as torchvision
    pads at the bottom and right), so that an anchor's outputs do not depend on the batch its
    image is in. The student's maps are leaves, whose ``.grad`` is the gradient of a loss."""

    def __init__(self, images: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        shape = (images, *GRID)
        self.s_cls = torch.randn(*shape, K, generator=gen).requires_grad_(True)
        self.t_cls = torch.randn(*shape, K, generator=gen) * 2
        self.s_box = (torch.randn(*shape, 4, generator=gen) * 0.3).requires_grad_(True)
        self.t_box = torch.randn(*shape, 4, generator=gen) * 0.3

    def outputs(self, images: slice, grid: tuple[int, int]) -> tuple[DenseOutputs, DenseOutputs]:
        """(student, teacher) of ``images`` in a batch padded to ``grid`` cells."""
        rows, cols = grid
        anchors = grid_anchors(rows, cols)

        def dense(cls: Tensor, box: Tensor) -> DenseOutputs:
            cls = cls[images, :rows, :cols].reshape(-1, rows * cols, K)  # (N, A, K)
            box = box[images, :rows, :cols].reshape(-1, rows * cols, 4)  # (N, A, 4)
            return DenseOutputs({}, cls, box, [anchors] * cls.shape[0], [rows * cols])

        return dense(self.s_cls, self.s_box), dense(self.t_cls, self.t_box)

    def grad(self, term: str) -> Tensor:
        """The gradient of the student's map that ``term``'s loss reads (and then forgets it)."""
        leaf = self.s_cls if TERMS[term][0] == "logit" else self.s_box
        grad, leaf.grad = leaf.grad, None
        assert grad is not None
        return grad


def term_loss(
    term: str,
    maps: Maps,
    images: slice,
    grid: tuple[int, int],
    image_sizes: list[tuple[int, int]],
    mean_over_processes: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The loss of ``term`` (a key of TERMS) on ``images`` of ``maps``, in a batch padded to
    ``grid`` cells, through the engine's path."""
    name, keys = TERMS[term]
    student, teacher = maps.outputs(images, grid)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    padded = (grid[0] * STRIDE, grid[1] * STRIDE)
    batch = Batch(targets * len(image_sizes), padded, mean_over_processes, image_sizes)
    return distill_terms(kd_terms(replace(DistillConfig(), **keys)), student, teacher, batch)[name]


class TwoProcesses:
    """An all-reduce mean for two processes run one after the other: a first pass records
    each process's values in call order (and returns them as they are), the second returns,
    at each call, the mean of both processes' values of that call, as the collective would."""

    def __init__(self) -> None:
        self.seen: list[list[Tensor]] = [[], []]
        self.recording = True

    def mean(self, rank: int) -> Callable[[Tensor], Tensor]:
        calls = itertools.count()

        def reduce(value: Tensor) -> Tensor:
            k = next(calls)
            if self.recording:
                self.seen[rank].append(value.detach().clone())
                return value
            return (value + self.seen[1 - rank][k]) / 2

        return reduce


# Process 0 gets two landscape images (one 8 px shorter: a row of padding) padded to 64 x 96,
# process 1 a portrait and a wider one padded to 96 x 64; one process gets all four, padded
# to 96 x 96. Each process has its own padded size, so its own number of anchors.
HALVES = (
    (slice(0, 2), (8, 12), [(64, 96), (56, 96)]),
    (slice(2, 4), (12, 8), [(96, 48), (96, 64)]),
)


@pytest.mark.parametrize("term", sorted(TERMS))
def test_two_processes_with_half_the_batch_each_give_the_loss_and_gradient_of_one(
    term: str,
) -> None:
    """The DDP-averaged loss (and gradient) of two processes, each on its half of the batch
    padded to its own size, equals the loss (and gradient) of one process on the whole batch
    padded to the largest: padding anchors are left out and the normaliser is global."""
    maps = Maps(4)
    sizes = [size for _, _, half_sizes in HALVES for size in half_sizes]
    whole = term_loss(term, maps, slice(0, 4), GRID, sizes)
    whole.backward()
    one_process = maps.grad(term)

    processes = TwoProcesses()
    for rank, (images, grid, half_sizes) in enumerate(HALVES):  # the all-reduce's first pass
        term_loss(term, maps, images, grid, half_sizes, processes.mean(rank))
    processes.recording = False
    losses = [
        term_loss(term, maps, images, grid, half_sizes, processes.mean(rank))
        for rank, (images, grid, half_sizes) in enumerate(HALVES)
    ]
    assert all(len(seen) > 0 for seen in processes.seen)  # the term did reduce over processes
    assert losses[0].item() != pytest.approx(losses[1].item())  # the halves differ
    ddp = (losses[0] + losses[1]) / 2  # DDP averages the gradients over the processes
    torch.testing.assert_close(ddp, whole.detach())
    ddp.backward()
    torch.testing.assert_close(maps.grad(term), one_process)


@pytest.mark.parametrize("term", sorted(TERMS))
def test_a_portrait_batched_with_a_landscape_image_has_the_loss_it_has_alone(term: str) -> None:
    """A 96 x 48 portrait padded to 96 x 96 (as in a batch with a 48 x 96 landscape image)
    has the loss it has alone: the anchors in its padding (half of them) add nothing to the
    loss nor to its normaliser, and get no gradient."""
    maps = Maps(1, seed=3)
    alone = term_loss(term, maps, slice(0, 1), (12, 6), [(96, 48)])
    batched = term_loss(term, maps, slice(0, 1), GRID, [(96, 48)])
    torch.testing.assert_close(batched, alone)
    batched.backward()
    grad = maps.grad(term)
    assert grad[0, :, 6:].abs().sum() == 0  # the padding
    assert grad[0, :, :6].abs().sum() > 0


def test_without_padding_or_processes_the_uniform_weighting_is_the_plain_mean() -> None:
    """``anchor_weighting: none`` of a batch that fills its padded size, on one process: the
    mean over every anchor, as before, to the last bit."""
    maps = Maps(2, seed=5)
    loss = term_loss("logit none", maps, slice(0, 2), GRID, [(96, 96)] * 2)
    student, teacher = maps.outputs(slice(0, 2), GRID)
    plain = soft_label_loss(student.cls_logits, teacher.cls_logits, 4.0, "bce")
    assert torch.equal(loss, plain)


def test_the_padding_mask_is_the_one_crosskds_matcher_uses() -> None:
    """``anchors_inside``: an anchor is inside its image when its centre is (x < w, y < h);
    ``match_anchors`` leaves out exactly those that are not."""
    anchors = grid_anchors(2, 3)  # centres x 4, 12, 20; y 4, 12
    inside = anchors_inside([anchors, anchors], [(16, 16), (8, 24)])
    assert inside.tolist() == [[True, True, False, True, True, False],
                               [True, True, True, False, False, False]]  # fmt: skip
    assert anchors_inside([anchors], None).all()
    _, valid = match_anchors([anchors, anchors], [torch.zeros(0, 4)] * 2, [(16, 16), (8, 24)])
    assert torch.equal(valid, inside.float())
    with pytest.raises(ValueError, match="1 image sizes for 2 images"):
        anchors_inside([anchors, anchors], [(16, 16)])
