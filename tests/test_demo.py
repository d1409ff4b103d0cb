"""distill demo end to end on a tiny budget."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import distill.experiments.costs as costs_module
import distill.experiments.demo as demo_module
from distill.config import load_config
from distill.config import replace as replace_config
from distill.engine.build import check_lockstep
from distill.engine.loop import TrainingStopped, train_batch
from distill.experiments.costs import RunCost
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
                        "STUDENT_STEPS": 2, "PROBE_STEPS": (1, 1)}.items():  # fmt: skip
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
    # probed as the demo trains: the teacher's run, and the students' in lockstep
    assert set(plan["seconds"]) == set(plan["costs"]) == {"teacher", "students"}
    assert all(c["step"] > 0 and c["end"] > 0 for c in plan["costs"].values())
    # the plan's minutes beside the wall's, of the demo and of each run
    assert result["planned_minutes"] == pytest.approx(
        plan["minutes"] + result["continued"]["teacher"]["minutes"]
    )
    assert plan["minutes"] > 0 and f"(planned {result['planned_minutes']:.1f})" in result["note"]
    for name, run in (("teacher", "teacher"), ("student", "students")):
        assert result["models"][name]["planned_minutes"] == plan["run_minutes"][run]
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
    assert recorded["planned_minutes"] == result["planned_minutes"]
    assert recorded["total_minutes"] == result["total_minutes"]
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

    def probe(configs: dict[str, Any]) -> dict[str, RunCost]:
        probed.append([cfg.output.dir for cfgs in configs.values() for cfg in cfgs])
        return {run: RunCost(0.0, 0.01, 0.0, 0.0, 1) for run in configs}

    monkeypatch.setattr(demo_module, "probe_costs", probe)
    again = demo_module.demo(out=out, data_root=data)
    # the reused teacher is not timed; the students are, together
    assert probed == [[str(out / "student"), str(out / "distill")]]
    assert again["continued"] == {}
    assert math.isnan(again["minutes"]["teacher"])
    assert again["plan"]["steps"]["student"] == 2 * demo_module.MAX_STUDENT_SCALE
    assert again["rows"]["teacher"]["map"] == result["rows"]["teacher"]["map"]
    assert "| teacher | reused |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_probe_times_the_students_in_lockstep_as_they_train(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's students, as train_group trains them: both in each batch of the run's own
    loader (its workers, its batch size), one frozen teacher; then its checkpoint and its end."""
    configs = demo_module.demo_configs(tmp_path / "runs", shapes_root, tmp_path / "t.pt")
    students = [
        replace_config(configs[n], **{"data.image_size": 64, "data.batch_size": 4})
        for n in demo_module.STUDENTS
    ]
    seen: list[tuple[int, bool, int, int]] = []

    def spy(run: Any, images: list[Any], targets: Any, epoch: int) -> Any:
        loader = run.train_loader
        seen.append((len(run.trainees), run.teacher is not None, len(images), loader.num_workers))
        return train_batch(run, images, targets, epoch)

    monkeypatch.setattr(costs_module, "train_batch", spy)
    cost = costs_module.probe_run(students, "student", warmup=1, steps=2)
    # 1 + 2 steps, then the first of a new epoch; each trains both students on the batch
    assert seen == [(2, True, 4, students[0].data.num_workers)] * 4
    assert students[0].data.num_workers == 2  # as the demo loads its batches
    assert cost.steps_per_epoch == 16 // 4  # the shared shapes set: 16 training images
    assert min(cost.start, cost.step, cost.epoch, cost.end) > 0
    assert not list(tmp_path.iterdir())  # the probe wrote into a scratch folder only


def test_a_run_costs_its_start_steps_epochs_and_end() -> None:
    cost = RunCost(start=10.0, step=1.0, epoch=3.0, end=5.0, steps_per_epoch=250)
    assert cost.seconds(454) == 10 + 454 + 2 * 3 + 5  # two epochs, each with its checkpoint
    assert cost.seconds(500) == 10 + 500 + 2 * 3 + 5
    assert cost.seconds(501) == 10 + 501 + 3 * 3 + 5
    # continued from step 300: its checkpoint is loaded, epochs 2 and 3 are left
    assert cost.seconds(600, done=300) == 10 + 3 + 300 + 2 * 3 + 5
    assert cost.per_step == 1.0 + 3 / 250


# What the demo's runs cost where it imitated an AVX2-only CPU (fp32, 96 px: results/demo-avx2.json
# and bench_demo_step-avx2.json; the students' step trains both, in lockstep), with a start, an
# end and a checkpoint of a few seconds.
AVX2 = {
    "teacher": RunCost(start=6.0, step=0.85, epoch=4.0, end=10.0, steps_per_epoch=250),
    "students": RunCost(start=8.0, step=0.67, epoch=2.0, end=12.0, steps_per_epoch=250),
}


def test_the_schedule_shrinks_by_one_factor_to_fit_the_budget() -> None:
    elapsed = 40.0  # data, sizes and the probe, spent before the plan
    plan = demo_module.plan_steps(AVX2, minutes=15, elapsed=elapsed)
    reference = demo_module.reference_steps()
    budget = 15 * 60 * demo_module.PLAN_SHARE - elapsed
    fixed = sum(c.start + c.end for c in AVX2.values())
    per_scale = 500 * AVX2["teacher"].per_step + 600 * AVX2["students"].per_step
    assert plan["scale"] == pytest.approx((budget - fixed) / per_scale)
    for name, steps in plan["steps"].items():
        assert steps == round(reference[name] * plan["scale"])
    # the minutes it announces: the whole demo, what was spent before the plan included
    runs = {"teacher": plan["steps"]["teacher"], "students": plan["steps"]["student"]}
    seconds = {run: AVX2[run].seconds(steps) for run, steps in runs.items()}
    assert plan["run_minutes"] == pytest.approx({r: s / 60 for r, s in seconds.items()})
    assert plan["minutes"] == pytest.approx((elapsed + sum(seconds.values())) / 60)
    # within the budget but for whole epochs and steps (planned pro rata, counted whole)
    slack = sum(c.epoch + c.step / 2 for c in AVX2.values())
    assert plan["minutes"] * 60 <= elapsed + budget + slack
    text = demo_module.describe_plan(plan, 15)
    predicted = (elapsed + AVX2["teacher"].seconds(500) + AVX2["students"].seconds(600)) / 60
    assert plan["predicted"] / 60 == pytest.approx(predicted)
    assert f"the demo would take {predicted:.0f} min" in text and "--minutes 0" in text
    assert f"shortened to {plan['scale']:.2g}x of it" in text
    assert f"the demo takes about {plan['minutes']:.1f} min here in all" in text
    assert "teacher 0.85 s, students 0.67 s a step" in text
    assert "past the budget" not in text and not plan["over_budget"]

    # a reused teacher: only the students train, so their schedule shrinks less...
    students = {"students": replace(AVX2["students"], step=1.35)}
    assert 0.9 < demo_module.plan_steps(students, minutes=15, elapsed=elapsed)["scale"] < 0.99
    # ...or grows, up to MAX_STUDENT_SCALE times the reference, where they are fast
    fast = demo_module.plan_steps({"students": replace(AVX2["students"], step=0.15)}, minutes=15)
    assert fast["steps"]["student"] == round(reference["student"] * demo_module.MAX_STUDENT_SCALE)
    assert fast["steps"]["teacher"] == reference["teacher"]  # not trained
    assert "students train 3.0x" in demo_module.describe_plan(fast, 15)
    # with the teacher to train: never longer than the reference
    quick = {run: replace(cost, step=1e-3) for run, cost in AVX2.items()}
    whole = demo_module.plan_steps(quick, minutes=15)
    assert whole["steps"] == reference
    assert "the reference schedule fits" in demo_module.describe_plan(whole, 15)


def test_a_machine_too_slow_for_the_budget_trains_the_shortest_schedule_that_works() -> None:
    # Issue 42's AVX2-only EPYC (2 cores): 1.2 s a teacher step, 1.0 s a lockstep step of the two
    # students. The budget alone would cut the teacher below what it needs to learn the task:
    # the demo trains MIN_SCALE of the reference instead, and says before training how long
    # the whole demo then takes here.
    epyc = {
        "teacher": replace(AVX2["teacher"], step=1.2),
        "students": replace(AVX2["students"], step=1.0),
    }
    reference = demo_module.reference_steps()
    plan = demo_module.plan_steps(epyc, minutes=15, elapsed=60)
    assert plan["over_budget"] and plan["scale"] == demo_module.MIN_SCALE
    assert plan["steps"] == {n: round(s * demo_module.MIN_SCALE) for n, s in reference.items()}
    took = (60 + epyc["teacher"].seconds(450) + epyc["students"].seconds(540)) / 60
    assert plan["minutes"] == pytest.approx(took) and took > 15
    text = demo_module.describe_plan(plan, 15)
    assert f"the demo takes about {took:.1f} min here in all, past the budget" in text
    assert f"would take {plan['predicted'] / 60:.0f} min" in text
    # a budget that holds MIN_SCALE of the reference is used whole, not exceeded
    enough = demo_module.MIN_SCALE * (
        500 * epyc["teacher"].per_step + 600 * epyc["students"].per_step
    )
    enough += 60 + sum(c.start + c.end for c in epyc.values())
    fits = demo_module.plan_steps(
        epyc, minutes=enough / 60 / demo_module.PLAN_SHARE + 0.1, elapsed=60
    )
    assert not fits["over_budget"] and fits["scale"] > demo_module.MIN_SCALE
    # a teacher an earlier demo stopped at step 300 of 450 keeps its schedule; its 150 steps
    # left come first, and the students fit what remains
    go_on = demo_module.plan_steps(AVX2, minutes=10, elapsed=30, continued={"teacher": (300, 450)})
    assert go_on["steps"]["teacher"] == 450 and not go_on["over_budget"]
    budget = 10 * 60 * demo_module.PLAN_SHARE - 30 - AVX2["teacher"].seconds(450, done=300)
    students = AVX2["students"]
    assert go_on["scale"] == pytest.approx(
        (budget - students.start - students.end) / (600 * students.per_step)
    )
    # tiny test schedules keep at least one step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_module, "TEACHER_STEPS", 1)
        patch.setattr(demo_module, "STUDENT_STEPS", 1)
        tiny = demo_module.plan_steps(epyc, minutes=0.01)["steps"]
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
        configs["student"].distill.feature.cwd.weight
        == 0
        < configs["student + KD"].distill.feature.cwd.weight
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
