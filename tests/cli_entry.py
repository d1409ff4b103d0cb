"""Test entry point: several ``distill`` commands in one process, e.g. under ``accelerate launch``.

    python tests/cli_entry.py SPEC.json

SPEC is a JSON list of commands, run in order in the same process (one process group):

    {"argv": ["run", "CONFIG", "--set", "..."],   # what follows ``distill``
     "nan_rank": 1, "nan_steps": [1, 2],          # optional: non-finite total loss on that rank
     "digest_dir": "DIR"}                         # optional: DIR/digest.rank{R}.txt at each eval

The non-finite loss replaces ``distill.train.combine``'s total on the chosen rank and steps, so
only that process sees it. The digest file holds ``state_digest`` of the detector that rank
evaluates at the end of training: equal files on all ranks mean equal weights on all ranks.
Each command's status is printed as ``cli_entry: rank R: command K exited S`` and the script
exits 0 once all have run: a worker that exits non-zero would make the launcher stop the others.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import distill.train
from distill.checkpoint import state_digest
from distill.cli import main

RANK = int(os.environ.get("RANK", "0"))


def patched(spec: dict[str, Any]) -> None:
    """Install (or remove) this command's patches of ``distill.train``."""
    nan_steps = set(spec.get("nan_steps") or ()) if spec.get("nan_rank") == RANK else set()

    def combine(*args: Any, **kwargs: Any) -> Any:
        total, logs = _combine(*args, **kwargs)
        step = args[3] if len(args) > 3 else kwargs["step"]
        if step in nan_steps:
            total = total * float("nan")
        return total, logs

    digest_dir = spec.get("digest_dir")

    def evaluate(detector: Any, *args: Any, **kwargs: Any) -> Any:
        if digest_dir is not None:
            accelerator = args[2] if len(args) > 2 else kwargs["accelerator"]
            path = Path(digest_dir) / f"digest.rank{accelerator.process_index}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(state_digest(detector))
        return _evaluate(detector, *args, **kwargs)

    distill.train.combine = combine
    distill.train.evaluate = evaluate


_combine = distill.train.combine
_evaluate = distill.train.evaluate


def run(specs: list[dict[str, Any]]) -> None:
    for k, spec in enumerate(specs):
        patched(spec)
        code = main(spec["argv"])
        print(f"cli_entry: rank {RANK}: command {k} exited {code}", flush=True)


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
    # Tear the gloo group down before interpreter exit: left to static destructors, a worker
    # once aborted after all its commands had exited 0 ("terminate called without an active
    # exception", exit -6), and the launcher then failed the whole run.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
