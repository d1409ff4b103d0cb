"""The one trainable module: the detector being trained plus every learnable KD block.

This is the only module given to ``accelerator.prepare``. Its ``forward`` runs everything that
learns, so DDP sees every parameter used inside ``forward`` (no ``find_unused_parameters``):
the student's backbone, FPN and head, the 1x1 adapters to the teacher's channels, FGD's
global-context blocks, which also read the (constant) teacher features, MGD's generators, and
CrossKD's cross-head path (its 1x1 mappers, then the frozen teacher head, which is not part of
this module's parameters).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from distill.losses.crosskd import BRANCHES, CrossHead, held_tower_outputs
from distill.losses.features import mgd_mask
from distill.models.retinanet import DenseOutputs, dense_forward


class StudentModule(nn.Module):
    """``detector`` (a torchvision RetinaNet), 1x1 ``adapters``, FGD ``global_s``/``global_t``,
    MGD ``generators`` (masking ``mgd_ratio`` of the positions) and CrossKD's ``cross_head``."""

    def __init__(
        self,
        detector: RetinaNet,
        kd_levels: tuple[str, ...] = (),
        adapters: nn.ModuleDict | None = None,
        global_s: nn.ModuleDict | None = None,
        global_t: nn.ModuleDict | None = None,
        generators: nn.ModuleDict | None = None,
        mgd_ratio: float = 0.65,
        seed: int = 0,
        cross_head: CrossHead | None = None,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.kd_levels = kd_levels  # levels whose (adapted) features feature-KD compares
        self.adapters = adapters if adapters is not None else nn.ModuleDict()
        self.global_s = global_s if global_s is not None else nn.ModuleDict()
        self.global_t = global_t if global_t is not None else nn.ModuleDict()
        self.generators = generators if generators is not None else nn.ModuleDict()
        self.mgd_ratio, self.seed = mgd_ratio, seed
        # Training forwards so far: with the seed and the process, it seeds MGD's masks. Counted
        # in Python (reading a device tensor would wait for the device) and mirrored in a buffer
        # (with MGD only: other modules' state stays as it was), so a checkpoint keeps it and a
        # resumed run draws the masks it would have drawn.
        self._forwards = 0
        counter = torch.zeros((), dtype=torch.long) if len(self.generators) > 0 else None
        self.mgd_forwards: Tensor | None
        self.register_buffer("mgd_forwards", counter)  # None: not in the state dict
        self.register_load_state_dict_post_hook(StudentModule._after_load)
        self.register_state_dict_pre_hook(StudentModule._before_save)
        self.cross_head = cross_head

    def forward(
        self,
        tensors: Tensor,
        image_sizes: list[tuple[int, int]],
        teacher_features: dict[str, Tensor] | None = None,
        teacher_extras: dict[str, Tensor] | None = None,
    ) -> DenseOutputs:
        """tensors: (N, 3, H, W) batch from the shared transform; image_sizes: per image (h, w)
        before padding; teacher_features: {"p3".."p7": (N, C_t, H_l, W_l)}, needed when there
        are global-context blocks; teacher_extras: the teacher's ``DenseOutputs.extras``, with
        ``"crosskd/<branch>/<j>"`` (L, 2, C_t) tower statistics when there is a cross head
        (of the teacher's tower conv ``j``'s output before its activation, as the student's
        features handed over: ``held_tower_outputs``).

        Adds to the outputs' ``extras``: ``"global_s/<level>"``, ``"global_t/<level>"`` (FGD),
        ``"mgd/<level>"`` (MGD's regenerated features) and ``"crosskd/cls_logits"`` (N, A, K),
        ``"crosskd/bbox_regression"`` (N, A, 4) (CrossKD's cross-head predictions, of the
        branches whose loss is on).
        """
        images = ImageList(tensors, image_sizes)
        held: dict[str, list[Tensor]] = {}
        if self.cross_head is None:
            out = dense_forward(self.detector, images)
        else:  # record the student's tower conv's output, before its ReLU, as its head runs
            with held_tower_outputs(self.detector.head, self.cross_head.layer) as held:
                out = dense_forward(self.detector, images)
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
        if len(self.generators) > 0:
            stream = self._mask_stream(tensors.device)
            for level in self.generators:
                adapted = out.adapted[level]
                mask = mgd_mask(adapted.shape, self.mgd_ratio, stream).to(adapted.dtype)
                out.extras[f"mgd/{level}"] = self.generators[level](adapted * mask)
        if self.training and self.mgd_forwards is not None:
            self._forwards += 1
            self.mgd_forwards.fill_(self._forwards)
        if self.cross_head is not None:
            if teacher_extras is None:
                raise ValueError("CrossKD's cross head needs the teacher's tower statistics")
            if self.cross_head.layer == 0:  # the towers' input: the FPN features
                held = {branch: list(out.features.values()) for branch in BRANCHES}
            j = self.cross_head.teacher_layer
            stats = {branch: teacher_extras[f"crosskd/{branch}/{j}"] for branch in BRANCHES}
            cross = self.cross_head(held, stats)
            for branch, name in (("cls", "cls_logits"), ("reg", "bbox_regression")):
                if branch in cross:
                    out.extras[f"crosskd/{name}"] = cross[branch]
        return out

    @staticmethod
    def _before_save(module: nn.Module, _prefix: str, _keep_vars: bool) -> None:
        # the count as Python has it: a skipped step puts the buffers back, not the count
        assert isinstance(module, StudentModule)
        if module.mgd_forwards is not None:
            module.mgd_forwards.fill_(module._forwards)

    @staticmethod
    def _after_load(module: nn.Module, _keys: object) -> None:
        assert isinstance(module, StudentModule)
        if module.mgd_forwards is not None:  # one read, when a checkpoint is loaded
            module._forwards = int(module.mgd_forwards)

    def _mask_stream(self, device: torch.device) -> torch.Generator:
        """MGD's random stream for this forward: seeded by (seed, forwards so far, process), so
        runs repeat, processes mask differently, and other trainees' draws do not shift it."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        entropy = [self.seed, self._forwards, rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator(device=device).manual_seed(seed)


def student_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The detector's weights alone (no adapters), on CPU: what ``student.pt`` holds."""
    detector = module.detector if isinstance(module, StudentModule) else module
    return {k: v.detach().to("cpu", copy=True) for k, v in detector.state_dict().items()}
