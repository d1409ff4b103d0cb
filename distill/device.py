"""The Accelerator for a config: device, processes, mixed precision (``auto``: bf16 where the
device computes it natively) and fp16's grad scaler, also on a CPU for the tests."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    GradScalerKwargs,
    broadcast_object_list,
    get_grad_scaler,
)

from distill.config import Config, ConfigError

log = logging.getLogger(__name__)

# fp16's dynamic loss scale: torch's defaults (start at 2**16, halve on an overflow, double
# after 2000 steps without one). Tests start higher to make the first steps overflow.
GRAD_SCALER = GradScalerKwargs()
# Lets fp16 run on a CPU (CPU fp16 autocast + torch.amp.GradScaler("cpu")): slow unless the CPU
# computes fp16 natively, so only the tests, which exercise the GPU path on CPU, set it.
CPU_FP16_ENV = "DISTILL_CPU_FP16"


def make_accelerator(cfg: Config, **kwargs: Any) -> Accelerator:
    """The Accelerator of a training run (``train.mixed_precision``); see ``_accelerator``."""
    return _accelerator(check_mixed_precision(cfg.train.mixed_precision), **kwargs)


def process_state() -> PartialState:
    """This process's place in a launch (main or not, how many, its device), set up as the
    Accelerators here are: without CUDA ``cpu=True``, which is what makes a launch of several
    CPU processes one group (gloo) rather than as many lone processes."""
    return PartialState(cpu=not torch.cuda.is_available())


def share(value: Any) -> Any:
    """The main process's ``value`` on every process of a launch (itself with one process):
    what the main process alone decided (the check's verdict, the search's trials)."""
    if process_state().num_processes == 1:
        return value
    holder = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


def inference_accelerator(precision: str | None = None) -> Accelerator:
    """The Accelerator of ``distill eval``, ``predict`` and ``report``: their own ``--precision``
    (default ``no``: float32, what torchvision's published numbers use), never the config's
    ``train.mixed_precision``, so that a run trained in fp16 on a GPU is evaluated on a CPU."""
    mode = check_mixed_precision(precision or "no", key="--precision")
    return _accelerator(mode)


def _accelerator(mixed_precision: str, **kwargs: Any) -> Accelerator:
    """An Accelerator in ``mixed_precision`` (no | fp16 | bf16); usable several times in one
    process (tests, demo, sweeps).

    Without CUDA, ``cpu=True`` is what lets Accelerate run several CPU processes with gloo
    (``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine).
    With fp16 the accelerator holds the grad scaler that ``backward``, ``clip_grad_norm_``
    (unscale), the prepared optimizer's ``step`` (skip + update) and ``save_state`` /
    ``load_state`` use.
    """
    # Accelerate keeps one global state per process; a new run may use another precision.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        kwargs_handlers=[GRAD_SCALER],
        **kwargs,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        # On a CPU Accelerate sets up neither fp16 autocast nor a scaler (it would silently
        # train in fp32): set both up as it does on CUDA, before anything is prepared.
        accelerator.native_amp = True
        accelerator.scaler = get_grad_scaler(
            accelerator.distributed_type, **GRAD_SCALER.to_kwargs()
        )
    return accelerator


def check_mixed_precision(value: str, key: str = "train.mixed_precision") -> str:
    """Accelerate's mixed-precision mode for ``value`` of ``key`` (named in errors and warnings).

    ``auto`` is bf16 where the device computes in bf16 natively (see ``native_bf16``) and fp32
    (``no``) elsewhere. An explicit bf16 is honoured, with a warning where it is emulated: on a
    2-core AVX2 CPU without AVX-512 an R50-FPN teacher's training step took 42 s in bf16 against
    1.9 s in fp32, while on an avx512_bf16 CPU bf16 made the same step 2.3x faster than fp32.
    fp16 without CUDA is an error, not a silent fallback (unless ``DISTILL_CPU_FP16=1``: tests).
    """
    if value not in ("no", "fp16", "bf16", "auto"):
        raise ConfigError(f"{key}: expected no | fp16 | bf16 | auto, got {value!r}")
    cpu_fp16 = os.environ.get(CPU_FP16_ENV) == "1"
    if value == "fp16" and not torch.cuda.is_available() and not cpu_fp16:
        raise ConfigError(
            f"{key}=fp16 needs a CUDA GPU and none is available; "
            "use bf16 (CPUs with avx512_bf16 / AMX run it fast), auto or no"
        )
    if value == "auto":
        return "bf16" if native_bf16() else "no"
    if value == "bf16" and not native_bf16():
        log.warning(
            "%s=bf16 on a %s without native bf16: it is emulated, and a training step can be "
            "10-20x slower than fp32; set %s=auto (bf16 only where it is native) or no",
            key,
            "GPU" if torch.cuda.is_available() else "CPU",
            key,
        )
    return value


def native_bf16() -> bool:
    """Whether the device that training uses computes bf16 natively: a CUDA GPU with bf16
    (Ampere and newer), or a CPU for which PyTorch's oneDNN has bf16 kernels (AVX-512 or AMX
    on x86, bf16 extensions on Arm)."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
