"""distill demo end to end on a tiny budget, and the README tables being current."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import distill.demo as demo_module
from tests.conftest import REPO


@pytest.mark.slow
def test_demo_end_to_end_and_teacher_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {"DEMO_TRAIN": 16, "DEMO_VAL": 4, "DEMO_SIZE": 64, "TEACHER_STEPS": 2,
                        "STUDENT_STEPS": 2}.items():  # fmt: skip
        monkeypatch.setattr(demo_module, name, value)
    out, data = tmp_path / "runs", tmp_path / "data"
    result = demo_module.demo(out=out, data_root=data)  # 15-minute budget: probes, then fits
    assert list(result["rows"]) == ["teacher", "student", "student + KD"]
    plan = result["plan"]
    assert set(plan["seconds"]) == {"teacher", "student", "student + KD"}
    assert all(s > 0 for s in plan["seconds"].values())
    assert plan["scale"] == 1.0 and plan["steps"]["teacher"] == 2  # a tiny schedule fits
    printed = capsys.readouterr().out
    for row in ("| teacher |", "| student |", "| student + KD |"):
        assert row in printed
    for run in ("teacher/teacher.pt", "student/student.pt", "distill/student.pt"):
        assert (out / run).is_file(), run
    # sizes are measured: the student is the lighter model
    assert result["sizes"]["student"]["gflops"] < result["sizes"]["teacher"]["gflops"]
    # the verdict the run's own mAPs imply (the tiny teacher may or may not beat the student)
    maps = {name: row["map"] for name, row in result["rows"].items()}
    if maps["teacher"] > maps["student"]:
        gap = maps["teacher"] - maps["student"]
        gain = (maps["student + KD"] - maps["student"]) / gap
        assert f"Distillation moved the student from mAP {maps['student']:.3f}" in printed
        assert f"({gain:+.0%} of the {gap:.3f} gap to the teacher)" in printed
        assert "not better than the plain student" not in printed
    else:
        assert (
            f"The teacher (mAP {maps['teacher']:.3f}) is not better than the plain student ("
            f"{maps['student']:.3f})" in printed
        )
        assert "Distillation moved" not in printed

    # a second demo reuses the trained teacher instead of training it again
    again = demo_module.demo(out=out, data_root=data, minutes=0)  # 0: no probe
    assert math.isnan(again["minutes"]["teacher"])
    assert again["plan"]["seconds"] == {}
    assert again["rows"]["teacher"]["map"] == result["rows"]["teacher"]["map"]


def test_the_schedule_shrinks_by_one_factor_to_fit_the_budget() -> None:
    # seconds per step measured by the probe on a 2-core AVX2-only CPU (fp32): 43.5 min
    seconds = {"teacher": 2.8, "student": 0.53, "student + KD": 1.33}
    plan = demo_module.plan_steps(seconds, minutes=15)
    reference = demo_module.reference_steps()
    assert 0.25 < plan["scale"] < 0.3
    for name, steps in plan["steps"].items():
        assert steps == round(reference[name] * plan["scale"])
    trained = sum(plan["steps"][n] * s for n, s in seconds.items())
    rounding = 0.5 * sum(seconds.values())  # each count is rounded to a whole step
    assert trained <= 15 * 60 * demo_module.TRAIN_SHARE + rounding
    text = demo_module.describe_plan(plan, 15)
    assert "would train for 44 min" in text and "--minutes 0" in text

    # a reused teacher: only the students train, so their schedule shrinks less
    students = {"student": 0.53, "student + KD": 1.33}
    assert 0.7 < demo_module.plan_steps(students, minutes=15)["scale"] < 0.8
    assert demo_module.plan_steps({"student": 0.2}, minutes=15)["steps"] == reference
    # never longer than the reference, never shorter than MIN_STEPS
    assert demo_module.plan_steps({"teacher": 1e-3}, minutes=15)["steps"] == reference
    tiny = demo_module.plan_steps(seconds, minutes=0.5)["steps"]
    assert min(tiny.values()) == demo_module.MIN_STEPS


def test_demo_configs_carry_the_planned_schedule(tmp_path: Path) -> None:
    steps = {"teacher": 300, "student": 100, "student + KD": 100}
    out, data, teacher = tmp_path / "out", tmp_path / "data", tmp_path / "t.pt"
    configs = demo_module.demo_configs(out, data, teacher, steps)
    assert configs["teacher"].train.max_steps == 300
    assert configs["teacher"].train.warmup_steps == 50  # half the schedule, half the warm-up
    for name in ("student", "student + KD"):
        assert configs[name].train.max_steps == 100
        assert configs[name].train.warmup_steps == 20
        assert configs[name].teacher.weights == str(teacher)
    reference = demo_module.demo_configs(out, data, teacher)
    assert reference["teacher"].train.max_steps == demo_module.TEACHER_STEPS
    assert reference["student"].train.warmup_steps == demo_module.WARMUP_STEPS


def test_demo_minutes_on_the_command_line() -> None:
    from distill.cli import build_parser

    assert build_parser().parse_args(["demo"]).minutes == demo_module.MINUTES
    assert build_parser().parse_args(["demo", "--minutes", "0"]).minutes == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--teacher", "missing.pt"], "--teacher missing.pt: no such file"),
        (["--minutes", "-5"], "--minutes -5.0: give a budget >= 0"),
        (["--minutes", "nan"], "--minutes nan"),
    ],
)
def test_demo_arguments_are_checked_before_anything_runs(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.cli import main

    out = tmp_path / "runs"
    assert main(["demo", "--out", str(out), "--data", str(tmp_path / "data"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "data").exists()


def test_verdict_says_plainly_when_the_teacher_is_too_weak() -> None:
    weak = {"teacher": {"map": 0.01}, "student": {"map": 0.2}, "student + KD": {"map": 0.19}}
    text = demo_module.verdict(weak, Path("t.pt"))
    assert "not better than the plain student" in text
    # and what the long schedule gave, read from the committed benchmark
    bench = json.loads((REPO / "results" / "bench_kd.json").read_text())
    kd = bench["models"]["student + KD"]["map"]["mean"]
    assert f"to {kd:.3f} ({bench['gap_closed']:.0%} of the gap" in text
    # labelled as the committed benchmark's, not this run's, with the benchmark's date
    assert (
        f"Not measured in this run: in the committed benchmark (results/bench_kd.json, run "
        f"{bench['date'][:10]} on " in text
    )


def test_benchmark_sentence_is_empty_without_a_full_benchmark(tmp_path: Path) -> None:
    assert demo_module.benchmark_sentence(tmp_path / "missing.json") == ""
    (tmp_path / "broken.json").write_text("{")
    assert demo_module.benchmark_sentence(tmp_path / "broken.json") == ""
    quick = tmp_path / "quick.json"
    quick.write_text(json.dumps({"quick": True, "models": {}}))
    assert demo_module.benchmark_sentence(quick) == ""
    good = {"teacher": {"map": 0.6}, "student": {"map": 0.4}, "student + KD": {"map": 0.5}}
    text = demo_module.verdict(good, Path("t.pt"))
    assert "+50% of the 0.200 gap" in text
    assert "in the committed benchmark" in text  # minutes-long models are put in context


def test_readme_tables_are_generated_from_results() -> None:
    from tests.test_readme_tables import load_tables

    readme = (REPO / "README.md").read_text()
    assert load_tables().render(readme) == readme, "run: python scripts/readme_tables.py"
