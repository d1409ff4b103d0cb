"""``distill demo``: distillation end to end on CPU within ~15 minutes, measured in this run.

1. generate the demo's shapes task once (kept while it matches): ``DEMO_TRAIN`` + ``DEMO_VAL``
   images of ``DEMO_SIZE`` px, difficulty ``demo`` (circle, square and triangle, 2-6 objects an
   image; made for a from-scratch ResNet50-FPN to converge within minutes, not for fidelity to
   the benchmark),
2. fit the schedule to the time budget (``--minutes``): measure what each training run costs on
   this machine (``costs.probe_run``: the teacher's run, and the two students' in lockstep as
   they train, data loading, checkpoints and evaluation included), shorten the reference
   schedule if the demo would not fit, but never below ``MIN_SCALE`` of it (a machine too slow
   for that trains that, past the budget, and is told), and say how long the demo will take,
3. train the teacher (``configs/demo/teacher.yaml``), or reuse ``OUT/teacher/teacher.pt`` or
   ``--teacher FILE`` (if its card's classes are the task's); a reused teacher leaves the whole
   budget to the students. A run an earlier demo started and a stop cut short (the teacher, or
   the students with a reused teacher) is continued from its last checkpoint,
4. train the plain student and the distilled student (``configs/demo/distill.yaml``, the plain
   one with every KD weight 0) in lockstep: one data loader and one teacher forward per batch,
5. print one table (mAP, AP50, params, GFLOPs, latency) and the verdict those numbers imply;
   ``--record FILE`` writes them as JSON (``scripts/readme_tables.py`` puts them in the README).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import torch

from distill.config import Config, ConfigError, flatten, load_config, override, replace
from distill.data.shapes import DEMO_DATA, DEMO_OUT, generate_shapes
from distill.engine.checkpoint import (
    CheckpointError,
    RunExistsError,
    check_fresh,
    find_checkpoint,
    has_checkpoint,
    read_progress,
)
from distill.engine.loop import train, train_group
from distill.evaluation.cost import summarize
from distill.evaluation.evaluate import run_metrics
from distill.experiments.costs import RunCost, probe_run
from distill.experiments.goals import Goal, check_goals
from distill.experiments.machine import instruction_set_caps, machine
from distill.experiments.sweep import plain_overrides
from distill.fileio import FileFormatError, read_json, write_json
from distill.models.card import read_card
from distill.shipped import shipped_path

CONFIGS = shipped_path("configs", "demo")  # in the installed package, or the clone's configs/
BENCH_KD = shipped_path("results", "bench_kd.json")

DEMO_TRAIN, DEMO_VAL, DEMO_SIZE, DEMO_DIFFICULTY = 2000, 200, 96, "demo"
# The reference schedule (configs/demo/*.yaml train.max_steps): the steps the teacher needs to
# converge, the rest to the students (their curves: README, "How the recipes were chosen").
TEACHER_STEPS = 500
STUDENT_STEPS = 600  # both students, in lockstep
MINUTES = 15.0
# The share of the budget the plan fills: the rest is for what the probe cannot foresee (the step
# time drifts by a few percent over a run, more on a CPU that other work shares).
PLAN_SHARE = 0.95
# The shortest schedule the budget may cut the reference to, as a share of it: below it the
# teacher has not converged and the demo cannot show distillation (cut to 0.78x, the teacher had
# mAP 0.258, short of the 0.30 goal; at 0.91x it had 0.394: README, "How the recipes were
# chosen"). A machine too slow for it within the budget trains this schedule, past the budget,
# and is told so before training starts.
MIN_SCALE = 0.9
# With a reused teacher the students get the whole budget, up to this many times their
# reference schedule (the KD recipe was measured up to there on the benchmark: 750-900 steps).
MAX_STUDENT_SCALE = 3.0
STUDENTS = ("student", "student + KD")
# Steps the probe times of each run: warm-up steps, then the steps it averages.
PROBE_STEPS = (2, 4)
# The demo's training runs (a train_group call each) and the models each trains.
RUNS: dict[str, tuple[str, ...]] = {"teacher": ("teacher",), "students": STUDENTS}
# What "distillation clearly helped" means here (issue 25's goals for a host with native bf16).
GOALS: dict[str, Goal] = {
    "teacher_map": ("teacher mAP", ">=", 0.30),
    "kd_gain": ("student + KD minus student (mAP)", ">=", 0.05),
    "gap_closed": ("share of the teacher-student gap closed", ">=", 0.30),
    "gflops_ratio": ("student / teacher GFLOPs", "<=", 0.20),
    "total_minutes": ("demo wall time (min)", "<=", 15.0),
}

log = logging.getLogger(__name__)
AGAIN = "run distill demo again: it continues where this one stopped"  # after a stop


def check_teacher_task(teacher_weights: Path, data_root: Path, given: bool = False) -> None:
    """FileExistsError unless the teacher's card (``teacher.json`` beside it) names the classes
    of the dataset in ``data_root``: a teacher of an earlier demo task, say, is not reused. A
    teacher without a card is reused with a warning. ``given``: it came from ``--teacher``."""

    card = read_card(teacher_weights)  # CardError for a broken card
    if card is None:
        log.warning(
            "%s has no card: cannot check that it learnt the demo's classes", teacher_weights
        )
        return
    learnt = sorted((int(c["id"]), str(c["name"])) for c in card["categories"])
    coco = read_json(data_root / "val.json")
    try:
        task = sorted((int(c["id"]), str(c["name"])) for c in coco["categories"])
    except (KeyError, TypeError, ValueError):
        raise FileFormatError(
            f"{data_root / 'val.json'}: no COCO categories in it (id and name each)"
        ) from None
    if learnt == task:
        return
    names = ", ".join(name for _, name in learnt)
    advice = (
        "give a teacher of this task, or leave out --teacher"
        if given
        else f"move {teacher_weights.parent} away, or give --out another folder"
    )
    raise FileExistsError(
        f"{teacher_weights} learnt other classes ({names}) than the demo's task in {data_root} "
        f"({', '.join(name for _, name in task)}): {advice}"
    )


# What a rerun of the demo may change in a run it wrote: the schedule fitted to this machine,
# where the data and the teacher are, where the run is (a relative --out from elsewhere).
OWN_RUN_MAY_DIFFER = (
    "train.max_steps", "train.warmup_steps", "data.root", "teacher.weights", "output.dir",
)  # fmt: skip


def check_out(out: Path, configs: Mapping[str, Config], reuse_teacher: bool) -> None:
    """FileExistsError (one line, naming the folder) if ``out`` holds a run the demo would
    overwrite that is not its own: every run folder it trains into (``configs``' output.dir,
    the teacher's unless a finished teacher is reused, and ``out/students``, the students'
    checkpoints) must hold no run, or one the demo wrote (its config.yaml is the demo's but for
    ``OWN_RUN_MAY_DIFFER``; the checkpoints are the demo students'). Runs the demo wrote are
    trained anew, as a second ``distill demo`` does; nobody else's run is ever replaced."""

    def refuse(run_dir: Path, why: str) -> NoReturn:
        raise FileExistsError(
            f"--out {out}: {run_dir} holds a run that is not the demo's own ({why}); the demo "
            "would overwrite it: give --out a new folder, or move the run away"
        )

    names = [n for n in configs if not (reuse_teacher and n == "teacher")]
    for name in names:
        run_dir = Path(configs[name].output.dir)
        if not _holds_run(run_dir):
            continue
        try:
            saved = flatten(load_config(run_dir / "config.yaml"))
        except ConfigError:
            refuse(run_dir, "no readable config.yaml")
        wanted = flatten(configs[name])
        differ = [k for k in wanted if k not in OWN_RUN_MAY_DIFFER and saved.get(k) != wanted[k]]
        if differ:
            refuse(run_dir, f"its config.yaml differs from the demo's {name} in {differ[0]}")
    students = out / "students"
    if _holds_run(students):
        models = [os.path.relpath(configs[n].output.dir, students) for n in STUDENTS]
        try:
            progress = read_progress(find_checkpoint(students, fallback=True))
        except CheckpointError:
            refuse(students, "no readable checkpoint")
        if progress.models != models:
            refuse(students, f"its checkpoints are of {progress.models}, not the demo's {models}")


def _holds_run(run_dir: Path) -> bool:
    """Whether a fresh run in ``run_dir`` would replace one (``check_fresh``)."""
    try:
        check_fresh(run_dir)
    except RunExistsError:
        return True
    return False


def unfinished(run_dir: Path, checkpoint_dir: Path) -> tuple[int, int, float] | None:
    """(steps taken, steps planned, seconds trained) of the run in ``run_dir``, checkpointed in
    ``checkpoint_dir``, if it stopped before its last step (a stop signal, a closed terminal);
    None if there is none to continue. ``check_out`` has made sure it is the demo's own."""
    if not has_checkpoint(checkpoint_dir) or not (run_dir / "config.yaml").is_file():
        return None
    try:
        progress = read_progress(find_checkpoint(checkpoint_dir, fallback=True))
        planned = load_config(run_dir / "config.yaml").train.max_steps
    except (CheckpointError, ConfigError) as err:
        log.warning("%s; training %s anew", err, run_dir)
        return None
    if planned is None or progress.step >= planned:
        return None
    return progress.step, planned, progress.seconds


def reference_steps() -> dict[str, int]:
    return {"teacher": TEACHER_STEPS, "student": STUDENT_STEPS, "student + KD": STUDENT_STEPS}


def demo_configs(
    out: Path, data_root: Path, teacher_weights: Path, steps: Mapping[str, int] | None = None
) -> dict[str, Config]:
    """The three demo configs: ``configs/demo/*.yaml`` with the demo's data, schedule (``steps``
    per model; the reference schedule by default) and dirs. The two students share every
    section but ``distill`` and ``output`` (lockstep)."""

    reference = reference_steps()
    steps = steps or reference

    def scheduled(cfg: Config, name: str) -> Config:
        """``cfg`` with ``steps[name]`` steps and its warm-up scaled as its schedule is."""
        warmup = max(1, round(cfg.train.warmup_steps * steps[name] / reference[name]))
        return replace(cfg, **{"train.max_steps": steps[name], "train.warmup_steps": warmup})

    # override(): the paths as they are, whatever they hold (``runs/demo #1`` is no comment)
    common = [override("data.root", data_root), override("data.image_size", DEMO_SIZE)]
    teacher = load_config(
        CONFIGS / "teacher.yaml", [*common, override("output.dir", out / "teacher")]
    )
    students = [*common, override("teacher.weights", teacher_weights)]
    plain = load_config(
        CONFIGS / "distill.yaml",
        [*students, *plain_overrides(), override("output.dir", out / "student")],
    )
    distilled = load_config(
        CONFIGS / "distill.yaml", [*students, override("output.dir", out / "distill")]
    )
    teacher = scheduled(teacher, "teacher")
    plain, distilled = scheduled(plain, "student"), scheduled(distilled, "student + KD")
    return {"teacher": teacher, "student": plain, "student + KD": distilled}


def demo(
    out: Path = DEMO_OUT,
    data_root: Path = DEMO_DATA,
    teacher: Path | None = None,
    minutes: float = MINUTES,
    record: Path | None = None,
) -> dict[str, Any]:
    """minutes: the time budget the schedule is fitted to (0: the reference schedule as is).
    record: also write the result (table, verdict, goals, machine, date) to this JSON file."""

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    start = time.perf_counter()
    teacher_weights = teacher or out / "teacher" / "teacher.pt"
    reuse_teacher = teacher_weights.is_file()
    check_out(out, demo_configs(out, data_root, teacher_weights), reuse_teacher)  # before writing
    # Made once; a complete dataset of these arguments is kept, any other one is refused.
    generate_shapes(
        data_root,
        num_train=DEMO_TRAIN,
        num_val=DEMO_VAL,
        size=DEMO_SIZE,
        seed=0,
        difficulty=DEMO_DIFFICULTY,
    )
    if reuse_teacher:
        check_teacher_task(teacher_weights, data_root, given=teacher is not None)
    # Runs an earlier demo started and a stop cut short are continued, on their own schedule;
    # the students' only with the teacher they started with (a reused one).
    continued: dict[str, tuple[int, int, float]] = {}
    if not reuse_teacher and (left := unfinished(out / "teacher", out / "teacher")):
        continued["teacher"] = left
    if reuse_teacher and (left := unfinished(out / "distill", out / "students")):
        continued.update(dict.fromkeys(STUDENTS, left))
    earlier_runs = [n for n in ("teacher", "student") if n in continued]  # one per run folder
    for run in earlier_runs:
        done, planned, _ = continued[run]
        log.info("continuing the %s from step %d of %d", _runs_of(run), done, planned)
    schedule = {n: (done, planned) for n, (done, planned, _) in continued.items()}
    plan: dict[str, Any] = {
        "scale": 1.0,
        "steps": {**reference_steps(), **{n: p for n, (_, p) in schedule.items()}},
        "seconds": {},
    }
    configs = demo_configs(out, data_root, teacher_weights, plan["steps"])
    # Before the plan: the sizes take the same time whatever the schedule, so it is spent then,
    # not predicted.
    sizes = summarize(configs["student + KD"])
    if minutes > 0:
        runs = [r for r in RUNS if not (reuse_teacher and r == "teacher")]
        costs = probe_costs({r: [configs[n] for n in RUNS[r]] for r in runs})
        kept = {r: schedule[m[0]] for r, m in RUNS.items() if m[0] in schedule}
        plan = plan_steps(costs, minutes, time.perf_counter() - start, kept)
        log.log(
            logging.WARNING if plan["over_budget"] else logging.INFO,
            "%s",
            describe_plan(plan, minutes),
        )
        configs = demo_configs(out, data_root, teacher_weights, plan["steps"])
    steps = plan["steps"]

    rows: dict[str, dict[str, Any]] = {}
    spent: dict[str, float] = {}
    if reuse_teacher:
        log.info("reusing the teacher in %s", teacher_weights)
        rows["teacher"] = run_metrics(teacher_weights) or {}
        spent["teacher"] = float("nan")
        teacher_run = f"teacher reused from {teacher_weights}"
    else:
        tic = time.perf_counter()
        go_on = "teacher" in continued
        rows["teacher"] = train(
            configs["teacher"], job="teacher", resume=out / "teacher" if go_on else None,
            fallback=go_on, overwrite=True, resume_hint=AGAIN,
        )  # fmt: skip
        spent["teacher"] = (time.perf_counter() - tic) / 60
        teacher_run = f"teacher {steps['teacher']} steps"
    tic = time.perf_counter()
    go_on = "student" in continued
    student_rows = train_group(
        [configs[n] for n in STUDENTS], "student", out / "students", resume=go_on,
        fallback=go_on, overwrite=True, resume_hint=AGAIN,
    )  # fmt: skip
    for name, metrics in zip(STUDENTS, student_rows):
        rows[name] = metrics
        spent[name] = (time.perf_counter() - tic) / 60  # the lockstep pair's wall time

    size_of = {"teacher": sizes["teacher"], **{n: sizes["student"] for n in STUDENTS}}
    total = (time.perf_counter() - start) / 60
    # a run continued here counts the training an earlier demo gave it
    earlier = sum(continued[n][2] for n in earlier_runs) / 60
    total += earlier
    # what the plan said, on the same terms (None: no plan, --minutes 0)
    plan_said = plan["minutes"] + earlier if "minutes" in plan else None
    took = "" if plan_said is None else f" (planned {plan_said:.1f})"
    if earlier_runs:
        since = ", ".join(f"{_runs_of(n)} from step {continued[n][0]}" for n in earlier_runs)
        took += f" (continuing the {since} of an earlier run: its {earlier:.1f} min included)"
    run_minutes = plan.get("run_minutes", {})
    note = (
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}, total {total:.1f} min{took}; "
        f"{teacher_run}, "
        f"students {steps['student']} steps in lockstep (batch "
        f"{configs['student'].data.batch_size}, {configs['student'].data.image_size} px)."
    )
    result: dict[str, Any] = {
        "models": {
            name: {
                **{
                    k: rows[name].get(k, float("nan")) for k in ("map", "ap50", "aps", "apm", "apl")
                },
                "steps": None if name == "teacher" and reuse_teacher else steps[name],
                "train_minutes": spent[name],
                "planned_minutes": run_minutes.get(_runs_of(name)),  # of its run, like the above
                **{k: size_of[name][k] for k in ("params", "gflops", "latency_ms")},
            }
            for name in ("teacher", *STUDENTS)
        },
        "teacher_reused": reuse_teacher,
        "continued": {n: {"from_step": c[0], "minutes": c[2] / 60} for n, c in continued.items()},
        "plan": plan,
        "budget_minutes": minutes,
        "planned_minutes": plan_said,
        "total_minutes": total,
        "note": note,
    }
    result["goals"] = goals(result)
    result["verdict"] = verdict(result)
    print()
    print(format_demo_table(result))
    print(f"\n{note} Runs in {out}; `tensorboard --logdir {out}` shows the curves and detections.")
    if plan["scale"] != 1:
        print(describe_plan(plan, minutes))
    print(f"\n{result['verdict']}{benchmark_sentence(BENCH_KD)}")
    if record is not None:
        # the load average tells a run on a shared CPU from one on an idle one
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        result["machine"] = {**machine(), "load_average": load}
        result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        flags = {"--out": out, "--data": data_root, "--teacher": teacher, "--minutes": minutes}
        defaults = {
            "--out": DEMO_OUT,
            "--data": DEMO_DATA,
            "--minutes": MINUTES,
        }
        given = [
            f"{k} {shlex.quote(str(v))}"
            for k, v in flags.items()
            if v not in (None, defaults.get(k))
        ]
        result["command"] = " ".join(
            [
                *instruction_set_caps(),
                "distill demo",
                *given,
                f"--record {shlex.quote(str(record))}",
            ]
        )
        write_json(result, record)
        log.info("wrote %s", record)
    # callers (tests) get the rows and sizes by model, as before
    return {**result, "rows": rows, "sizes": size_of, "minutes": spent}


def probe_costs(configs: Mapping[str, Sequence[Config]]) -> dict[str, RunCost]:
    """What each of the demo's runs in ``configs`` (``RUNS``: "teacher", "students") costs on
    this machine, as it trains them (``costs.probe_run``: the two students in lockstep)."""
    job = {"teacher": "teacher", "students": "student"}
    return {run: probe_run(cfgs, job[run], *PROBE_STEPS) for run, cfgs in configs.items()}


def plan_steps(
    costs: Mapping[str, RunCost],
    minutes: float,
    elapsed: float = 0.0,
    continued: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """The schedule with which the whole demo takes ``PLAN_SHARE`` of ``minutes``: the reference
    schedule scaled by one factor. ``costs``: what each run to train costs here (``RUNS``:
    "teacher" unless it is reused, "students"; ``probe_costs``); ``elapsed``: the seconds the demo
    has spent already (data, sizes, the probe). With the teacher to train, never longer than the
    reference (the schedule the demo was measured with); with a reused teacher the students get
    the whole budget, up to ``MAX_STUDENT_SCALE`` times their reference. Never shorter than
    ``MIN_SCALE`` of it: a machine too slow for that within the budget trains that
    (``over_budget``). ``continued``: (steps taken, steps planned) of runs an earlier demo
    started, which keep their schedule.

    Returns the scale, the steps of each model, the seconds of a step of each run, each run's
    costs and its planned minutes (``run_minutes``), ``minutes``: the whole demo as planned
    (``elapsed`` included), ``predicted``: the seconds it would take with the reference schedule,
    and ``over_budget``."""
    reference = {"teacher": TEACHER_STEPS, "students": STUDENT_STEPS}
    continued = {run: c for run, c in (continued or {}).items() if run in costs}
    done = {run: continued[run][0] if run in continued else 0 for run in costs}
    kept = sum(costs[r].seconds(planned, done[r]) for r, (_, planned) in continued.items())
    free = [run for run in costs if run not in continued]
    budget = max(minutes, 0.0) * 60 * PLAN_SHARE - elapsed - kept
    # the free runs take fixed + scale * per_scale seconds (their epochs' costs pro rata)
    fixed = sum(costs[r].start + costs[r].end for r in free)
    per_scale = sum(reference[r] * costs[r].per_step for r in free)
    longest = 1.0 if "teacher" in costs else MAX_STUDENT_SCALE
    fitted = min(longest, (budget - fixed) / per_scale) if per_scale > 0 else 1.0
    scale = max(MIN_SCALE, fitted)
    steps = {run: max(1, round(n * scale)) for run, n in reference.items()}
    steps.update({run: planned for run, (_, planned) in continued.items()})
    if "teacher" not in costs and "teacher" not in continued:
        steps["teacher"] = reference["teacher"]  # not trained in this run
    seconds = {r: costs[r].seconds(steps[r], done[r]) for r in costs}
    as_reference = {r: costs[r].seconds(steps[r] if r in continued else n, done[r])
                    for r, n in reference.items() if r in costs}  # fmt: skip
    return {
        "scale": scale,
        "steps": {name: steps[_runs_of(name)] for name in reference_steps()},
        "seconds": {run: cost.step for run, cost in costs.items()},
        "costs": {run: asdict(cost) for run, cost in costs.items()},
        "run_minutes": {run: s / 60 for run, s in seconds.items()},
        "predicted": elapsed + sum(as_reference.values()),
        "over_budget": fitted < MIN_SCALE or budget < 0,
        "minutes": (elapsed + sum(seconds.values())) / 60,
    }


def describe_plan(plan: Mapping[str, Any], minutes: float) -> str:
    per_step = ", ".join(f"{run} {s:.2f} s" for run, s in plan["seconds"].items())
    steps = plan["steps"]
    trains_teacher = "teacher" in plan["seconds"]
    schedule = (
        f"teacher {steps['teacher']}, students {steps['student']} steps"
        if trains_teacher
        else f"students {steps['student']} steps (teacher reused)"
    )
    takes = f"the demo takes about {plan['minutes']:.1f} min here in all"
    if plan["scale"] == 1:
        return (
            f"Budget {minutes:g} min: the reference schedule fits ({schedule}; {per_step} a "
            f"step): {takes}."
        )
    if plan["scale"] > 1:
        return (
            f"Budget {minutes:g} min with the teacher reused: the students train "
            f"{plan['scale']:.1f}x their reference {STUDENT_STEPS} steps ({schedule}; {per_step} "
            f"a step): {takes}."
        )
    reference = (
        f"{TEACHER_STEPS}/{STUDENT_STEPS} steps" if trains_teacher else f"{STUDENT_STEPS} steps"
    )
    would = (
        f"Budget {minutes:g} min: with the reference schedule ({reference}) the demo would take "
        f"{plan['predicted'] / 60:.0f} min on this machine ({per_step} a step)"
    )
    if plan.get("over_budget"):
        return (
            f"{would}. The demo does not cut it below {MIN_SCALE:g}x, where the teacher no "
            f"longer converges: with that schedule ({schedule}) {takes}, past the budget. Is "
            "the CPU busy with other work? A stop (Ctrl-C) keeps what was trained, and the next "
            "`distill demo` continues where it stopped."
        )
    return (
        f"{would}, so it was shortened to {plan['scale']:.2g}x of it: {schedule}; {takes}. "
        "`distill demo --minutes 0` runs the reference schedule."
    )


def goals(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each of ``GOALS`` with this run's value and whether it was met."""
    models = result["models"]
    teacher, plain, kd = (models[n]["map"] for n in ("teacher", *STUDENTS))
    gap = teacher - plain
    values = {
        "teacher_map": teacher,
        "kd_gain": kd - plain,
        "gap_closed": (kd - plain) / gap if gap > 0 else float("nan"),
        "gflops_ratio": models["student"]["gflops"] / models["teacher"]["gflops"],
        "total_minutes": result["total_minutes"],
    }
    return check_goals(GOALS, values)


def verdict(result: Mapping[str, Any]) -> str:
    """What this run's numbers show (nothing else: the benchmark is quoted apart)."""
    models = result["models"]
    teacher, plain, kd = (models[n]["map"] for n in ("teacher", *STUDENTS))
    if not teacher > plain:
        return (
            f"The teacher (mAP {teacher:.3f}) is not better than the plain student "
            f"({plain:.3f}): it has not converged in this run's schedule, so there is nothing to "
            "distil. Give it the reference schedule once (`distill demo --minutes 0`); later "
            "demos reuse it and give the students the whole budget."
        )
    gap = teacher - plain
    moved = (
        f"it moved the student from mAP {plain:.3f} to {kd:.3f} "
        f"({kd - plain:+.3f}, {(kd - plain) / gap:+.0%} of the {gap:.3f} gap to the teacher's "
        f"{teacher:.3f})"
    )
    met = result["goals"]
    if met["kd_gain"]["met"] and met["gap_closed"]["met"]:
        return f"Distillation clearly helped: {moved}."
    if kd > plain:
        return (
            f"Distillation helped a little: {moved}; less than the demo's goal "
            f"({met['kd_gain']['goal']} mAP and {met['gap_closed']['goal']} of the gap)."
        )
    return f"Distillation did not help in this run: {moved}."  # or made it worse


def benchmark_sentence(path: Path) -> str:
    """The committed full benchmark (``scripts/bench_kd.py``), quoted as such with its date and
    machine, from its JSON ("" when there is none or it was a quick run)."""
    try:
        result = json.loads(path.read_text())
        if result.get("quick"):
            return ""
        models = result["models"]
        teacher, plain, kd = (models[k] for k in ("teacher", "student", "student + KD"))
        # A teacher given with --teacher has no training time on record (NaN in the JSON).
        minutes = teacher.get("train_minutes")
        took = "" if minutes is None or _nan(minutes) else f" for {minutes:.0f} min"
        return (
            f" Not measured in this run: the committed benchmark ({path.name}, "
            f"{result['date'][:10]}, {result['machine']['cpu']}) trained its teacher on the "
            f"harder benchmark task{took} to mAP "
            f"{teacher['map']['mean']:.3f}, and distillation moved its student from "
            f"{plain['map']['mean']:.3f} to {kd['map']['mean']:.3f} ({result['gap_closed']:.0%} "
            f"of the gap, mean of seeds {result['seeds']})."
        )
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def format_demo_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per model (students: the lockstep pair's minutes), then the goals."""
    lines = [
        "| model | steps | mAP | AP50 | params (M) | GFLOPs | latency (ms) | train (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["models"].items():
        steps = "reused" if m["steps"] is None else str(m["steps"])
        minutes = "–" if _nan(m["train_minutes"]) else f"{m['train_minutes']:.1f}"
        lines.append(
            f"| {name} | {steps} | {m['map']:.3f} | {m['ap50']:.3f} | {m['params'] / 1e6:.2f} "
            f"| {m['gflops']:.2f} | {m['latency_ms']:.1f} | {minutes} |"
        )
    lines += ["", "| goal | measured | target | met? |", "|---|---:|---|---|"]
    for name, g in result["goals"].items():
        value = "–" if _nan(g["value"]) else f"{g['value']:.3f}"
        lines.append(
            f"| {GOALS[name][0]} | {value} | {g['goal']} | {'yes' if g['met'] else 'no'} |"
        )
    return "\n".join(lines)


def format_table(result: Mapping[str, Any]) -> str:
    """The README section of a ``--record`` file (``scripts/readme_tables.py``)."""
    text = f"{format_demo_table(result)}\n\n{result['note']} {result['verdict']}"
    if result["plan"].get("over_budget"):
        text += (
            f" The {result['budget_minutes']:g}-min budget was too small here for "
            f"{result['plan']['scale']:g}x of the reference schedule: the demo trained that, "
            "past the budget, as it said before it started."
        )
    host = result.get("machine", {})
    if host.get("load_average") is not None:  # a shared CPU runs every step slower
        text += (
            f" Load average at the end of the run: {host['load_average']:.1f} on "
            f"{host['cores']} cores."
        )
    return text


def _runs_of(name: str) -> str:
    """The run (``RUNS``) that trains model ``name``."""
    return "teacher" if name == "teacher" else "students"


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
