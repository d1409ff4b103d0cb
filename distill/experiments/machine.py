"""The machine a measurement ran on, as the results files record it."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import accelerate
import torch
import torchvision

from distill.device import native_bf16
from distill.fileio import write_json

# Environment variables that cap the instruction sets of oneDNN and of PyTorch's own kernels: an
# AVX2-only host imitated on a newer CPU (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2).
INSTRUCTION_SET_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def instruction_set_caps() -> list[str]:
    """``NAME=VALUE`` of each of ``INSTRUCTION_SET_CAPS`` that is set: what a recorded command
    must start with to be run again as it was."""
    return [f"{k}={os.environ[k]}" for k in INSTRUCTION_SET_CAPS if k in os.environ]


def usable_cores() -> int | None:
    """The CPUs this process may run on (its affinity), or all of them where that is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count()


def physical_cores(
    cpus: Iterable[int] | None = None, root: Path = Path("/sys/devices/system/cpu")
) -> int | None:
    """The physical cores under ``cpus`` (by default those this process may run on): CPUs that
    are SMT threads of one core, with one ``thread_siblings_list``, count once. None where the
    kernel does not say (not Linux, no topology in sysfs)."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            siblings = (root / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
        except OSError:
            return None
        if not siblings.strip():
            return None
        cores.add(siblings.strip())
    return len(cores) or None


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
        "cores_usable": usable_cores(),  # those this process may run on (affinity)
        "physical_cores": physical_cores(),  # under the usable ones: SMT threads count once
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


def provenance() -> dict[str, Any]:
    """Where and how a benchmark's result was measured: the ``machine``, the command that ran
    (``python`` and this process's arguments) and the UTC date."""
    return {
        "machine": machine(),
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def publish(result: Any, path: Path, table: str) -> None:
    """A benchmark script's ending: its result as JSON in ``path``, its table printed, then
    where the JSON went."""
    write_json(result, path)
    print(table)
    print(f"\nwrote {path}")
