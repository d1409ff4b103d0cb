"""The one trainable module: the detector being trained plus every learnable KD block.

This is the only module given to ``accelerator.prepare``. Its ``forward`` runs everything that
learns, so DDP sees every parameter used inside ``forward`` (no ``find_unused_parameters``):
the student's backbone, FPN and head, the 1x1 adapters to the teacher's channels, and FGD's
global-context blocks, which also read the (constant) teacher features.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from distill.dense import DenseOutputs, dense_forward


class StudentModule(nn.Module):
    """``detector`` (a torchvision RetinaNet), 1x1 ``adapters``, FGD ``global_s``/``global_t``."""

    def __init__(
        self,
        detector: RetinaNet,
        kd_levels: tuple[str, ...] = (),
        adapters: nn.ModuleDict | None = None,
        global_s: nn.ModuleDict | None = None,
        global_t: nn.ModuleDict | None = None,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.kd_levels = kd_levels  # levels whose (adapted) features feature-KD compares
        self.adapters = adapters if adapters is not None else nn.ModuleDict()
        self.global_s = global_s if global_s is not None else nn.ModuleDict()
        self.global_t = global_t if global_t is not None else nn.ModuleDict()

    def forward(
        self,
        tensors: Tensor,
        image_sizes: list[tuple[int, int]],
        teacher_features: dict[str, Tensor] | None = None,
    ) -> DenseOutputs:
        """tensors: (N, 3, H, W) batch from the shared transform; image_sizes: per image (h, w)
        before padding; teacher_features: {"p3".."p7": (N, C_t, H_l, W_l)}, needed when there
        are global-context blocks."""
        out = dense_forward(self.detector, ImageList(tensors, image_sizes))
        # (N, C_s, H_l, W_l) -> (N, C_t, H_l, W_l) on distilled levels that have an adapter;
        # levels without one (channels already equal, no learnable projection) pass through.
        out.adapted = {
            level: self.adapters[level](out.features[level])
            if level in self.adapters
            else out.features[level]
            for level in self.kd_levels
        }
        if len(self.global_s) > 0:
            if teacher_features is None:
                raise ValueError("FGD global-context blocks need the teacher's features")
            for level in self.global_s:
                out.extras[f"global_s/{level}"] = self.global_s[level](out.adapted[level])
                out.extras[f"global_t/{level}"] = self.global_t[level](
                    teacher_features[level].detach().to(out.adapted[level].dtype)
                )
        return out


def student_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The detector's weights alone (no adapters), on CPU: what ``student.pt`` holds."""
    detector = module.detector if isinstance(module, StudentModule) else module
    return {k: v.detach().to("cpu", copy=True) for k, v in detector.state_dict().items()}
