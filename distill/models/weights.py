"""Weights: files on disk, torchvision weights names, loading into models, freezing.

A weights *spec* in a config is either a torchvision weights name (``COCO_V1``, ``DEFAULT``,
``IMAGENET1K_V1``; downloaded and cached by torchvision) or a path to a plain state dict written
by this project (read with ``torch.load(weights_only=True)``). Loading is strict and explains
itself: a checkpoint that does not fit lists its missing, unexpected and mis-shaped keys, except
for the one change a user expects to make, a different number of classes, which re-creates the
classification output layer and keeps everything else.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import OrderedDict
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.models.detection import RetinaNet

from distill.fileio import write_atomic

log = logging.getLogger(__name__)


# The output layer of RetinaNet's classification branch: the only part whose shape depends on
# the number of classes.
CLS_LOGITS_KEYS = (
    "head.classification_head.cls_logits.weight",
    "head.classification_head.cls_logits.bias",
)
_MAX_LISTED = 5


class WeightsError(ValueError):
    """A weights file that cannot be used: unreadable, unsafe, not a state dict, or not for
    this model; the message names the file."""


class WeightsMismatchError(WeightsError):
    """A checkpoint whose keys or shapes do not fit the model; the message lists them."""


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a plain state dict with ``torch.load(weights_only=True)``, on the CPU.

    Raises FileNotFoundError for a missing file, ValueError (naming the file) for one that is
    truncated, not a torch file, holds pickled objects other than tensors, or is not a mapping
    from str to Tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses arbitrary globals: the file would run code when loaded.
        lines = str(err).splitlines()
        unsafe = next((ln.strip() for ln in lines if "unsupported global" in ln.lower()), None)
        if unsafe is None:  # not a pickle at all (a text file, ...): torch's words say little
            raise WeightsError(f"{path}: cannot read weights, not a torch file") from None
        raise WeightsError(
            f"{path}: refusing to load, it holds pickled objects other than tensors ({unsafe})"
        ) from None
    except Exception as err:  # truncated zip, not a torch file, ...
        raise WeightsError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{path}: expected a state dict (str -> Tensor), got {type(obj).__name__}"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise WeightsError(
                f"{path}: expected a state dict (str -> Tensor), but entry {key!r} holds "
                f"{type(value).__name__} (a training checkpoint rather than plain weights?)"
            )
    return obj if isinstance(obj, dict) else dict(obj)


def save_state_dict_file(state: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write a plain state dict atomically: a reader sees the old file or the new one, whole.

    The file is written under a temporary name in the same directory, fsynced, then renamed
    over ``path``; parent directories are created.
    """
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"state dict entry {key!r} is {type(value).__name__}, not a Tensor")
    write_atomic(Path(path), lambda f: torch.save(state, f))


# --------------------------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------------------------


def weights_names(weights_enum: type[WeightsEnum]) -> list[str]:
    """The names a config may use for ``weights_enum``, e.g. ``["COCO_V1", "DEFAULT"]``."""
    return [w.name for w in weights_enum] + ["DEFAULT"]


def resolve_weights(spec: str, weights_enum: type[WeightsEnum], what: str) -> WeightsEnum | Path:
    """A torchvision weights entry if ``spec`` names one of ``weights_enum``, else a local path.

    Names win over paths (``COCO_V1``, ``DEFAULT`` or ``RetinaNet_ResNet50_FPN_Weights.COCO_V1``).
    Raises FileNotFoundError naming the path and the known names when it is neither.
    """
    names = weights_names(weights_enum)
    short = spec.removeprefix(f"{weights_enum.__name__}.")
    if short in names:
        return weights_enum.verify(short)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"{what} weights {spec!r}: no such file, and not a torchvision weights name for "
        f"{weights_enum.__name__} (known names: {', '.join(names)})"
    )


def read_weights(weights: WeightsEnum | Path) -> tuple[dict[str, Tensor], str]:
    """The state dict of a resolved spec, and how to name its source in messages.

    torchvision weights go through torchvision's own download and cache (``get_state_dict``,
    hash-checked); they need a network the first time.
    """
    if isinstance(weights, Path):
        return load_state_dict_file(weights), str(weights)
    name = f"torchvision {type(weights).__name__}.{weights.name}"
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except OSError as err:  # no network (URLError), a proxy, a full disk, ...
        raise WeightsError(
            f"cannot download {name} from {weights.url}: {err}. Without a network, download "
            "the file elsewhere into torch's cache (torch.hub.get_dir()/checkpoints) or give "
            "a file path instead of the name"
        ) from None
    return state, name


# --------------------------------------------------------------------------------------------
# Loading into modules
# --------------------------------------------------------------------------------------------


def load_weights(
    module: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    *,
    allow_unexpected: bool = False,
    class_keys: Collection[str] = (),
) -> list[str]:
    """Load ``state`` into ``module`` strictly, or raise WeightsMismatchError listing what differs.

    allow_unexpected: entries the module has no place for are ignored (a classifier's ``fc``).
    class_keys:       entries whose first dimension may differ (the number of classes): when
                      they are the only misfit they are skipped, keeping the module's fresh
                      initialisation for them.
    Returns the ``class_keys`` that were skipped.
    """
    expected = module.state_dict()
    shape_misfits = {
        k: (tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    }
    reinit = [
        k
        for k, (got, want) in shape_misfits.items()
        if k in class_keys and got[1:] == want[1:] and len(got) == len(want)
    ]
    wrong_shapes = {k: s for k, s in shape_misfits.items() if k not in reinit}

    filtered: OrderedDict[str, Tensor] = OrderedDict(
        (k, v) for k, v in state.items() if k not in shape_misfits
    )
    # torchvision's load hooks (RetinaNet v1 -> v2 head keys, BatchNorm versions) read this.
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        filtered._metadata = metadata  # type: ignore[attr-defined]
    result = module.load_state_dict(filtered, strict=False)
    missing = [k for k in result.missing_keys if k not in shape_misfits]
    unexpected = [] if allow_unexpected else list(result.unexpected_keys)
    if missing or unexpected or wrong_shapes:
        raise WeightsMismatchError(
            mismatch_report(source, type(module).__name__, missing, unexpected, wrong_shapes)
        )
    return reinit


def mismatch_report(
    source: str,
    target: str,
    missing: list[str],
    unexpected: list[str],
    wrong_shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
) -> str:
    """One readable message: the first few keys of each kind of misfit."""

    def first(items: list[str]) -> str:
        more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
        return ", ".join(items[:_MAX_LISTED]) + more

    lines = [f"weights from {source} do not fit the {target}:"]
    if missing:
        lines.append(f"  missing in the weights ({len(missing)}): {first(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the weights ({len(unexpected)}): {first(unexpected)}")
    if wrong_shapes:
        shapes = [
            f"{k} {list(got)} vs model {list(want)}" for k, (got, want) in wrong_shapes.items()
        ]
        lines.append(f"  shape mismatches ({len(shapes)}): {first(shapes)}")
    return "\n".join(lines)


def load_detector_weights(
    model: RetinaNet, state: Mapping[str, Tensor], source: str, strict_classes: bool = False
) -> None:
    """Load a whole RetinaNet checkpoint; a different class count re-creates ``cls_logits``
    (for a model that is trained next), or is an error with ``strict_classes`` (a frozen
    teacher or a model being evaluated: a re-created classifier would only predict noise).

    The model was built for the dataset's classes, so its ``cls_logits`` already carries
    RetinaNet's prior-probability initialisation; every other tensor must fit exactly.
    """
    head = model.head.classification_head
    got = (
        state[CLS_LOGITS_KEYS[0]].shape[0] // head.num_anchors if CLS_LOGITS_KEYS[0] in state else 0
    )
    if strict_classes and got and got != head.num_classes:
        raise WeightsMismatchError(
            f"{source} has {got} classes (background included), the dataset {head.num_classes}: "
            "its classifier would have to be re-created at random. Fine-tune it on this "
            "dataset first (distill train-teacher with teacher.weights set to it)"
        )
    reinit = load_weights(model, state, source, class_keys=CLS_LOGITS_KEYS)
    if reinit:
        log.warning(
            "%s has %d classes, the model %d: re-created head.classification_head.cls_logits "
            "(prior-probability init) and kept every other weight",
            source,
            got,
            head.num_classes,
        )


# The modules of a RetinaNet that ``init_from_teacher`` copies, by ``student.init_from_teacher``
# name: the FPN (torchvision's ``BackboneWithFPN.fpn``, with its P6/P7 extra block) and the head.
TEACHER_PARTS = {"neck": "backbone.fpn.", "head": "head."}


def init_from_teacher(student: RetinaNet, teacher: RetinaNet, parts: Collection[str]) -> int:
    """Copy the teacher's ``parts`` (``TEACHER_PARTS`` names: neck, head) into the student, as
    FGD's ``init_student`` and MMRazor's MGD RetinaNet config start the student's neck and head
    from the teacher's weights. Every tensor of a part (parameters and buffers) must exist on
    both sides with the same shape: else a ``WeightsMismatchError`` naming the first that does
    not, with both shapes, and nothing is copied.

    Returns the number of tensors copied."""
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    pairs: list[tuple[Tensor, Tensor]] = []
    for part in parts:
        if part not in TEACHER_PARTS:
            raise ValueError(f"unknown part {part!r}; expected one of {', '.join(TEACHER_PARTS)}")
        prefix = TEACHER_PARTS[part]
        t_keys = [k for k in teacher_state if k.startswith(prefix)]
        s_keys = [k for k in student_state if k.startswith(prefix)]
        for key in [*t_keys, *(k for k in s_keys if k not in teacher_state)]:
            t, s = teacher_state.get(key), student_state.get(key)
            if t is None or s is None or t.shape != s.shape:
                raise WeightsMismatchError(
                    f"student.init_from_teacher {part}: {key} is {_shape(s)} in the student, "
                    f"{_shape(t)} in the teacher (copying needs the teacher's widths, "
                    "head_convs and norm)"
                )
            pairs.append((s, t))
    with torch.no_grad():
        for s, t in pairs:  # state_dict tensors share storage with the module's
            s.copy_(t)
    return len(pairs)


def _shape(tensor: Tensor | None) -> str:
    return "missing" if tensor is None else str(tuple(tensor.shape))
