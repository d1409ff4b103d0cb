"""The GPU path, exercised on this CPU machine: fp16 with its grad scaler, gradient accumulation
in lockstep, KD normalisers across processes, the sweep's report, host syncs in a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import GradScalerKwargs

import distill.build
from distill.config import Config, load_config
from distill.train import TrainingStopped, train
from distill.weights import load_state_dict_file
from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
NO_KD = ("distill.feature.weight=0", "distill.logit.weight=0", "distill.box.weight=0")
QUIET_EVAL = ("eval.every_epochs=0", "eval.images_logged=0")  # one evaluation, at the end


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_state_dict_file(a), load_state_dict_file(b)
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "last").read_text().strip()


def test_fp16_overflows_shrink_the_scale_and_a_resume_keeps_it(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale of 1e10 overflows the fp16 gradients, 1e7 too, 1e4 does not: the first two
    steps are the scaler's own skips. The run goes on, they are not non-finite losses, the LR
    schedule waits for them, and a run stopped after the first one resumes with the shrunk
    scale (with the initial one it would overflow twice more)."""
    monkeypatch.setenv(distill.build.CPU_FP16_ENV, "1")
    monkeypatch.setattr(
        distill.build, "GRAD_SCALER", GradScalerKwargs(init_scale=1e10, backoff_factor=1e-3)
    )

    def config(out: Path) -> Config:
        fp16 = ["train.mixed_precision=fp16", "train.max_steps=4", *QUIET_EVAL]
        return load_config(SMOKE, [*smoke_overrides(shapes_root, out), *NO_KD, *fp16])

    whole = tmp_path / "whole"
    metrics = train(config(whole))
    assert metrics["mixed_precision"] == "fp16"
    assert metrics["step"] == 4
    assert metrics["scaler_skipped"] == 2
    assert metrics["nonfinite_skipped"] == 0
    checkpoint = last_checkpoint(whole)
    scheduler = torch.load(checkpoint / "scheduler.bin", weights_only=True)
    assert scheduler["last_epoch"] == 4 - 2  # the LR schedule stepped only with the optimizer
    assert torch.load(checkpoint / "scaler.pt", weights_only=True)["scale"] == pytest.approx(1e4)

    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingStopped):
        train(config(stopped), stop_after=1)
    saved = torch.load(last_checkpoint(stopped) / "scaler.pt", weights_only=True)
    assert saved["scale"] == pytest.approx(1e7)
    resumed = train(config(stopped), resume=stopped)
    assert resumed["scaler_skipped"] == 2 and resumed["nonfinite_skipped"] == 0
    assert_same_weights(whole / "student.pt", stopped / "student.pt")
