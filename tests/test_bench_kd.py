"""scripts/bench_kd.py end to end on a tiny setting (--quick)."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from types import ModuleType

import pytest

from distill.experiments.goals import goal_met, goal_text
from distill.models.weights import load_state_dict_file, save_state_dict_file
from tests.conftest import load_script


def load_bench_kd() -> ModuleType:
    return load_script("bench_kd")


def test_each_ablation_keeps_exactly_the_terms_its_name_says() -> None:
    """The ablations are overrides of the default recipe: "X only" trains X's losses at the
    recipe's weights and no other KD loss; the recipe without CrossKD drops only it."""
    from distill.config import load_config
    from distill.kd import kd_terms, kd_weights

    bench = load_bench_kd()

    def weights(overrides: list[str]) -> dict[str, float]:
        """{loss: weight} of the losses the config trains (``kd_weights``: those > 0)."""
        cfg = load_config(bench.CONFIGS / "distill.yaml", overrides)
        assert cfg.distill.feature.kind == (
            "mgd" if "distill.feature.kind=mgd" in overrides else "cwd"
        )
        return kd_weights(kd_terms(cfg.distill))

    recipe = weights([])  # the recipe's feature kind is CWD: "CrossKD + CWD" is CrossKD + its
    crosskd = {"crosskd_cls", "crosskd_box"}
    assert set(recipe) == {"feature", "logit", "box", *crosskd}  # the default uses every term
    kept = {
        "feature KD only": {"feature"},
        "logit KD only": {"logit"},
        "box KD only": {"box"},
        "CrossKD only": crosskd,
        "CrossKD + CWD": {"feature", *crosskd},
        "student + KD without CrossKD": set(recipe) - crosskd,
    }
    for name, keys in kept.items():
        assert weights(bench.ABLATIONS[name]) == {k: recipe[k] for k in keys}, name
    assert weights(bench.ABLATIONS["MGD only"]) == {"feature": 1.0e-8}


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
    names = ["teacher", "student", "student + KD", *bench.ABLATIONS]
    assert {"MGD only", "CrossKD only", "CrossKD + CWD", "student + KD without CrossKD"} <= set(
        bench.ABLATIONS
    )
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
    assert len(saved["models"]["student"]["map_per_seed"]) == 2
    assert len(saved["models"]["box KD only"]["map_per_seed"]) == 1  # ablations: first seed only
    # a spread only where there are several runs: the teacher and the ablations ran once
    for name in names:
        per_seed = saved["models"][name].get("map_per_seed", [saved["models"][name]["map"]["mean"]])
        expected = {"mean", "runs", "std"} if len(per_seed) > 1 else {"mean", "runs"}
        assert set(saved["models"][name]["map"]) == expected, name
        assert saved["models"][name]["map"]["runs"] == len(per_seed)
    assert saved["models"]["student"]["map"]["std"] == pytest.approx(
        statistics.pstdev(saved["models"]["student"]["map_per_seed"])
    )
    machine = saved["machine"]
    assert machine["cores"] == os.cpu_count() and machine["torch_threads"] >= 1
    assert machine["cores_usable"] == len(os.sched_getaffinity(0))
    assert saved["models"]["student"]["gflops"] < saved["models"]["teacher"]["gflops"]
    goals = saved["goals"]
    assert list(goals) == list(bench.GOALS)
    # the gap formula from the per-seed mAPs written in the same file
    teacher_map = saved["models"]["teacher"]["map"]["mean"]
    plain = saved["models"]["student"]["map_per_seed"]
    kd = saved["models"]["student + KD"]["map_per_seed"]
    gap = teacher_map - statistics.fmean(plain)
    expected_closed = (statistics.fmean(kd) - statistics.fmean(plain)) / gap if gap > 0 else None
    for closed in (saved["gap_closed"], goals["gap_closed"]["value"]):
        if expected_closed is None:  # the tiny teacher is no better than the student
            assert math.isnan(closed)
        else:
            assert closed == pytest.approx(expected_closed, rel=1e-12)
    assert goals["teacher_minus_plain"]["value"] == pytest.approx(gap, rel=1e-12)
    beats = all(k > p for k, p in zip(kd, plain))
    assert saved["kd_beats_plain_every_seed"] is beats
    assert goals["kd_beats_plain_every_seed"]["value"] == float(beats)
    assert goals["teacher_map"]["value"] == teacher_map
    assert goals["benchmark_minutes"]["value"] == saved["benchmark_minutes"] > 0
    # "met" read from the goal's own text ("≥ 0.5"), not from the function under test
    for goal in goals.values():
        sign, bound = goal["goal"].split()
        value = goal["value"]
        assert goal["met"] == (value >= float(bound) if sign == "≥" else value <= float(bound))
    table = bench.format_table(result)
    assert "| student + KD |" in table and "Gap closed" in table
    assert (
        "| box KD only | " in table and "±" not in table.split("| box KD only |")[1].split("\n")[0]
    )
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
    goals = bench.GOALS
    assert goal_met(goals["teacher_map"], 0.50) and not goal_met(goals["teacher_map"], 0.4999)
    minutes = goals["benchmark_minutes"]
    assert goal_met(minutes, 60.0) and not goal_met(minutes, 61)
    assert goal_text(goals["gflops_ratio"]) == "≤ 0.2"


def test_aggregation_from_known_per_seed_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run`` with training replaced by known metrics: the mean, the spread (only for several
    runs), the gap closed and the goals follow from the per-seed mAPs by their formulas."""
    bench = load_bench_kd()
    maps = {  # per seed 0, 1; the ablations run on seed 0 only
        "student": [0.20, 0.30],
        "student + KD": [0.40, 0.35],
        "feature KD only": [0.25],
        "logit KD only": [0.22],
        "box KD only": [0.21],
        "MGD only": [0.23],
        "CrossKD only": [0.24],
        "CrossKD + CWD": [0.26],
        "student + KD without CrossKD": [0.27],
    }
    assert list(maps)[2:] == ["student + KD", *bench.ABLATIONS][1:]  # the order of the groups
    calls: list[int] = []

    def train_or_resume(cfgs: list, group_dir: Path) -> list[dict]:
        seed = len(calls)
        calls.append(seed)
        names = list(maps)[: len(cfgs)]
        return [
            dict.fromkeys(bench.METRICS, maps[n][seed])
            | {"per_class": {"circle": maps[n][seed]}, "train_minutes": 6.0}
            for n in names
        ]

    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")
    (tmp_path / "metrics.json").write_text(
        json.dumps(
            dict.fromkeys(bench.METRICS, 0.6)
            | {"per_class": {"circle": 0.6}, "train_minutes": 80.0}
        )
    )
    sizes = {"teacher": {"params": 10, "gflops": 10.0}, "student": {"params": 1, "gflops": 1.0}}
    monkeypatch.setattr(bench, "_train_or_resume", train_or_resume)
    monkeypatch.setattr(bench, "generate_shapes", lambda *a, **k: None)
    monkeypatch.setattr(bench, "summarize", lambda cfg: {**sizes, "ratio": {"gflops": 0.1}})
    args = ["--teacher", str(teacher), "--seeds", "0,1", "--data", str(tmp_path / "d")]
    result = bench.run(bench.parse_args(args), args)

    models = result["models"]
    assert models["teacher"]["map"] == {"mean": 0.6, "runs": 1}  # one run: no spread
    assert models["box KD only"]["map"] == {"mean": 0.21, "runs": 1}
    assert models["student"]["map"] == {
        "mean": pytest.approx(0.25),
        "runs": 2,
        "std": pytest.approx(0.05),
    }
    assert models["student + KD"]["map"]["std"] == pytest.approx(0.025)
    # (mean KD - mean plain) / (teacher - mean plain) = (0.375 - 0.25) / (0.6 - 0.25)
    assert result["gap_closed"] == pytest.approx(0.125 / 0.35)
    assert result["kd_beats_plain_every_seed"] is True  # 0.40 > 0.20 and 0.35 > 0.30
    goals = result["goals"]
    assert goals["gap_closed"]["met"] is False  # 0.357 < 0.5
    assert goals["teacher_minus_plain"]["value"] == pytest.approx(0.35)
    assert goals["teacher_train_minutes"] == {"value": 80.0, "goal": "≤ 90", "met": True}
    # a group's 6 min shared by its 9 (seed 0) or 2 (seed 1) models, averaged over seeds
    assert goals["student_train_minutes"]["value"] == pytest.approx((6.0 / 9 + 6.0 / 2) / 2)
    table = bench.format_table(result)
    assert "| teacher | 0.600 | " in table and "| student | 0.250 ± 0.050 | " in table
