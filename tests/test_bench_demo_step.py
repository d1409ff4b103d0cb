"""scripts/bench_demo_step.py: each row is the demo's configs with only the row's lever changed,
and its schedule estimate is the demo's reference schedule at the timed step costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import flatten, replace
from distill.experiments import demo
from tests.conftest import load_script


def test_rows_change_only_their_lever(tmp_path: Path) -> None:
    bench = load_script("bench_demo_step")
    base = demo.demo_configs(tmp_path, tmp_path / "data", tmp_path / "t.pt")
    for name, (size, changes) in bench.ROWS.items():
        for model, cfg in base.items():
            row = flatten(replace(cfg, **{"data.image_size": size, **changes}))
            differ = {k for k, v in flatten(cfg).items() if row[k] != v}
            assert differ <= {"data.image_size", *changes}, (name, model)
    assert bench.ROWS["96 px, batch 8, v2 head (the demo)"] == (demo.DEMO_SIZE, {})


def test_reference_minutes_is_the_demos_reference_schedule() -> None:
    bench = load_script("bench_demo_step")
    seconds = {"teacher": 0.5, "student": 0.1, "student + KD": 0.3}
    expected = (demo.TEACHER_STEPS * 0.5 + demo.STUDENT_STEPS * (0.1 + 0.3)) / 60
    assert bench.reference_minutes(seconds) == pytest.approx(expected)
