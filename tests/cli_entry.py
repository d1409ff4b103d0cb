"""Test entry point: several ``distill`` commands in one process, e.g. under ``accelerate launch``.

    python tests/cli_entry.py SPEC.json

SPEC is a JSON list of commands, run in order in the same process (one process group):

    {"argv": ["run", "CONFIG", "--set", "..."],   # what follows ``distill``
     "expect": 3,                                 # optional: the exit status it must end with (0)
     "nan_rank": 1, "nan_steps": [1, 2],          # optional: non-finite total loss on that rank
     "digest_dir": "DIR"}                         # optional: DIR/digest.rank{R}.json, see below

The non-finite loss replaces ``distill.engine.step.step_losses``'s total on the chosen rank and
steps, so only that process sees it. The digest file records, for the detector that rank
evaluates at the end of training, SHA-256 digests taken before anything is broadcast and at
the evaluation:

    {"broadcast_before": digest of the tensors the loop broadcasts from process 0 (BatchNorm
                         buffers), as this rank held them after its last training step,
     "broadcast_after": the same tensors after the broadcast,
     "parameters", "buffers", "state": the detector at the evaluation (``state_digest``)}

Each command's status is printed as ``cli_entry: rank R: command K exited S``. Every command
runs, whatever the status of the one before (a worker that exits early would make the launcher
stop the others); then the script exits 1 if any command's status was not its ``expect``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

import distill.engine.loop
import distill.engine.step
from distill.cli import main
from distill.engine.checkpoint import state_digest

RANK = int(os.environ.get("RANK", "0"))


def patched(spec: dict[str, Any]) -> None:
    """Install (or remove) this command's patches of ``distill.engine.loop``."""
    nan_steps = set(spec.get("nan_steps") or ()) if spec.get("nan_rank") == RANK else set()

    now: dict[str, int] = {}

    def train_step(*args: Any) -> Any:
        # (accelerator, trainee, image_list, targets, teacher_out, step, epoch)
        now["step"] = args[5]
        return _train_step(*args)

    def step_losses(*args: Any, **kwargs: Any) -> Any:
        total, logs = _step_losses(*args, **kwargs)
        if now.get("step") in nan_steps:
            total = total * float("nan")
        return total, logs

    digest_dir = spec.get("digest_dir")
    digests: dict[str, str] = {}

    def broadcast(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        if digest_dir is not None:  # this rank's own state, before process 0's replaces it
            digests["broadcast_before"] = tensors_digest(tensors)
        result = _broadcast(tensors, *args, **kwargs)
        if digest_dir is not None:
            digests["broadcast_after"] = tensors_digest(tensors)
        return result

    def evaluate(detector: Any, *args: Any, **kwargs: Any) -> Any:
        if digest_dir is not None:
            accelerator = args[2] if len(args) > 2 else kwargs["accelerator"]
            digests["parameters"] = tensors_digest(detector.parameters())
            digests["buffers"] = tensors_digest(detector.buffers())
            digests["state"] = state_digest(detector)
            path = Path(digest_dir) / f"digest.rank{accelerator.process_index}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(digests))
        return _evaluate(detector, *args, **kwargs)

    distill.engine.loop.train_step = train_step
    distill.engine.step.step_losses = step_losses
    distill.engine.loop.broadcast = broadcast
    distill.engine.loop.evaluate = evaluate


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over the dtypes and bytes of ``tensors``, in order."""
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_train_step = distill.engine.loop.train_step
_step_losses = distill.engine.step.step_losses
_broadcast = distill.engine.loop.broadcast
_evaluate = distill.engine.loop.evaluate


def run(specs: list[dict[str, Any]]) -> int:
    """Run every command; 1 if any ended with another status than its ``expect``, else 0."""
    failed = 0
    for k, spec in enumerate(specs):
        patched(spec)
        code = main(spec["argv"])
        expected = spec.get("expect", 0)
        print(f"cli_entry: rank {RANK}: command {k} exited {code}", flush=True)
        if code != expected:
            print(f"cli_entry: rank {RANK}: command {k}: expected {expected}", flush=True)
            failed = 1
    return failed


if __name__ == "__main__":
    status = run(json.loads(Path(sys.argv[1]).read_text()))
    # Tear the gloo group down before interpreter exit: left to static destructors, a worker
    # once aborted after all its commands had exited 0 ("terminate called without an active
    # exception", exit -6), and the launcher then failed the whole run.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(status)
