"""scripts/bench_kd.py end to end on a tiny setting (--quick)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from distill.weights import load_state_dict_file, save_state_dict_file
from tests.conftest import REPO


def load_bench_kd():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_kd", REPO / "scripts" / "bench_kd.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kd"] = module
    spec.loader.exec_module(module)
    return module


def test_a_dataset_made_with_other_arguments_is_refused_not_reused(tmp_path: Path) -> None:
    from distill.data.shapes import generate_shapes

    data = tmp_path / "data"
    generate_shapes(data, num_train=3, num_val=2, size=64, seed=0)  # --quick wants 32 + 8
    before = (data / "train.json").read_bytes()
    bench = load_bench_kd()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--data", str(data), "--out", str(tmp_path / "b.json")])
    assert "num_train: 3 -> 32" in str(exc.value) and str(data) in str(exc.value)
    assert (data / "train.json").read_bytes() == before
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_quick_benchmark_writes_every_model_and_the_gap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_bench_kd()
    out = tmp_path / "bench_kd.json"
    args = ["--quick", "--seeds", "0,1", "--data", str(tmp_path / "data"),
            "--out-dir", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    result = bench.main(args)
    saved = json.loads(out.read_text())
    assert saved["seeds"] == [0, 1] and saved["quick"] is True
    names = [
        "teacher",
        "student",
        "student + KD",
        "feature KD only",
        "logit KD only",
        "box KD only",
    ]
    assert list(saved["models"]) == names
    for name in names:
        model = saved["models"][name]
        assert set(model) >= {
            "map",
            "ap50",
            "aps",
            "apm",
            "apl",
            "params",
            "gflops",
            "train_minutes",
        }
        assert set(model["map"]) == {"mean", "std"}
    assert len(saved["models"]["student"]["map_per_seed"]) == 2
    assert len(saved["models"]["box KD only"]["map_per_seed"]) == 1  # ablations: first seed only
    assert saved["models"]["student"]["gflops"] < saved["models"]["teacher"]["gflops"]
    goals = saved["goals"]
    assert list(goals) == list(bench.GOALS)
    gap_closed = saved["gap_closed"]  # NaN when the tiny teacher is no better than the student
    assert goals["gap_closed"]["value"] == gap_closed or math.isnan(gap_closed)
    assert math.isnan(goals["gap_closed"]["value"]) == math.isnan(gap_closed)
    assert goals["teacher_map"]["value"] == saved["models"]["teacher"]["map"]["mean"]
    assert goals["benchmark_minutes"]["value"] == saved["benchmark_minutes"] > 0
    for name, goal in goals.items():
        assert goal["met"] == bench.goal_met(name, goal["value"])
    table = bench.format_table(result)
    assert "| student + KD |" in table and "Gap closed" in table
    assert "| teacher mAP | " in table and "| ≥ 0.5 |" in table
    # a second run reuses the teacher trained by the first
    teacher = tmp_path / "runs" / "teacher" / "teacher.pt"
    stamp = teacher.stat().st_mtime_ns
    group = tmp_path / "runs" / "group_seed0"
    progress = json.loads((group / "checkpoints" / "step_00000003" / "progress.json").read_text())
    assert progress["teacher_digest"]  # the group records the teacher it was trained against
    reused = bench.main([*args[:2], "0", *args[3:]])
    assert teacher.stat().st_mtime_ns == stamp
    assert (
        reused["models"]["student + KD"]["map_per_seed"]
        == saved["models"]["student + KD"]["map_per_seed"][:1]
    )  # the finished group is resumed, not trained again
    # with another teacher the finished group is trained again, not reused
    weights = load_state_dict_file(teacher)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 1.0
    other = tmp_path / "other_teacher.pt"
    save_state_dict_file(weights, other)
    capsys.readouterr()
    bench.main([*args[:2], "0", *args[3:], "--teacher", str(other)])
    assert "trained against another teacher" in capsys.readouterr().out
    again = json.loads((group / "checkpoints" / "step_00000003" / "progress.json").read_text())
    assert again["teacher_digest"] not in ("", progress["teacher_digest"])


def test_goal_bounds_are_inclusive() -> None:
    bench = load_bench_kd()
    assert bench.goal_met("teacher_map", 0.50) and not bench.goal_met("teacher_map", 0.4999)
    assert bench.goal_met("benchmark_minutes", 60.0) and not bench.goal_met("benchmark_minutes", 61)
    assert bench.goal_text("gflops_ratio") == "≤ 0.2"
