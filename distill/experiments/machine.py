"""The machine a measurement ran on, as the results files record it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import accelerate
import torch
import torchvision

from distill.engine.accelerator import native_bf16

# Environment variables that cap the instruction sets of oneDNN and of PyTorch's own kernels: an
# AVX2-only host imitated on a newer CPU (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2).
INSTRUCTION_SET_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def instruction_set_caps() -> list[str]:
    """``NAME=VALUE`` of each of ``INSTRUCTION_SET_CAPS`` that is set: what a recorded command
    must start with to be run again as it was."""
    return [f"{k}={os.environ[k]}" for k in INSTRUCTION_SET_CAPS if k in os.environ]


def threads_per_core(topology: Path = Path("/sys/devices/system/cpu/cpu0/topology")) -> int | None:
    """Hardware threads that share the first CPU's core (``thread_siblings_list``: ``0``,
    ``0-1``, ``0,2``); above 1, the cores counted are SMT siblings with a core's compute between
    them. None where the kernel does not say (not Linux)."""
    try:
        siblings = (topology / "thread_siblings_list").read_text().strip()
    except OSError:
        return None
    count = 0
    for part in siblings.split(","):
        first, _, last = part.partition("-")
        count += int(last) - int(first) + 1 if last else 1
    return count


def machine() -> dict[str, Any]:
    """CPU model, cores, library versions, device and whether bf16 is native there."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads_per_core": threads_per_core(),  # 2: the cores are SMT siblings
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "native_bf16": native_bf16(),  # bf16 computed natively (else emulated, slow)
        # the vector instructions PyTorch's own kernels use, and a cap put on oneDNN's
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }
