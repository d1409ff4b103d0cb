"""End-to-end tests of the engine: every command on a tiny config, the plain-student step against
torchvision's own training step, resume, mixed precision, and a real 2-process run."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from distill.cli import main
from distill.config import ConfigError, load_config, replace
from distill.data import build_dataset, collate
from distill.engine.build import build_optimizer
from distill.models.card import read_card
from distill.models.retinanet import build_transform
from distill.models.weights import load_state_dict_file
from students import build_student
from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"


def run_cli(*args: str) -> None:
    assert main(list(args)) == 0


@pytest.fixture(scope="module")
def teacher_run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    overrides = smoke_overrides(shapes_root, out)
    run_cli("train-teacher", str(SMOKE), *[a for o in overrides for a in ("--set", o)])
    return out


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_train_teacher_outputs(teacher_run: Path) -> None:
    metrics = json.loads((teacher_run / "metrics.json").read_text())
    for key in ("map", "ap50", "ap75", "aps", "apm", "apl", "ar100", "per_class"):
        assert key in metrics
    assert metrics["job"] == "teacher"
    assert metrics["step"] == 4
    state = torch.load(teacher_run / "teacher.pt", weights_only=True)
    assert any(k.startswith("backbone.body") for k in state)
    # the resolved config reads back to the config the run used
    cfg = load_config(teacher_run / "config.yaml")
    assert cfg.output.dir == str(teacher_run)
    assert list(teacher_run.glob("tb/**/events.out.tfevents*"))
    assert (teacher_run / "checkpoints" / "last").is_file()
    # the card beside teacher.pt records what rebuilds it
    card = read_card(teacher_run / "teacher.pt")
    assert card is not None and (teacher_run / "teacher.json").is_file()
    assert card["role"] == "teacher" and card["arch"] == cfg.teacher.arch
    assert card["resize"] == {"min_size": 64, "max_size": 64}  # smoke.yaml's image_size
    assert card["anchors"]["sizes"] == list(cfg.anchors.sizes)
    assert card["num_classes"] == len(card["categories"]) + 1
    # and its mAP on its own validation set, which distill check compares against
    assert card["evaluation"]["map"] == pytest.approx(metrics["map"])
    assert card["evaluation"]["images"] == metrics["num_images"]


def test_distill_run_and_eval(teacher_run: Path, shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "distill"
    run_cli(
        "run",
        str(SMOKE),
        *sets(*smoke_overrides(shapes_root, out), f"teacher.weights={teacher_run / 'teacher.pt'}"),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["job"] == "student"
    # the cheap checks ran first (the teacher trained on this data: its card's classes agree)
    check = json.loads((out / "check.json").read_text())
    statuses = {f["check"]: f["status"] for f in check["findings"]}
    assert check["failed"] == [] and statuses["classes"] == "ok" and statuses["dry step"] == "ok"
    student = load_state_dict_file(out / "student.pt")
    assert read_card(out / "student.pt")["role"] == "student"  # type: ignore[index]
    assert not any("adapters" in k or k.startswith("kd.") for k in student)  # the detector alone

    # eval: teacher and student side by side, JSON written
    report = tmp_path / "eval.json"
    run_cli(
        "eval",
        str(SMOKE),
        *sets(*smoke_overrides(shapes_root, out)),
        "--model", "teacher", "--weights", str(teacher_run / "teacher.pt"),
        "--model", "student", "--weights", str(out / "student.pt"),
        "--out", str(report),
    )  # fmt: skip
    both = json.loads(report.read_text())["models"]
    assert [m["model"].split()[0] for m in both] == ["teacher", "student"]
    # the student's eval equals the metrics the run wrote at its end
    assert both[1]["map"] == pytest.approx(metrics["map"], abs=1e-9)


def test_eval_errors_name_the_file(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pt"
    assert (
        main(["eval", str(SMOKE), *sets(f"data.root={shapes_root}"), "--weights", str(missing)])
        == 2
    )
    assert str(missing) in capsys.readouterr().err


def test_resume_continues_from_last_checkpoint(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    base = [*smoke_overrides(shapes_root, out), "distill.feature.kind=null", "distill.logit.weight=0",  # noqa: E501
            "distill.box.weight=0", "train.max_steps=null", "eval.images_logged=0"]  # fmt: skip
    run_cli("run", str(SMOKE), *sets(*base, "train.epochs=1"))
    first = json.loads((out / "metrics.json").read_text())
    run_cli("run", str(SMOKE), *sets(*base, "train.epochs=2"), "--resume", str(out))
    second = json.loads((out / "metrics.json").read_text())
    assert second["epoch"] == 2
    assert second["step"] == 2 * first["step"]
    assert second["train_minutes"] > first["train_minutes"] > 0  # summed over both sessions


def test_resume_from_missing_run_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(SMOKE), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_fp16_on_cpu_is_a_clear_error(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid where CUDA exists")
    code = main(
        [
            "run",
            str(SMOKE),
            *sets(*smoke_overrides(shapes_root, tmp_path), "train.mixed_precision=fp16"),
        ]
    )
    assert code == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_auto_precision_is_bf16_only_where_it_is_native(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from distill import device as build

    monkeypatch.setattr(build, "native_bf16", lambda: False)
    assert build.check_mixed_precision("auto") == "no"
    with caplog.at_level(logging.WARNING, logger="distill.device"):
        assert build.check_mixed_precision("bf16") == "bf16"  # honoured, with a warning
    assert "without native bf16" in caplog.text and "train.mixed_precision=auto" in caplog.text
    caplog.clear()
    monkeypatch.setattr(build, "native_bf16", lambda: True)
    assert build.check_mixed_precision("auto") == "bf16"
    with caplog.at_level(logging.WARNING, logger="distill.device"):
        assert build.check_mixed_precision("bf16") == "bf16"
        assert build.check_mixed_precision("no") == "no"
    assert caplog.text == ""
    with pytest.raises(ConfigError, match=re.escape("no | fp16 | bf16 | auto, got 'half'")):
        build.check_mixed_precision("half")


def test_native_bf16_matches_the_cpu_flags() -> None:
    """On x86 Linux, PyTorch's oneDNN has bf16 kernels where the CPU has AVX-512 (avx512bw,
    avx512vl, avx512dq), AMX or AVX-NE-CONVERT; without them bf16 is emulated and slow."""
    from distill.device import native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if torch.cuda.is_available() or platform.machine() != "x86_64" or not cpuinfo.is_file():
        pytest.skip("checked against /proc/cpuinfo on x86-64 CPU-only hosts")
    flags = set(next(line for line in cpuinfo.read_text().splitlines()
                     if line.startswith("flags")).split())  # fmt: skip
    avx512 = {"avx512bw", "avx512vl", "avx512dq"} <= flags
    expected = avx512 or bool({"amx_bf16", "avx_ne_convert"} & flags)
    # oneDNN capped below AVX-512 (an AVX2-only host imitated on this CPU) has no bf16 kernels,
    # except AVX2_VNNI_2, whose AVX-NE-CONVERT has them
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "DEFAULT").upper()
    if isa in {"SSE41", "AVX", "AVX2", "AVX2_VNNI"}:
        expected = False
    elif isa == "AVX2_VNNI_2":
        expected = "avx_ne_convert" in flags
    assert native_bf16() == expected


def test_plain_student_step_equals_torchvision_training_step(
    shapes_root: Path, tmp_path: Path
) -> None:
    """One optimizer step of the plain student through our loop (shared transform, dense forward,
    combine with no KD) gives the weights of one step of torchvision's own RetinaNet training."""
    out = tmp_path / "one-step"
    overrides = [
        *smoke_overrides(shapes_root, out),
        "distill.feature.kind=null", "distill.logit.weight=0", "distill.box.weight=0",
        "data.max_train_images=4", "data.batch_size=4", "data.hflip=0.0",
        "train.max_steps=1", "train.epochs=1", "train.warmup_steps=0", "train.schedule=constant",
        "train.grad_clip=null", "eval.images_logged=0",
    ]  # fmt: skip
    cfg = load_config(SMOKE, overrides)
    from distill.engine.loop import train

    train(cfg, job="student")
    ours = load_state_dict_file(out / "student.pt")

    # torchvision's own step: model(images, targets) in train mode, SGD with the same groups
    dataset = build_dataset(cfg.data, "train")
    set_seed(cfg.train.seed)
    model = build_student(cfg, dataset.num_categories + 1)
    transform = build_transform(cfg)
    model.transform = transform
    images, targets = collate([dataset[i] for i in range(len(dataset))])
    model.train()
    losses = model(images, targets)
    optimizer = build_optimizer(model, cfg.train)
    sum(losses.values()).backward()  # type: ignore[union-attr]
    optimizer.step()
    reference = model.state_dict()
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_bf16_autocast_step_runs(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    cfg = load_config(SMOKE, [*smoke_overrides(shapes_root, out), "train.mixed_precision=bf16",
                              "train.max_steps=2", "eval.images_logged=0"])  # fmt: skip
    from distill.engine.loop import train

    cfg = replace(cfg, **{"teacher.weights": None})
    metrics = train(cfg, job="student")
    assert metrics["num_images"] == 6
    assert torch.isfinite(torch.tensor(metrics["map"]))
    assert metrics["mixed_precision"] == "bf16"
    assert json.loads((out / "metrics.json").read_text())["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(
    shapes_root: Path, teacher_run: Path, tmp_path: Path
) -> None:
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("accelerate launcher not installed next to the interpreter")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "29533",
        "-m", "distill", "run", str(SMOKE),
        *sets(*smoke_overrides(shapes_root, out), f"teacher.weights={teacher_run / 'teacher.pt'}",
              "eval.images_logged=0"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["num_images"] == 6  # every val image evaluated once across the 2 shards
