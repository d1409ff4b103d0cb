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
    result = demo_module.demo(out=out, data_root=data)
    assert list(result["rows"]) == ["teacher", "student", "student + KD"]
    printed = capsys.readouterr().out
    for row in ("| teacher |", "| student |", "| student + KD |"):
        assert row in printed
    for run in ("teacher/teacher.pt", "student/student.pt", "distill/student.pt"):
        assert (out / run).is_file(), run
    # sizes are measured: the student is the lighter model
    assert result["sizes"]["student"]["gflops"] < result["sizes"]["teacher"]["gflops"]
    assert "Distillation moved" in printed or "not better than the plain student" in printed

    # a second demo reuses the trained teacher instead of training it again
    again = demo_module.demo(out=out, data_root=data)
    assert math.isnan(again["minutes"]["teacher"])
    assert again["rows"]["teacher"]["map"] == result["rows"]["teacher"]["map"]


def test_verdict_says_plainly_when_the_teacher_is_too_weak() -> None:
    weak = {"teacher": {"map": 0.01}, "student": {"map": 0.2}, "student + KD": {"map": 0.19}}
    text = demo_module.verdict(weak, Path("t.pt"))
    assert "not better than the plain student" in text
    # and what the long schedule gave, read from the committed benchmark
    bench = json.loads((REPO / "results" / "bench_kd.json").read_text())
    kd = bench["models"]["student + KD"]["map"]["mean"]
    assert f"to {kd:.3f} ({bench['gap_closed']:.0%} of the gap" in text


def test_benchmark_sentence_is_empty_without_a_full_benchmark(tmp_path: Path) -> None:
    assert demo_module.benchmark_sentence(tmp_path / "missing.json") == ""
    (tmp_path / "broken.json").write_text("{")
    assert demo_module.benchmark_sentence(tmp_path / "broken.json") == ""
    quick = tmp_path / "quick.json"
    quick.write_text(json.dumps({"quick": True, "models": {}}))
    assert demo_module.benchmark_sentence(quick) == ""
    good = {"teacher": {"map": 0.6}, "student": {"map": 0.4}, "student + KD": {"map": 0.5}}
    assert "+50% of the 0.200 gap" in demo_module.verdict(good, Path("t.pt"))


def test_readme_tables_are_generated_from_results() -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "readme_tables", REPO / "scripts" / "readme_tables.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_tables"] = module
    spec.loader.exec_module(module)
    readme = (REPO / "README.md").read_text()
    assert module.render(readme) == readme, "run: python scripts/readme_tables.py"
