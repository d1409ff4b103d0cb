"""Reliability of training runs: exact resume, signals, atomic files, bad state, non-finite
losses, exact distributed evaluation and the frozen teacher under DDP.

The reference is one uninterrupted plain-student run of configs/shapes/smoke.yaml (CPU, fp32,
16 shuffled images with flips, 4 steps per epoch, 2 epochs); every interrupted-and-resumed run
must end with bitwise the same student.pt and must have consumed the same batches (the
``train.trace_batches`` files). Multi-process runs use ``accelerate launch --multi_gpu
--num_processes 2`` (two gloo processes on this CPU machine); most of them share one launch of
tests/cli_entry.py, which runs several ``distill`` commands in one process group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import distill.engine.loop
import distill.engine.step
from distill.cli import main
from distill.config import ConfigError, load_config
from distill.data import build_dataset, predictions_to_coco
from distill.device import make_accelerator
from distill.engine.build import build_models, build_optimizer, check_not_optimized
from distill.engine.checkpoint import (
    ModelsMismatchError,
    find_checkpoint,
    state_digest,
    write_text_atomic,
)
from distill.engine.loop import TrainingStopped, train, train_group
from distill.evaluation.evaluate import coco_metrics, evaluate
from distill.fileio import write_json
from distill.models.retinanet import build_transform
from distill.models.weights import load_state_dict_file, save_state_dict_file
from students import build_student
from teachers import build_teacher
from tests.conftest import REPO

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
ENTRY = REPO / "tests" / "cli_entry.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 8  # of the plain run: 16 images / batch 4 = 4 steps per epoch, 2 epochs

Record = tuple[int, int, tuple[int, ...]]  # (epoch, batch, image ids) of one traced batch


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def plain(root: Path, out: Path, *extra: str) -> list[str]:
    """The plain student (no teacher) on smoke.yaml: 2 epochs of 16 shuffled, flipped images,
    every batch traced, evaluated once at the end on 2 images."""
    return [
        f"data.root={root}", f"output.dir={out}", "data.hflip=0.5", "data.max_train_images=16",
        "data.max_val_images=2", "distill.feature.kind=null", "distill.logit.weight=0",
        "distill.box.weight=0", "train.epochs=2", "train.max_steps=null",
        "train.trace_batches=true", "eval.every_epochs=0", "eval.images_logged=0", *extra,
    ]  # fmt: skip


def read_trace(run_dir: Path, rank: int = 0) -> list[Record]:
    path = run_dir / f"batches.rank{rank}.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [(r["epoch"], r["batch"], tuple(r["ids"])) for r in map(json.loads, lines)]


def traced(run_dir: Path, rank: int = 0) -> int:
    """Batches traced so far (complete lines: the file may be growing)."""
    path = run_dir / f"batches.rank{rank}.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def checkpoint_progress(run_dir: Path) -> dict[str, Any]:
    """progress.json of the checkpoint a resume would use."""
    progress: dict[str, Any] = json.loads((find_checkpoint(run_dir) / "progress.json").read_text())
    return progress


def consumed(records: list[Record], progress: dict[str, Any]) -> list[Record]:
    """The batches a checkpoint's state includes: those before its (epoch, batch). A killed run
    may have traced batches after its last checkpoint; the resumed run does them again."""
    return [r for r in records if (r[0], r[1]) < (progress["epoch"], progress["batch"])]


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_state_dict_file(a), load_state_dict_file(b)
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(port: int, *args: str) -> list[str]:
    """``accelerate launch`` of two gloo processes on this CPU machine."""
    return [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        *args,
    ]  # fmt: skip


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and everything under it (launched workers run in their own sessions,
    so they must be found before their launcher dies)."""
    with suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with suppress(psutil.Error):
                child.kill()
    proc.kill()
    proc.wait()


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> int:
    """The exit status; a hang (e.g. ranks waiting in different collectives) fails the test."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"no exit after {timeout} s: {log.read_text()[-3000:]}")


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until ``ready()``; fail if the process ends first or nothing happens for 5 min."""
    deadline = time.monotonic() + 300
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(f"process ended (or hung) early: {log.read_text()[-3000:]}")
        time.sleep(0.01)


def worker(launcher_pid: int, rank: int) -> psutil.Process:
    """The ``distill`` worker process of ``rank`` started by an ``accelerate launch``."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
            runs_distill = "distill" in cmdline or str(ENTRY) in cmdline
            if child.environ().get("RANK") == str(rank) and runs_distill:
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} worker under process {launcher_pid}")


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


class SubclassedDict(OrderedDict[str, torch.Tensor]):
    pass


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on 2 shared cores a second one only spins against the other processes
    (tens of times slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted plain run (0 loader workers)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(SMOKE, plain(shapes_root, out)))
    records = read_trace(out)
    assert len(records) == STEPS
    for epoch in (0, 1):  # each training image exactly once per epoch
        ids = [i for e, _, batch in records if e == epoch for i in batch]
        assert sorted(ids) == list(range(1, 17))
    return out


@pytest.fixture(scope="module")
def teacher_pt(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher from a quick ``distill train-teacher`` run."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    overrides = [f"data.root={shapes_root}", f"output.dir={out}", "train.epochs=1",
                 "train.max_steps=2", "data.max_val_images=2", "eval.images_logged=0"]  # fmt: skip
    assert main(["train-teacher", str(SMOKE), *sets(*overrides)]) == 0
    assert not temporary_files(out)
    return out / "teacher.pt"


def kd_overrides(root: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    """All KD terms (cwd feature, logit, box on every anchor), 3 steps under 2 processes, an
    evaluation with every detection kept (sensitive to any difference in the weights)."""
    return [
        f"data.root={root}", f"output.dir={out}", f"teacher.weights={teacher}",
        "distill.box.score_threshold=0.0", "data.batch_size=2", "data.max_val_images=6",
        "train.epochs=1", "train.max_steps=3", "eval.images_logged=0",
        "eval.score_threshold=0.0", "eval.batch_size=1", *extra,
    ]  # fmt: skip


def eval_overrides(root: Path, num_images: int) -> list[str]:
    # batch size 1: 1 and 2 processes then run the same convolutions on the same inputs
    return [f"data.root={root}", f"data.max_val_images={num_images}",
            "eval.score_threshold=0.0", "eval.batch_size=1"]  # fmt: skip


EVAL_SIZES = (6, 5, 1)


@pytest.fixture(scope="module")
def ddp(shapes_root: Path, teacher_pt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process launch running, in order: the plain reference (batch 2), KD with all terms
    and a non-finite loss on rank 1 only at step 1, KD with FGD, a plain run with a non-finite
    loss on rank 1 at every step, and ``distill eval`` of the KD student on 6, 5 and 1 images."""
    root = tmp_path_factory.mktemp("ddp")
    base = plain(shapes_root, root / "plain", "data.batch_size=2")
    kd = kd_overrides(shapes_root, root / "kd", teacher_pt)
    fgd = kd_overrides(shapes_root, root / "fgd", teacher_pt, "distill.feature.kind=fgd")
    nan_stop = plain(shapes_root, root / "nan_stop", "data.batch_size=2", "train.max_nonfinite=2")
    weights = str(root / "kd" / "student.pt")
    specs: list[dict[str, Any]] = [
        {"argv": ["run", str(SMOKE), *sets(*base)]},
        {"argv": ["run", str(SMOKE), *sets(*kd)], "nan_rank": 1, "nan_steps": [1],
         "digest_dir": str(root / "kd")},
        {"argv": ["run", str(SMOKE), *sets(*fgd)]},
        {"argv": ["run", str(SMOKE), *sets(*nan_stop)], "nan_rank": 1,
         "nan_steps": list(range(STEPS)), "expect": 1},
        *[{"argv": ["eval", str(SMOKE), *sets(*eval_overrides(shapes_root, n)),
                    "--weights", weights, "--out", str(root / f"eval{n}.json")]}
          for n in EVAL_SIZES],
    ]  # fmt: skip
    (root / "specs.json").write_text(json.dumps(specs))
    log = root / "log.txt"
    status = finish(start(launch(free_port(), str(ENTRY), str(root / "specs.json")), log), log)
    text = log.read_text()
    exits = re.findall(r"cli_entry: rank (\d): command (\d+) exited (-?\d+)", text)
    codes = {(int(rank), int(k)): int(code) for rank, k, code in exits}
    expected = {(rank, k): 0 for rank in (0, 1) for k in range(len(specs))}
    expected[0, 3] = expected[1, 3] = 1  # the non-finite stop: exit 1 on both ranks
    assert status == 0 and codes == expected, text[-4000:]
    return root


# ---------------------------------------------------------------------------------------------
# 1. Exact resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "stops"), [(0, (2, 4)), (2, (4, 6))], ids=["0-workers", "2-workers"]
)
def test_resume_after_two_stops_equals_the_uninterrupted_run(
    workers: int, stops: tuple[int, ...], reference: Path, shapes_root: Path, tmp_path: Path
) -> None:
    """Stops mid-epoch (steps 2, 6) and exactly at the epoch boundary (step 4, the last batch of
    epoch 0), each resumed: bitwise the same weights, the same batches, none repeated or
    skipped. With 2 loader workers too (compared with the 0-worker reference)."""
    out = tmp_path / "run"
    cfg = load_config(SMOKE, plain(shapes_root, out, f"data.num_workers={workers}"))
    resume = None
    for stop in stops:
        with pytest.raises(TrainingStopped, match=f"--resume {out}"):
            train(cfg, resume=resume, stop_after=stop)
        assert checkpoint_progress(out)["step"] == stop
        assert len(read_trace(out)) == stop  # a stop leaves no batch half-consumed
        resume = out
    train(cfg, resume=out)
    assert_same_weights(out / "student.pt", reference / "student.pt")
    assert read_trace(out) == read_trace(reference)
    # the learning-rate schedule (warm-up, then cosine) went on where it stopped
    assert logged_lr(out) == logged_lr(reference)
    assert len(logged_lr(reference)) == STEPS


def logged_lr(run_dir: Path) -> list[tuple[int, float]]:
    """(step, learning rate) as the run logged them to TensorBoard, over all its sessions."""
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/lr")]


def test_resume_after_sigkill_equals_the_uninterrupted_run(
    reference: Path, shapes_root: Path, tmp_path: Path
) -> None:
    """A crash (SIGKILL) once a checkpoint exists, with a checkpoint after every step; the
    resumed run redoes exactly the batches after the checkpoint it resumes from."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = plain(shapes_root, out, "train.checkpoint_every_steps=1")
    proc = start([sys.executable, "-m", "distill", "run", str(SMOKE), *sets(*overrides)], log)
    wait_until((out / "checkpoints" / "last").is_file, proc, log)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc, log) == -signal.SIGKILL
    assert not (out / "metrics.json").exists()  # it did not finish
    before = read_trace(out)
    progress = checkpoint_progress(out)

    assert main(["run", str(SMOKE), *sets(*overrides), "--resume", str(out)]) == 0
    assert_same_weights(out / "student.pt", reference / "student.pt")
    after = read_trace(out)[len(before) :]
    assert consumed(before, progress) + after == read_trace(reference)
    assert not temporary_files(out)  # a checkpoint the kill cut short is cleaned up
    assert len(list((out / "checkpoints").glob("step_*"))) == 2  # keep=2


# ---------------------------------------------------------------------------------------------
# 2. Signals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_saves_one_state_exits_3_and_resume_is_exact(
    sig: signal.Signals, reference: Path, shapes_root: Path, tmp_path: Path
) -> None:
    out, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = plain(shapes_root, out)
    proc = start([sys.executable, "-m", "distill", "run", str(SMOKE), *sets(*overrides)], log)
    wait_until(lambda: traced(out) >= 1, proc, log)  # in the loop, handlers installed
    proc.send_signal(sig)
    assert finish(proc, log) == 3, log.read_text()[-3000:]
    text = log.read_text()
    assert f"received {sig.name}" in text and f"resume with --resume {out}" in text
    # one consistent state: the step in progress was finished, no further batch was started
    progress = checkpoint_progress(out)
    assert 1 <= progress["step"] < STEPS
    assert len(read_trace(out)) == progress["step"]
    assert not temporary_files(out) and not (out / "student.pt").exists()

    assert main(["run", str(SMOKE), *sets(*overrides), "--resume", str(out)]) == 0
    assert_same_weights(out / "student.pt", reference / "student.pt")
    assert read_trace(out) == read_trace(reference)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    ddp: Path, shapes_root: Path, tmp_path: Path
) -> None:
    """SIGTERM to rank 1 only: both ranks save the same step and exit 3 (each rank's status,
    printed by tests/cli_entry.py); resuming under 2 processes gives the weights and batches of
    the uninterrupted 2-process run."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = plain(shapes_root, out, "data.batch_size=2")
    args = ["-m", "distill", "run", str(SMOKE), *sets(*overrides)]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"argv": args[2:], "expect": 3}]))
    proc = start(launch(free_port(), str(ENTRY), str(spec)), log)
    wait_until(lambda: traced(out, rank=1) >= 1, proc, log)
    worker(proc.pid, rank=1).send_signal(signal.SIGTERM)
    assert finish(proc, log) == 0, log.read_text()[-3000:]  # each rank exited as expected
    text = log.read_text()
    assert "received SIGTERM" in text and f"resume with --resume {out}" in text, text[-3000:]
    exits = re.findall(r"cli_entry: rank (\d): command 0 exited (-?\d+)", text)
    assert sorted(exits) == [("0", "3"), ("1", "3")], text[-3000:]
    progress = checkpoint_progress(out)
    assert 1 <= progress["step"] < STEPS
    for rank in (0, 1):
        assert len(read_trace(out, rank)) == progress["step"]
        assert (find_checkpoint(out) / f"random_states_{rank}.pkl").is_file()
    assert not temporary_files(out)

    log = tmp_path / "resumed.txt"
    assert finish(start(launch(free_port(), *args, "--resume", str(out)), log), log) == 0, (
        log.read_text()[-3000:]
    )
    assert_same_weights(out / "student.pt", ddp / "plain" / "student.pt")
    for rank in (0, 1):
        assert read_trace(out, rank) == read_trace(ddp / "plain", rank)


def test_cli_entry_fails_when_a_command_ends_otherwise_than_expected(tmp_path: Path) -> None:
    """The multi-process tests' entry point runs every command, then exits 1 if any status was
    not the expected one, so a failed rank fails its launcher (and the test)."""
    missing = str(tmp_path / "missing.yaml")
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps([{"argv": ["run", missing], "expect": 2}, {"argv": ["run", missing]}])
    )
    proc = subprocess.run(
        [sys.executable, str(ENTRY), str(spec)], env=ENV, cwd=REPO, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rank 0: command 0 exited 2\n" in proc.stdout  # as expected
    assert "rank 0: command 1 exited 2\ncli_entry: rank 0: command 1: expected 0" in proc.stdout


# ---------------------------------------------------------------------------------------------
# 3. Atomic files
# ---------------------------------------------------------------------------------------------


def _fail(*args: Any, **kwargs: Any) -> None:
    raise OSError("injected failure")


@pytest.mark.parametrize("writer", ["student.pt", "metrics.json", "progress.json"])
def test_failed_write_keeps_the_previous_file(
    writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure before the rename leaves the previous file whole; success leaves no *.tmp."""
    path = tmp_path / writer
    write: Callable[[int], None]
    read: Callable[[], Any]
    if writer == "student.pt":
        write = lambda v: save_state_dict_file({"w": torch.full((64,), float(v))}, path)  # noqa: E731
        read = lambda: float(load_state_dict_file(path)["w"][0])  # noqa: E731
    elif writer == "metrics.json":
        write = lambda v: write_json({"map": v}, path)  # noqa: E731
        read = lambda: json.loads(path.read_text())["map"]  # noqa: E731
    else:
        write = lambda v: write_text_atomic(path, json.dumps({"step": v}))  # noqa: E731
        read = lambda: json.loads(path.read_text())["step"]  # noqa: E731
    write(1)
    assert read() == 1 and not temporary_files(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _fail)
        m.setattr(Path, "replace", _fail)
        m.setattr(Path, "rename", _fail)
        with pytest.raises(OSError, match="injected"):
            write(2)
    assert read() == 1
    write(3)
    assert read() == 3


def test_failure_inside_torch_save_keeps_the_previous_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "teacher.pt"
    save_state_dict_file({"w": torch.ones(1000)}, path)
    real_save = torch.save

    def half_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # a disk that fills up mid-write
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_state_dict_file({"w": torch.zeros(1000)}, path)
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(1000))
    assert not temporary_files(tmp_path)


def test_no_temporary_files_after_a_run(reference: Path) -> None:
    assert not temporary_files(reference)
    assert load_state_dict_file(reference / "student.pt")
    assert json.loads((reference / "metrics.json").read_text())["step"] == STEPS
    assert find_checkpoint(reference).name == f"step_{STEPS:08d}"


@pytest.mark.parametrize("target", ["student.pt", "metrics.json"])
def test_failed_final_write_of_a_run_keeps_the_previous_output(
    target: str,
    reference: Path,
    shapes_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Resuming a finished run re-evaluates and rewrites its outputs; make that write fail."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {name: (out / name).read_bytes() for name in ("student.pt", "metrics.json")}
    real_save, real_replace = torch.save, os.replace

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        if target == "student.pt":  # the only torch.save of a finished run's resume
            if isinstance(f, (str, os.PathLike)):
                os.truncate(f, 100)
            else:
                f.truncate(100)
            raise OSError("No space left on device")

    def rename(src: Any, dst: Any) -> Path:
        if target == "metrics.json" and Path(dst).name == "metrics.json":
            raise OSError("No space left on device")
        real_replace(src, dst)
        return Path(dst)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "replace", rename)
    monkeypatch.setattr(Path, "replace", rename)
    with pytest.raises(OSError, match="No space"):
        train(load_config(SMOKE, plain(shapes_root, out)), resume=out)
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name


def test_checkpoint_pointer_moves_only_after_the_folder_is_whole(
    reference: Path, shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_state fails half-way through the 3rd checkpoint: ``last`` still names the 2nd, and
    the resume uses it and ends as the uninterrupted run."""
    out = tmp_path / "run"
    cfg = load_config(SMOKE, plain(shapes_root, out, "train.checkpoint_every_steps=1"))
    real_save_state = Accelerator.save_state
    calls = []

    def save_state(self: Accelerator, output_dir: str, **kwargs: Any) -> Any:
        calls.append(output_dir)
        result = real_save_state(self, output_dir, **kwargs)
        if len(calls) == 3:
            (Path(output_dir) / "optimizer.bin").write_bytes(b"partial")
            raise OSError("No space left on device")
        return result

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(OSError, match="No space"):
        train(cfg)
    monkeypatch.undo()
    checkpoints = out / "checkpoints"
    assert (checkpoints / "last").read_text().strip() == "step_00000002"
    assert find_checkpoint(out) == checkpoints / "step_00000002"
    assert (checkpoints / "step_00000003.tmp").is_dir()
    assert not (checkpoints / "step_00000003").exists()
    before, progress = read_trace(out), checkpoint_progress(out)

    train(cfg, resume=out)
    assert_same_weights(out / "student.pt", reference / "student.pt")
    assert consumed(before, progress) + read_trace(out)[len(before) :] == read_trace(reference)
    assert not temporary_files(out)


# ---------------------------------------------------------------------------------------------
# 4. Bad state
# ---------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _unsafe(path: Path) -> None:
    torch.save({"state": Payload(path.parents[3] / "pwned")}, path)  # RUN/../pwned


BAD_CHECKPOINTS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated-model": ("pytorch_model.bin", _truncate),
    "truncated-optimizer": ("optimizer.bin", _truncate),
    "corrupt-model": ("pytorch_model.bin", _garbage),
    "unsafe-model": ("pytorch_model.bin", _unsafe),
    "truncated-rng-state": ("random_states_0.pkl", _truncate),
    "unsafe-rng-state": ("random_states_0.pkl", _unsafe),
    "corrupt-progress": ("progress.json", _garbage),
}


@pytest.mark.parametrize("case", [*BAD_CHECKPOINTS, "missing-run-dir", "no-checkpoint"])
def test_resume_from_bad_state_is_an_error_naming_the_path(
    case: str,
    reference: Path,
    shapes_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    named = out
    if case == "no-checkpoint":
        out.mkdir()
        (out / "config.yaml").write_text("{}\n")
        named = out / "checkpoints" / "last"
    elif case != "missing-run-dir":
        shutil.copytree(reference, out)
        name, damage = BAD_CHECKPOINTS[case]
        named = find_checkpoint(out)
        damage(named / name)
    before = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    args = ["run", str(SMOKE), *sets(*plain(shapes_root, out)), "--resume", str(out)]
    assert main(args) == 2
    assert str(named) in capsys.readouterr().err
    if case in ("missing-run-dir", "no-checkpoint"):  # nothing to fall back to either
        assert main([*args, "--resume-fallback"]) == 2
        assert str(named) in capsys.readouterr().err
    after = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert [n for n in after if n not in before and not n.startswith("events")] == []
    assert not (tmp_path / "pwned").exists()  # nothing in the files was run


def test_resume_against_another_teacher_is_refused(
    shapes_root: Path, teacher_pt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A KD checkpoint resumed with other teacher weights: exit 2 naming the checkpoint, also
    with --resume-fallback, and nothing written; with its own teacher it resumes, and ends
    with bitwise the weights of the same distillation run never interrupted."""
    out = tmp_path / "run"

    def overrides(teacher: Path, run_dir: Path = out) -> list[str]:
        return [f"data.root={shapes_root}", f"output.dir={run_dir}", f"teacher.weights={teacher}",
                "train.epochs=1", "train.max_steps=2", "data.max_val_images=1",
                "eval.images_logged=0"]  # fmt: skip

    with pytest.raises(TrainingStopped):
        train(load_config(SMOKE, overrides(teacher_pt)), stop_after=1)
    weights = load_state_dict_file(teacher_pt)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 1.0  # one tensor changed: another teacher
    other = tmp_path / "other_teacher.pt"
    save_state_dict_file(weights, other)
    checkpoint = find_checkpoint(out)
    before = sorted(p.name for p in out.rglob("*"))
    args = ["run", str(SMOKE), *sets(*overrides(other)), "--resume", str(out)]
    for extra in ([], ["--resume-fallback"]):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert str(checkpoint) in err and "another teacher" in err, err
    after = sorted(p.name for p in out.rglob("*"))
    assert [n for n in after if n not in before and not n.startswith("events")] == []
    assert main(["run", str(SMOKE), *sets(*overrides(teacher_pt)), "--resume", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["step"] == 2
    # exact resume of distillation: the KD terms, adapters and schedule all went on as they were
    uninterrupted = tmp_path / "uninterrupted"
    assert main(["run", str(SMOKE), *sets(*overrides(teacher_pt, uninterrupted))]) == 0
    assert_same_weights(out / "student.pt", uninterrupted / "student.pt")
    assert logged_lr(out) == logged_lr(uninterrupted)


def test_resume_of_other_models_is_refused(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint records the models it holds: a group (a sweep) resumed from a single run's
    checkpoint, or from another grid's, is refused, also with fallback, and nothing is loaded.
    A resume with another recipe, and a fresh start over a finished run, are refused too."""
    out = tmp_path / "run"
    cfg = load_config(SMOKE, plain(shapes_root, out))
    with pytest.raises(TrainingStopped, match="run it again"):  # the caller's resume hint
        train(cfg, stop_after=1, resume_hint="run it again")
    checkpoint = find_checkpoint(out)
    assert json.loads((checkpoint / "progress.json").read_text())["models"] == ["."]
    group = [load_config(SMOKE, plain(shapes_root, out / name)) for name in ("a", "b")]
    for fallback in (False, True):
        with pytest.raises(ModelsMismatchError, match=re.escape(str(checkpoint))) as err:
            train_group(group, "student", out, resume=True, fallback=fallback)
        assert "['a', 'b']" in str(err.value) and "['.']" in str(err.value)
    assert not (out / "a").exists() and find_checkpoint(out) == checkpoint
    # resumed with another recipe (a forgotten --set): refused, naming the key; config.yaml kept
    saved = (out / "config.yaml").read_text()
    other = sets(*plain(shapes_root, out, "train.lr=0.5"))
    assert main(["run", str(SMOKE), *other, "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.005 -> 0.5" in err and str(out / "config.yaml") in err, err
    assert (out / "config.yaml").read_text() == saved
    # its own run resumes, also from its config.yaml alone: 2 epochs of 4 batches
    assert main(["run", str(out / "config.yaml"), "--resume", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["step"] == 8

    # a fresh start into the finished run: refused before anything is written
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["run", str(SMOKE), *sets(*plain(shapes_root, out, "distill.logit.weight=1"))]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run" in err and "--resume" in err, err
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated-model", "truncated-optimizer", "deleted"])
def test_resume_fallback_uses_the_previous_whole_checkpoint(
    damage: str, reference: Path, shapes_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    last = find_checkpoint(out)
    assert [p.name for p in sorted((out / "checkpoints").glob("step_*"))] == [
        "step_00000004", last.name,
    ]  # keep=2 after 2 saves  # fmt: skip
    if damage == "deleted":
        shutil.rmtree(last)
    else:
        _truncate(last / BAD_CHECKPOINTS[damage][0])
    (out / "student.pt").unlink()
    overrides = sets(*plain(shapes_root, out))
    assert main(["run", str(SMOKE), *overrides, "--resume", str(out)]) == 2
    assert main(["run", str(SMOKE), *overrides, "--resume", str(out), "--resume-fallback"]) == 0
    assert_same_weights(out / "student.pt", reference / "student.pt")
    records = read_trace(out)
    assert records[:4] + records[STEPS:] == read_trace(reference)  # epoch 1 again, nothing else


@pytest.mark.parametrize("content", ["custom-object", "dict-subclass", "function"])
def test_weights_with_pickled_objects_are_refused(content: str, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    obj: Any = {
        "custom-object": {"w": torch.zeros(1), "x": Payload(tmp_path / "pwned")},
        "dict-subclass": SubclassedDict(w=torch.zeros(1)),
        "function": {"w": torch.zeros(1), "hook": os.system},
    }[content]
    torch.save(obj, path)
    with pytest.raises(ValueError, match="refusing to load") as err:
        load_state_dict_file(path)
    assert str(path) in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_yaml_with_a_python_tag_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"data: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=str(config)):
        load_config(config)
    assert main(["run", str(config)]) == 2
    assert str(config) in capsys.readouterr().err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 5. Non-finite losses
# ---------------------------------------------------------------------------------------------


def nan_on(
    monkeypatch: pytest.MonkeyPatch, steps: set[int], calls: list[int] | None = None
) -> None:
    """The training step's total loss (``step_losses``'s) made NaN at the optimizer ``steps``;
    ``calls``: every step the loop trains."""
    real_step, real_losses = distill.engine.loop.train_step, distill.engine.step.step_losses
    now: dict[str, int] = {}

    def train_step(*args: Any) -> Any:
        now["step"] = args[5]  # (accelerator, trainee, image_list, targets, teacher_out, step,
        if calls is not None:  # epoch)
            calls.append(args[5])
        return real_step(*args)

    def step_losses(*args: Any, **kwargs: Any) -> Any:
        total, logs = real_losses(*args, **kwargs)
        return (total * float("nan") if now.get("step") in steps else total), logs

    monkeypatch.setattr(distill.engine.loop, "train_step", train_step)
    monkeypatch.setattr(distill.engine.step, "step_losses", step_losses)


def test_nonfinite_step_is_skipped_and_counted(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1-step run whose only loss is NaN ends with the initial weights (BatchNorm statistics
    included), and the skip is counted in metrics.json and TensorBoard."""
    out = tmp_path / "run"
    cfg = load_config(SMOKE, plain(shapes_root, out, "train.max_steps=1", "data.max_val_images=1"))
    nan_on(monkeypatch, {0})
    train(cfg)
    num_classes = build_dataset(cfg.data, "train").num_categories + 1
    set_seed(cfg.train.seed)
    initial = build_student(cfg, num_classes)
    save_state_dict_file(initial.state_dict(), tmp_path / "initial.pt")
    assert_same_weights(out / "student.pt", tmp_path / "initial.pt")
    assert json.loads((out / "metrics.json").read_text())["nonfinite_skipped"] == 1
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/nonfinite_skipped")] == [1.0]


def test_too_many_nonfinite_losses_in_a_row_stop_the_run(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """NaN at steps 0, 2, 3 with max_nonfinite=2: step 1 resets the count, step 3 stops."""
    calls: list[int] = []
    nan_on(monkeypatch, {0, 2, 3}, calls)
    out = tmp_path / "run"
    overrides = plain(shapes_root, out, "train.max_nonfinite=2")
    assert main(["run", str(SMOKE), *sets(*overrides)]) == 1
    err = capsys.readouterr().err
    assert "2 non-finite losses in a row (train.max_nonfinite=2)" in err and str(out) in err
    assert calls == [0, 1, 2, 3]


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_is_skipped_on_both(ddp: Path) -> None:
    """rank 1 alone sees NaN at step 1: both ranks skip it and end with the same weights (the
    loop broadcasts no parameter). The BatchNorm statistics, digested on each rank before the
    loop broadcasts them, are each rank's own after its last batch, and the evaluation uses
    process 0's on both. NaN on rank 1 at every step stops both ranks (exit 1, in ``ddp``)."""
    kd = ddp / "kd"
    assert json.loads((kd / "metrics.json").read_text())["nonfinite_skipped"] == 1
    digests = [json.loads((kd / f"digest.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert digests[0]["parameters"] == digests[1]["parameters"]
    # the last step's statistics come from each rank's own images: the broadcast is needed ...
    assert digests[0]["broadcast_before"] != digests[1]["broadcast_before"]
    # ... and makes both ranks evaluate with process 0's
    for rank in (0, 1):
        assert digests[rank]["broadcast_after"] == digests[0]["broadcast_before"]
    assert digests[0]["state"] == digests[1]["state"]
    log = (ddp / "log.txt").read_text()
    assert log.count("non-finite losses in a row (train.max_nonfinite=2)") == 2


# ---------------------------------------------------------------------------------------------
# 6. Exact distributed evaluation
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("num_images", EVAL_SIZES)
def test_eval_on_two_processes_equals_one(
    num_images: int, ddp: Path, shapes_root: Path, tmp_path: Path
) -> None:
    single = tmp_path / "eval.json"
    args = sets(*eval_overrides(shapes_root, num_images))
    weights = str(ddp / "kd" / "student.pt")
    assert main(["eval", str(SMOKE), *args, "--weights", weights, "--out", str(single)]) == 0
    one = json.loads(single.read_text())
    two = json.loads((ddp / f"eval{num_images}.json").read_text())
    assert one["num_images"] == num_images and one["num_detections"] > 0
    assert two == one


@pytest.mark.slow
def test_metrics_of_a_two_process_run_are_those_of_its_weights(
    ddp: Path, shapes_root: Path, tmp_path: Path
) -> None:
    """The evaluation at the end of a 2-process run scores what student.pt holds: each rank
    evaluates its shard with process 0's BatchNorm statistics, not its own."""
    run = json.loads((ddp / "kd" / "metrics.json").read_text())
    evaluated = json.loads((ddp / "eval6.json").read_text())
    assert {k: run[k] for k in evaluated} == evaluated


def test_ground_truth_scores_one_and_no_detections_score_zero(shapes_root: Path) -> None:
    cfg = load_config(SMOKE, [f"data.root={shapes_root}", "data.max_val_images=null"])
    dataset = build_dataset(cfg.data, "val")
    names = {c: dataset.class_names[label - 1] for c, label in dataset.cat_id_to_label.items()}
    results = []
    for i in range(len(dataset)):
        _, target = dataset[i]
        scores = torch.ones(len(target["labels"]))
        results += predictions_to_coco(
            dataset, target["image_id"], target["boxes"], scores, target["labels"]
        )
    perfect = coco_metrics(dataset.coco, results, dataset.image_ids, names)
    assert perfect["map"] == perfect["ap50"] == perfect["ar100"] == pytest.approx(1.0)
    assert perfect["per_class"] == pytest.approx({name: 1.0 for name in names.values()})
    assert perfect["num_detections"] == len(results) > 0

    empty = coco_metrics(dataset.coco, [], dataset.image_ids, names)
    assert empty["map"] == empty["ap50"] == empty["ar100"] == 0.0
    assert empty["num_images"] == len(dataset)
    # the same through the evaluation loop, with a detector that keeps no detection
    detector = build_student(cfg, dataset.num_categories + 1)
    detector.score_thresh = 1.1
    metrics = evaluate(detector, build_transform(cfg), dataset, make_accelerator(cfg), 2)
    assert metrics["map"] == 0.0 and metrics["num_detections"] == 0


# ---------------------------------------------------------------------------------------------
# 7. Frozen teacher under DDP
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("run", ["kd", "fgd"])
def test_teacher_is_bitwise_unchanged_after_two_process_kd(
    run: str, ddp: Path, teacher_pt: Path, shapes_root: Path
) -> None:
    """3 steps on 2 processes with every KD term (cwd or FGD with its learnable global blocks,
    logit, box) under DDP's default find_unused_parameters=False; the teacher's weights and
    BatchNorm buffers are those of teacher.pt."""
    metrics = json.loads((ddp / run / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["num_processes"] == 2
    cfg = load_config(SMOKE, [f"data.root={shapes_root}", f"teacher.weights={teacher_pt}"])
    teacher = build_teacher(cfg, build_dataset(cfg.data, "train").num_categories + 1)
    assert metrics["teacher_digest"] == state_digest(teacher)


def test_teacher_is_outside_the_optimizer_and_stays_in_eval_mode(shapes_root: Path) -> None:
    cfg = load_config(SMOKE, [f"data.root={shapes_root}", "distill.feature.kind=fgd"])
    module, teacher = build_models(cfg, "student", num_classes=9)
    assert teacher is not None
    optimizer = build_optimizer(module, cfg.train)
    module.train()
    teacher.train()  # pinned: stays in eval mode
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    # FGD's blocks on teacher features are in the trainable module
    assert len(module.kd["feature"].part.global_t) > 0
    check_not_optimized(teacher, [SimpleNamespace(optimizer=optimizer)])  # type: ignore[list-item]
    optimizer.add_param_group({"params": [next(teacher.parameters())]})
    with pytest.raises(RuntimeError, match="teacher parameter is in an optimizer"):
        check_not_optimized(teacher, [SimpleNamespace(optimizer=optimizer)])  # type: ignore[list-item]


def test_run_raises_if_the_teacher_changes(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A teacher forward in training mode (its BatchNorm statistics move) fails the run."""
    real = distill.engine.step.dense_forward

    def forward_in_train_mode(model: torch.nn.Module, *args: Any) -> Any:
        for m in model.modules():  # what a bug that bypasses the pinned eval mode would do
            m.training = True
        return real(model, *args)

    monkeypatch.setattr(distill.engine.step, "dense_forward", forward_in_train_mode)
    cfg = load_config(SMOKE, [f"data.root={shapes_root}", f"output.dir={tmp_path}",
                              "train.max_steps=1", "data.max_val_images=1",
                              "eval.images_logged=0"])  # fmt: skip
    with pytest.raises(RuntimeError, match="frozen teacher"):
        train(cfg)
