"""distill demo end to end on a tiny budget."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import distill.experiments.demo as demo_module
from distill.config import load_config
from distill.engine.build import check_lockstep
from distill.engine.loop import TrainingStopped
from tests.conftest import REPO, load_script


def expected_verdict(models: dict[str, dict[str, float]]) -> str:
    """The verdict that the measured mAPs imply, by the demo's goals (+0.05 mAP, 30% of the gap)."""
    teacher, plain, kd = (models[n]["map"] for n in ("teacher", "student", "student + KD"))
    if not teacher > plain:
        return "is not better than the plain student"
    if kd - plain >= 0.05 and (kd - plain) / (teacher - plain) >= 0.30:
        return "Distillation clearly helped"
    return "Distillation helped a little" if kd > plain else "Distillation did not help"


@pytest.mark.slow
def test_demo_end_to_end_and_teacher_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {"DEMO_TRAIN": 16, "DEMO_VAL": 4, "TEACHER_STEPS": 2,
                        "STUDENT_STEPS": 2}.items():  # fmt: skip
        monkeypatch.setattr(demo_module, name, value)
    out, data, record = tmp_path / "runs", tmp_path / "data", tmp_path / "demo.json"
    # a record names an instruction-set cap in its command ("ALL": no cap, whenever it is read)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    # a stop during the teacher keeps its checkpoint; the next demo continues it from there
    train = demo_module.train
    monkeypatch.setattr(demo_module, "train", lambda cfg, **kw: train(cfg, stop_after=1, **kw))
    with pytest.raises(TrainingStopped, match="distill demo again: it continues"):
        demo_module.demo(out=out, data_root=data, minutes=0)
    assert not (out / "teacher" / "teacher.pt").exists()
    monkeypatch.setattr(demo_module, "train", train)
    result = demo_module.demo(out=out, data_root=data, record=record)  # probes, then fits
    assert list(result["continued"]) == ["teacher"]
    assert result["continued"]["teacher"]["from_step"] == 1
    assert "continuing the teacher from step 1 of an earlier run" in result["note"]
    assert list(result["rows"]) == ["teacher", "student", "student + KD"]
    plan = result["plan"]
    assert set(plan["seconds"]) == {"teacher", "student", "student + KD"}
    assert all(s > 0 for s in plan["seconds"].values())
    # a tiny schedule stays whole (on a busy CPU the probe may ask for less: MIN_SCALE keeps it)
    assert plan["steps"] == {"teacher": 2, "student": 2, "student + KD": 2}
    printed = capsys.readouterr().out
    for row in ("| teacher | 2 |", "| student | 2 |", "| student + KD | 2 |"):
        assert row in printed
    for run in ("teacher/teacher.pt", "student/student.pt", "distill/student.pt"):
        assert (out / run).is_file(), run
    # the students trained in lockstep: one run, one checkpoint folder, the same teacher
    assert (out / "students" / "checkpoints").is_dir()
    kd_metrics = json.loads((out / "distill" / "metrics.json").read_text())
    assert kd_metrics["teacher_digest"] == result["rows"]["student"]["teacher_digest"] != ""
    # sizes are measured: the student is the lighter model
    assert result["sizes"]["student"]["gflops"] < result["sizes"]["teacher"]["gflops"]
    # the verdict is the one this run's numbers imply, and the benchmark is quoted as such
    assert expected_verdict(result["models"]) in printed
    assert "Not measured in this run: the committed benchmark" in printed

    # --record: the same numbers as JSON, which the README's table is generated from
    recorded = json.loads(record.read_text())
    assert recorded["command"].startswith("ONEDNN_MAX_CPU_ISA=ALL distill demo --out ")
    assert recorded["machine"]["onednn_max_cpu_isa"] == "ALL"
    assert recorded["models"]["teacher"]["map"] == result["rows"]["teacher"]["map"]
    assert recorded["verdict"] == result["verdict"] and recorded["machine"]["cores"] >= 1
    met = recorded["goals"]["teacher_map"]["met"]
    assert met == (recorded["models"]["teacher"]["map"] >= 0.30)
    section = _readme_tables().section("demo", recorded)
    assert "| student + KD | 2 |" in section and recorded["date"] in section

    # a second demo reuses the trained teacher and gives the students the whole budget (probed
    # seconds of a fast machine: the students may train MAX_STUDENT_SCALE times their reference)
    probed: list[list[str]] = []

    def probe(configs: dict[str, Any]) -> dict[str, float]:
        probed.append(list(configs))
        return dict.fromkeys(configs, 0.01)

    monkeypatch.setattr(demo_module, "probe_seconds", probe)
    again = demo_module.demo(out=out, data_root=data)
    assert probed == [["student", "student + KD"]]  # the reused teacher is not timed
    assert again["continued"] == {}
    assert math.isnan(again["minutes"]["teacher"])
    assert again["plan"]["steps"]["student"] == 2 * demo_module.MAX_STUDENT_SCALE
    assert again["rows"]["teacher"]["map"] == result["rows"]["teacher"]["map"]
    assert "| teacher | reused |" in capsys.readouterr().out


def test_the_schedule_shrinks_by_one_factor_to_fit_the_budget() -> None:
    # seconds per step where the demo imitated an AVX2-only CPU (fp32, 96 px; the KD step has
    # the teacher's forward): the reference schedule would train for 14 min
    seconds = {"teacher": 0.85, "student": 0.16, "student + KD": 0.51}
    plan = demo_module.plan_steps(seconds, minutes=15)
    reference = demo_module.reference_steps()
    budget = 15 * 60 * demo_module.TRAIN_SHARE
    assert plan["scale"] == pytest.approx(
        budget / sum(reference[n] * s for n, s in seconds.items())
    )
    for name, steps in plan["steps"].items():
        assert steps == round(reference[name] * plan["scale"])
    trained = sum(plan["steps"][n] * s for n, s in seconds.items())
    rounding = 0.5 * sum(seconds.values())  # each count is rounded to a whole step
    assert trained <= budget + rounding
    text = demo_module.describe_plan(plan, 15)
    predicted = sum(reference[n] * s for n, s in seconds.items()) / 60  # 14 min
    assert f"would train for {predicted:.0f} min" in text and "--minutes 0" in text
    assert f"shortened to {plan['scale']:.2g}x of it" in text

    # a reused teacher: only the students train, so their schedule shrinks less...
    students = {"student": 0.35, "student + KD": 1.0}
    assert 0.9 < demo_module.plan_steps(students, minutes=15)["scale"] < 0.95
    # ...or grows, up to MAX_STUDENT_SCALE times the reference, where they are fast
    fast = demo_module.plan_steps({"student": 0.05, "student + KD": 0.1}, minutes=15)
    assert fast["steps"]["student"] == round(reference["student"] * demo_module.MAX_STUDENT_SCALE)
    assert "students train 3.0x" in demo_module.describe_plan(fast, 15)
    # with the teacher to train: never longer than the reference
    assert demo_module.plan_steps({"teacher": 1e-3}, minutes=15)["steps"] == reference
    assert "past the budget" not in text and not plan["over_budget"]


def test_a_machine_too_slow_for_the_budget_trains_the_shortest_schedule_that_works() -> None:
    # Issue 34's AVX2-only EPYC (fp32, 96 px): 3.78 s a teacher step. The budget alone would leave
    # the teacher a fifth of its steps, too few to learn the task: the demo trains MIN_SCALE of
    # the reference instead, and says before training how long that takes here.
    seconds = {"teacher": 3.78, "student": 0.6, "student + KD": 2.0}
    reference = demo_module.reference_steps()
    plan = demo_module.plan_steps(seconds, minutes=15)
    assert plan["over_budget"] and plan["scale"] == demo_module.MIN_SCALE
    assert plan["steps"] == {n: round(s * demo_module.MIN_SCALE) for n, s in reference.items()}
    trained = sum(plan["steps"][n] * s for n, s in seconds.items()) / 60
    assert plan["minutes"] == pytest.approx(trained) and trained > 15
    text = demo_module.describe_plan(plan, 15)
    assert f"trains for about {trained:.0f} min here" in text and "past the budget" in text
    assert f"would train for {plan['predicted'] / 60:.0f} min" in text
    # a budget that holds MIN_SCALE of the reference is used whole, not exceeded
    enough = demo_module.reference_seconds(seconds) * demo_module.MIN_SCALE / 60
    fits = demo_module.plan_steps(seconds, minutes=enough / demo_module.TRAIN_SHARE + 0.1)
    assert not fits["over_budget"] and fits["scale"] > demo_module.MIN_SCALE
    # a teacher an earlier demo stopped at step 300 of 450 keeps its schedule; its 150 steps
    # left come first, and the students fit what remains
    students = {"student": 0.16, "student + KD": 0.51}
    fast = {"teacher": 0.85, **students}
    go_on = demo_module.plan_steps(fast, minutes=10, continued={"teacher": (300, 450)})
    assert go_on["steps"]["teacher"] == 450 and not go_on["over_budget"]
    budget = 10 * 60 * demo_module.TRAIN_SHARE - 150 * 0.85
    assert go_on["scale"] == pytest.approx(budget / demo_module.reference_seconds(students))
    # tiny test schedules keep at least one step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_module, "TEACHER_STEPS", 1)
        patch.setattr(demo_module, "STUDENT_STEPS", 1)
        tiny = demo_module.plan_steps(seconds, minutes=0.01)["steps"]
        assert tiny == {"teacher": 1, "student": 1, "student + KD": 1}


def test_demo_configs_carry_the_planned_schedule(tmp_path: Path) -> None:
    steps = {"teacher": 300, "student": 100, "student + KD": 100}
    out, data, teacher = tmp_path / "out", tmp_path / "data", tmp_path / "t.pt"
    configs = demo_module.demo_configs(out, data, teacher, steps)
    assert configs["teacher"].train.max_steps == 300
    # each model's warm-up shrinks with its schedule: 60% of the teacher's 500 steps and 50
    assert configs["teacher"].train.warmup_steps == 30
    for name in ("student", "student + KD"):
        assert configs[name].train.max_steps == 100
        assert configs[name].train.warmup_steps == 17  # 100 of 600 steps, of a 100-step warm-up
        assert configs[name].teacher.weights == str(teacher)
    check_lockstep([configs["student"], configs["student + KD"]])  # one teacher forward for both
    assert (
        configs["student"].distill.feature.weight
        == 0
        < configs["student + KD"].distill.feature.weight
    )
    # the reference schedule is the one in configs/demo/*.yaml, as it is written there
    reference = demo_module.demo_configs(out, data, teacher)
    for name, file, warmup in (
        ("teacher", "teacher.yaml", 50),
        ("student + KD", "distill.yaml", 100),
    ):
        written = load_config(REPO / "configs" / "demo" / file).train
        assert reference[name].train.max_steps == written.max_steps
        assert reference[name].train.warmup_steps == written.warmup_steps == warmup
    assert reference["teacher"].train.max_steps == demo_module.TEACHER_STEPS
    assert reference["student"].train.max_steps == demo_module.STUDENT_STEPS


def test_a_teacher_of_another_task_is_not_reused(tmp_path: Path) -> None:
    from distill.config import Config
    from distill.data.shapes import CLASSES, generate_shapes
    from distill.models.card import write_card

    data = tmp_path / "data"
    generate_shapes(data, num_train=1, num_val=1, size=96, difficulty="demo")
    weights = tmp_path / "runs" / "teacher" / "teacher.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    demo_module.check_teacher_task(weights, data)  # no card: reused with a warning

    def card(names: tuple[str, ...]) -> None:
        cats = [
            {"id": CLASSES.index(n) + 1, "name": n, "label": i + 1} for i, n in enumerate(names)
        ]
        write_card(weights, Config(), "teacher", len(names) + 1, cats)

    card(("circle", "square", "triangle"))  # the demo's task, labelled as training labels it
    demo_module.check_teacher_task(weights, data)
    card(("circle", "square", "triangle", "ellipse"))  # the first demo task's teacher
    with pytest.raises(FileExistsError, match=r"learnt other classes .*ellipse.* give --out"):
        demo_module.check_teacher_task(weights, data)
    with pytest.raises(FileExistsError, match="leave out --teacher"):
        demo_module.check_teacher_task(weights, data, given=True)
    assert weights.is_file()  # nothing is deleted


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
        (["--record", "no/such/folder/demo.json"], "--record no/such/folder/demo.json: give"),
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


def _result(teacher: float, plain: float, kd: float) -> dict[str, Any]:
    size = {"gflops": 1.0, "params": 1, "latency_ms": 1.0}
    models = {
        "teacher": {"map": teacher, **size, "gflops": 10.0},
        "student": {"map": plain, **size},
        "student + KD": {"map": kd, **size},
    }
    result: dict[str, Any] = {"models": models, "total_minutes": 14.0}
    result["goals"] = demo_module.goals(result)
    return result


@pytest.mark.parametrize(
    ("maps", "words"),
    [
        ((0.01, 0.2, 0.19), "is not better than the plain student"),
        ((0.40, 0.10, 0.20), "Distillation clearly helped"),  # +0.10, 33% of the gap
        ((0.40, 0.10, 0.14), "Distillation helped a little"),  # +0.04
        ((0.80, 0.10, 0.16), "Distillation helped a little"),  # +0.06 but 9% of the gap
        ((0.40, 0.10, 0.09), "Distillation did not help"),
    ],
)
def test_the_verdict_follows_the_measured_numbers(
    maps: tuple[float, float, float], words: str
) -> None:
    result = _result(*maps)
    text = demo_module.verdict(result)
    assert words in text and words == expected_verdict(result["models"])
    assert "benchmark" not in text  # this run's numbers only


def test_goals_are_computed_from_the_run() -> None:
    goals = _result(0.40, 0.10, 0.20)["goals"]
    assert goals["teacher_map"] == {"value": 0.40, "goal": "≥ 0.3", "met": True}
    assert goals["kd_gain"]["value"] == pytest.approx(0.10) and goals["kd_gain"]["met"]
    assert goals["gap_closed"]["value"] == pytest.approx(1 / 3) and goals["gap_closed"]["met"]
    assert goals["gflops_ratio"] == {"value": 0.1, "goal": "≤ 0.2", "met": True}
    weak = _result(0.05, 0.10, 0.12)["goals"]
    assert not weak["teacher_map"]["met"] and not weak["gap_closed"]["met"]  # no gap: NaN


def test_benchmark_sentence_quotes_the_committed_benchmark_with_its_date(tmp_path: Path) -> None:
    bench = json.loads((REPO / "results" / "bench_kd.json").read_text())
    text = demo_module.benchmark_sentence(REPO / "results" / "bench_kd.json")
    kd = bench["models"]["student + KD"]["map"]["mean"]
    assert text.startswith(" Not measured in this run: the committed benchmark")
    assert (
        bench["date"][:10] in text and f"to {kd:.3f} ({bench['gap_closed']:.0%} of the gap" in text
    )
    assert demo_module.benchmark_sentence(tmp_path / "missing.json") == ""
    (tmp_path / "broken.json").write_text("{")
    assert demo_module.benchmark_sentence(tmp_path / "broken.json") == ""
    quick = tmp_path / "quick.json"
    quick.write_text(json.dumps({"quick": True, "models": {}}))
    assert demo_module.benchmark_sentence(quick) == ""
    # A teacher given with --teacher has no training time (NaN): the minutes are left out.
    for minutes, said in ((float("nan"), " task to mAP"), (88.4, " task for 88 min to mAP")):
        bench["models"]["teacher"]["train_minutes"] = minutes
        (tmp_path / "bench.json").write_text(json.dumps(bench))
        text = demo_module.benchmark_sentence(tmp_path / "bench.json")
        assert said in text and "nan" not in text


def _readme_tables() -> ModuleType:
    return load_script("readme_tables")
