"""The learning-rate schedules of ``build_scheduler``: warm-up, cosine, step milestones and
constant, checked step by step against their formulas, and across a save/load (a resume).
The resume of a real run is compared with the uninterrupted run's logged ``train/lr`` in
tests/test_reliability.py."""

from __future__ import annotations

import math
import re

import pytest
from torch import nn

from distill.config import TrainConfig
from distill.engine.build import build_optimizer, build_scheduler

LR = 0.1


def lrs(cfg: TrainConfig, total: int, steps: int | None = None) -> list[float]:
    """The learning rate of each optimizer step 0 .. steps-1 (the rate the step used)."""
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    values = []
    for _ in range(total if steps is None else steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def warmup_lr(step: int, warmup: int) -> float:
    """LinearLR from 0.001 x lr to lr over ``warmup`` steps."""
    return LR * (0.001 + (1 - 0.001) * step / warmup)


def test_warmup_then_cosine() -> None:
    cfg = TrainConfig(lr=LR, warmup_steps=4, schedule="cosine")
    total, warmup = 20, 4
    got = lrs(cfg, total)
    eta_min = LR * 0.01
    expected = [warmup_lr(s, warmup) for s in range(warmup)] + [
        eta_min + (LR - eta_min) * (1 + math.cos(math.pi * j / (total - warmup))) / 2
        for j in range(total - warmup)
    ]
    assert got == pytest.approx(expected, rel=1e-6)
    assert got[0] == pytest.approx(LR * 0.001) and got[warmup] == pytest.approx(LR)
    assert got[-1] < 0.02 * LR  # near eta_min at the end of the run


def test_step_milestones_are_fractions_of_the_whole_run() -> None:
    cfg = TrainConfig(
        lr=LR, warmup_steps=2, schedule="step", step_milestones=(0.5, 0.75), step_gamma=0.1
    )
    got = lrs(cfg, 20)
    # milestones at steps round(0.5 * 20) = 10 and round(0.75 * 20) = 15 of the run
    expected = [warmup_lr(s, 2) for s in range(2)] + [
        LR * (1 if s < 10 else 0.1 if s < 15 else 0.01) for s in range(2, 20)
    ]
    assert got == pytest.approx(expected, rel=1e-6)


def test_constant_and_no_warmup() -> None:
    assert lrs(TrainConfig(lr=LR, warmup_steps=0, schedule="constant"), 6) == [LR] * 6
    got = lrs(TrainConfig(lr=LR, warmup_steps=3, schedule="constant"), 6)
    assert got == pytest.approx([warmup_lr(s, 3) for s in range(3)] + [LR] * 3, rel=1e-6)
    # a warm-up longer than the run is cut to the run: the last step reaches the full rate
    assert lrs(TrainConfig(lr=LR, warmup_steps=100, schedule="constant"), 5)[-1] == LR


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_schedule_continues_exactly_after_a_save_and_load(schedule: str) -> None:
    """What a resume does: a new optimizer and scheduler load the saved states mid-run, here
    in the warm-up and after it."""
    cfg = TrainConfig(lr=LR, warmup_steps=4, schedule=schedule, step_milestones=(0.5,))
    total = 12
    uninterrupted = lrs(cfg, total)
    for stop in (2, 7):
        model = nn.Linear(2, 2)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, total)
        for _ in range(stop):
            optimizer.step()
            scheduler.step()
        saved = (optimizer.state_dict(), scheduler.state_dict())
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, total)
        optimizer.load_state_dict(saved[0])
        scheduler.load_state_dict(saved[1])
        resumed = []
        for _ in range(stop, total):
            resumed.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert resumed == uninterrupted[stop:], (schedule, stop)


def test_unknown_schedule_names_the_key() -> None:
    from distill.config import ConfigError

    optimizer = build_optimizer(nn.Linear(2, 2), TrainConfig())
    with pytest.raises(ConfigError, match=re.escape("train.schedule: unknown schedule 'linear'")):
        build_scheduler(optimizer, TrainConfig(schedule="linear"), 10)
