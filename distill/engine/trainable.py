"""The one trainable module: the detector being trained plus the KD terms' trainable parts.

This is the only module given to ``accelerator.prepare``. Its ``forward`` runs everything that
learns, so DDP sees every parameter used inside ``forward`` (no ``find_unused_parameters``):
the detector's backbone, FPN and head (the student's, or the teacher's when the teacher itself
is trained), then each KD term's part (``distill.kd.base.TermModule``: adapters, FGD's
global-context blocks, MGD's generators, CrossKD's cross head...), which may also read the
(constant) teacher outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from typing import cast

from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from distill.kd.base import KDTerm, TermModule
from distill.models.retinanet import DenseOutputs, dense_forward


class TrainableModule(nn.Module):
    """``detector`` (a torchvision RetinaNet), ``kd``, the KD terms' parts by term name, and
    ``terms``, the KD terms it trains with (built once, with their parts: their losses are
    computed every step from them)."""

    def __init__(
        self,
        detector: RetinaNet,
        kd: Mapping[str, TermModule] | None = None,
        terms: Mapping[str, KDTerm] | None = None,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.kd = nn.ModuleDict(kd or {})
        self.terms = dict(terms or {})

    def forward(
        self,
        tensors: Tensor,
        image_sizes: list[tuple[int, int]],
        teacher: DenseOutputs | None = None,
    ) -> DenseOutputs:
        """tensors: (N, 3, H, W) batch from the shared transform; image_sizes: per image (h, w)
        before padding; teacher: the frozen teacher's outputs on the same batch, for the parts
        that read them (from ``teacher_forward``, with its probes' ``extras``).

        Returns the detector's dense outputs, to which each part has added its tensors
        (``adapted``, ``extras``)."""
        parts = cast(dict[str, TermModule], dict(self.kd))  # built from TermModules only
        with ExitStack() as stack:  # the parts' hooks on the detector, while it runs
            held = {name: stack.enter_context(p.watch(self.detector)) for name, p in parts.items()}
            out = dense_forward(self.detector, ImageList(tensors, image_sizes))
        for name, part in parts.items():  # in the terms' order
            part(out, teacher, held[name])
        return out


def student_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The detector's weights alone (no KD parts), on CPU: what ``student.pt`` holds."""
    detector = module.detector if isinstance(module, TrainableModule) else module
    return {k: v.detach().to("cpu", copy=True) for k, v in detector.state_dict().items()}
