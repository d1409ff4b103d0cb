"""Hostile files (issue 33, items 4, 5, 6, 9, 12): broken cards, exports that fail half-way,
a demo pointed at someone else's runs, a kill in the middle of a checkpoint save, and the
atomic writer. Every refusal is one line that names the file; nothing good is lost.

Everything hostile is laid out on the fly in tmp_path; models are the smoke config's (64 px).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.cli import main
from distill.config import Config, dump_config, load_config
from distill.data import build_dataset
from distill.fileio import write_text_atomic
from distill.models.card import CardError, dataset_categories, read_card, write_card
from distill.models.weights import save_state_dict_file
from students import build_student
from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def save_student(cfg: Config, folder: Path) -> Path:
    """A random smoke student with its card in ``folder``; returns the weights file."""
    dataset = build_dataset(cfg.data, "val")
    torch.manual_seed(0)
    model = build_student(cfg, dataset.num_categories + 1)
    weights = folder / "student.pt"
    write_card(weights, cfg, "student", dataset.num_categories + 1, dataset_categories(dataset))
    save_state_dict_file(model.state_dict(), weights)
    return weights


@pytest.fixture(scope="module")
def student_run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished-looking student run: config.yaml, metrics.json, student.pt and its card."""
    folder = tmp_path_factory.mktemp("run")
    cfg = load_config(SMOKE, smoke_overrides(shapes_root, folder))
    dump_config(cfg, folder / "config.yaml")
    (folder / "metrics.json").write_text(json.dumps({"map": 0.0, "ap50": 0.0, "job": "student"}))
    save_student(cfg, folder)
    return folder


def one_line_naming(message: str, *words: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for word in words:
        assert word in message, (word, message)


# ---------------------------------------------------------------------------------------------
# 4. Cards: one schema, checked in one place, for every reader
# ---------------------------------------------------------------------------------------------


def _set(card: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = card
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()
# (dotted key in the card, hostile value, words the error must hold besides the card's path)
HOSTILE_CARDS: dict[str, tuple[str, Any, str]] = {
    "resize-empty-list": ("resize", [], "resize"),
    "anchors-empty-list": ("anchors", [], "anchors"),
    "model-a-string": ("model", "x", "model"),
    "category-without-label": ("categories.0.label", _DELETE, "categories[0] has no label"),
    "num-classes-a-word": ("num_classes", "four", "num_classes"),
    "num-classes-huge": ("num_classes", 10**12, "num_classes"),
    "unknown-arch": ("model.arch", "retinanet_vgg_fpn", "is not one of"),
    "arch-differs": ("arch", "retinanet_resnet18_fpn", "arch"),
    "nms-threshold-0": ("postprocess.nms_threshold", 0, "postprocess.nms_threshold"),
    "score-threshold-2": ("postprocess.score_threshold", 2.0, "postprocess.score_threshold"),
    "huge-head-convs": ("model.head_convs", 10**9, "model.head_convs"),
    "head-convs-a-float": ("model.head_convs", 1.5, "model.head_convs"),
    "resize-min-size-a-string": ("resize.min_size", "64", "resize.min_size"),
    "resize-missing-key": ("resize.max_size", _DELETE, "resize misses max_size"),
    "anchors-four-levels": ("anchors.sizes", [16, 32, 64, 128], "anchors.sizes"),
    "unknown-model-key": ("model.head_conv", 2, "model.head_conv"),
    "label-out-of-range": ("categories.0.label", 99, "categories[0].label"),
    "categories-empty": ("categories", [], "categories"),
    "category-name-a-number": ("categories.1.name", 7, "categories[1].name"),
    "std-zero": ("normalize.std", [0, 1, 1], "normalize.std"),
    "topk-zero": ("postprocess.topk_candidates", 0, "postprocess.topk_candidates"),
    "version-true": ("version", True, "version"),
}


def hostile_card(run: Path, tmp_path: Path, case: str) -> Path:
    """A copy of ``run`` whose card has the ``case`` of HOSTILE_CARDS; returns the copy."""
    out = tmp_path / "hostile"
    shutil.copytree(run, out)
    card = json.loads((out / "student.json").read_text())
    key, value, _ = HOSTILE_CARDS[case]
    _set(card, key, value)
    (out / "student.json").write_text(json.dumps(card))
    return out


@pytest.mark.parametrize("case", sorted(HOSTILE_CARDS))
def test_a_hostile_card_is_one_line_naming_the_card_and_key(
    case: str, student_run: Path, tmp_path: Path
) -> None:
    run = hostile_card(student_run, tmp_path, case)
    with pytest.raises(CardError) as err:
        read_card(run / "student.pt")
    one_line_naming(str(err.value), str(run / "student.json"), HOSTILE_CARDS[case][2])


def test_a_good_card_reads(student_run: Path) -> None:
    card = read_card(student_run / "student.pt")
    assert card is not None and card["role"] == "student"


@pytest.mark.parametrize("command", ["predict", "export", "eval", "report"])
def test_every_reader_refuses_a_hostile_card(
    command: str, student_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """predict, export, eval and report all read the card through the one check."""
    run = hostile_card(student_run, tmp_path, "huge-head-convs")
    image = next((Path(load_config(run / "config.yaml").data.root) / "images").rglob("*.png"))
    args = {
        "predict": ["predict", str(run), str(image), "--out", str(tmp_path / "predicted")],
        "export": ["export", str(run)],
        "eval": ["eval", str(run)],
        "report": ["report", str(run), "--out", str(tmp_path / "report")],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    one_line_naming(err, str(run / "student.json"), "model.head_convs", "at most")


# ---------------------------------------------------------------------------------------------
# 5. distill export: a temporary file, moved into place only after the parity check
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["weights", "card", "directory"])
def test_export_refuses_an_out_that_is_the_weights_their_card_or_a_folder(
    out: str, student_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime", reason="the 'export' extra: pip install -e '.[export]'")
    before = {p.name: p.read_bytes() for p in student_run.iterdir() if p.is_file()}
    target = {"weights": "student.pt", "card": "student.json", "directory": "."}[out]
    assert main(["export", str(student_run), "--out", str(student_run / target)]) != 0
    one_line_naming(capsys.readouterr().err, f"--out {student_run / target}")
    assert before == {p.name: p.read_bytes() for p in student_run.iterdir() if p.is_file()}


def _fake_export(damage: Callable[[Path], None]) -> Callable[..., Path]:
    """``export_onnx`` that writes a few bytes to its file, then ``damage(file)``."""

    def export_onnx(detector: Any, out: Path, metadata: Any, raw: bool = False) -> Path:
        Path(out).write_bytes(b"new, partial onnx")
        damage(Path(out))
        return Path(out)

    return export_onnx


def _no_damage(path: Path) -> None:
    pass


def _stop(path: Path) -> None:
    raise KeyboardInterrupt  # Ctrl-C half-way through the write


def _ort_fail(*args: Any, **kwargs: Any) -> Any:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    raise Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code\nsecond line")


def _mismatch(*args: Any, **kwargs: Any) -> Any:
    from distill.deploy.onnx_runtime import ExportError

    raise ExportError("the ONNX model does not match PyTorch: scores differ")


@pytest.mark.parametrize("failure", ["stop-while-writing", "parity-mismatch", "onnxruntime-error"])
def test_a_failed_export_keeps_the_previous_one_and_leaves_no_temporary_file(
    failure: str,
    student_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("onnxruntime", reason="the 'export' extra: pip install -e '.[export]'")
    import distill.deploy.export as export

    out = tmp_path / "exports" / "model.onnx"
    out.parent.mkdir()
    out.write_bytes(b"the previous, good export")
    monkeypatch.setattr(export, "open_session", lambda path: object())
    damage = _stop if failure == "stop-while-writing" else _no_damage
    monkeypatch.setattr(export, "export_onnx", _fake_export(damage))
    check = {"parity-mismatch": _mismatch, "onnxruntime-error": _ort_fail}.get(failure, _mismatch)
    monkeypatch.setattr(export, "check_export", check)
    if failure == "stop-while-writing":
        with pytest.raises(KeyboardInterrupt):
            export.export_command(student_run, out=out)
    else:
        assert main(["export", str(student_run), "--out", str(out)]) == 1
        words = "ONNX Runtime failed" if failure == "onnxruntime-error" else "does not match"
        one_line_naming(capsys.readouterr().err, str(out), words)
    assert out.read_bytes() == b"the previous, good export"
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]


def test_an_export_that_passes_replaces_the_previous_one(
    student_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime", reason="the 'export' extra: pip install -e '.[export]'")
    import distill.deploy.export as export

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr(export, "open_session", lambda path: object())
    monkeypatch.setattr(export, "export_onnx", _fake_export(_no_damage))
    monkeypatch.setattr(export, "check_export", lambda *a, **k: _P())
    assert export.export_command(student_run, out=out) == out
    assert out.read_bytes() == b"new, partial onnx"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


class _P:
    def summary(self) -> str:
        return "parity: fine"


def test_broken_onnx_metadata_is_one_line_naming_the_file() -> None:
    from distill.deploy.onnx_runtime import ExportError, read_metadata

    class Meta:
        def __init__(self) -> None:
            self.custom_metadata_map = {"distill": "{not json"}

    class Session:
        def get_modelmeta(self) -> Meta:
            return Meta()

    with pytest.raises(ExportError) as err:
        read_metadata(Session(), "m.onnx")
    one_line_naming(str(err.value), "m.onnx", "not JSON")


# ---------------------------------------------------------------------------------------------
# 12. The atomic writer; report.html; broken JSON read elsewhere
# ---------------------------------------------------------------------------------------------


def test_atomic_write_uses_a_unique_temporary_name(tmp_path: Path) -> None:
    """A leftover at the old fixed name (``X.tmp``, here a folder) does not stop the write."""
    path = tmp_path / "metrics.json"
    (tmp_path / "metrics.json.tmp").mkdir()
    write_text_atomic(path, "{}")
    assert path.read_text() == "{}"


def test_a_failed_atomic_write_leaves_the_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    write_text_atomic(path, "old")

    def fail(src: Any, dst: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    monkeypatch.setattr(Path, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_atomic_write_fsyncs_the_file_and_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_text_atomic(tmp_path / "a.json", "{}")
    assert synced == ["file", "dir"]


def test_report_html_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.report.collect as collect

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.html").write_text("<p>the previous report</p>")
    monkeypatch.setattr(collect, "evaluate_models", lambda lineup, precision: None)
    monkeypatch.setattr(collect, "build_page", lambda *a, **k: "<p>new</p>" * 1000)

    def fail(src: Any, dst: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    monkeypatch.setattr(Path, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        collect.write_report(None, out)  # type: ignore[arg-type]
    assert (out / "report.html").read_text() == "<p>the previous report</p>"
    assert [p.name for p in out.iterdir()] == ["report.html"]


def test_broken_json_beside_weights_or_in_the_data_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.evaluation.evaluate import run_metrics
    from distill.experiments.demo import check_teacher_task
    from distill.fileio import FileFormatError

    (tmp_path / "metrics.json").write_text('{"map": 0.')
    with pytest.raises(FileFormatError) as err:
        run_metrics(tmp_path / "teacher.pt")
    one_line_naming(str(err.value), str(tmp_path / "metrics.json"))

    weights = tmp_path / "teacher.pt"
    cfg = load_config(SMOKE)
    write_card(weights, cfg, "teacher", 3, [{"id": 1, "name": "a", "label": 1}])
    data = tmp_path / "data"
    data.mkdir()
    for text, words in (("[1, 2", "not readable JSON"), ('{"images": []}', "no COCO categories")):
        (data / "val.json").write_text(text)
        with pytest.raises(FileFormatError) as err:
            check_teacher_task(weights, data)
        one_line_naming(str(err.value), str(data / "val.json"), words)


# ---------------------------------------------------------------------------------------------
# 9. A kill at any point of a checkpoint save leaves a checkpoint that plain --resume takes
# ---------------------------------------------------------------------------------------------


class _Killed(BaseException):
    """A kill: nothing after it runs (BaseException: no handler in the code catches it)."""


def test_a_kill_at_each_point_of_saving_the_same_step_twice_still_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 2 is saved (mid-epoch), then saved again at the epoch's end; the second save is
    killed before each of its renames, removals and writes in turn. Each time a plain resume
    finds a whole step-2 checkpoint (the first or the second) and loads it, and the next save
    leaves only whole checkpoints behind."""
    from accelerate import Accelerator

    import distill.engine.checkpoint as checkpoint
    from distill.engine.checkpoint import Progress, find_checkpoint, load_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    real = {"rename": Path.rename, "rmtree": shutil.rmtree, "write": checkpoint.write_text_atomic}
    point = 0
    for kill_at in range(1, 20):
        run = tmp_path / f"kill-{kill_at}"
        checkpoint.save_checkpoint(accelerator, run, Progress(epoch=0, batch=1, step=1))
        checkpoint.save_checkpoint(accelerator, run, Progress(epoch=0, batch=2, step=2))
        calls = 0

        def killing(name: str, at: int = kill_at) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == at:
                    raise _Killed(name)
                return real[name](*args, **kwargs)

            return call

        with monkeypatch.context() as m:
            m.setattr(Path, "rename", killing("rename"))
            m.setattr(shutil, "rmtree", killing("rmtree"))
            m.setattr(checkpoint, "write_text_atomic", killing("write"))
            try:
                checkpoint.save_checkpoint(accelerator, run, Progress(epoch=1, batch=0, step=2))
                killed = False
            except _Killed:
                killed = True
        found = find_checkpoint(run)  # plain --resume: no fallback
        progress = load_checkpoint(accelerator, found)
        assert (progress.step, progress.epoch) in ((2, 0), (2, 1)), (kill_at, found)
        checkpoint.save_checkpoint(accelerator, run, Progress(epoch=1, batch=1, step=3))
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names == ["last", "step_00000002", "step_00000003"], (kill_at, names)
        assert find_checkpoint(run).name == "step_00000003"
        point = kill_at
        if not killed:
            break
    assert point >= 5  # progress.json, move aside, move in, pointer, remove the first


# ---------------------------------------------------------------------------------------------
# 6. distill demo --out DIR: the demo's own runs are trained anew, nobody else's is replaced
# ---------------------------------------------------------------------------------------------


def _user_run(run_dir: Path, cfg: Config, finished: bool = True) -> dict[str, bytes]:
    """A run laid out as ``distill run`` leaves it; returns its files' bytes."""
    dump_config(cfg, run_dir / "config.yaml")
    if finished:
        (run_dir / "student.pt").write_bytes(b"someone's weights")
        (run_dir / "metrics.json").write_text('{"map": 0.4}')
    else:
        (run_dir / "checkpoints" / "step_00000001").mkdir(parents=True)
        (run_dir / "checkpoints" / "last").write_text("step_00000001")
    return {str(p): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["student", "distill", "teacher-unfinished", "students"])
def test_demo_refuses_an_out_holding_someone_elses_run(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data = tmp_path / "runs", tmp_path / "data"
    user_cfg = load_config(SMOKE, smoke_overrides(tmp_path / "d", out / where))
    if where == "students":  # the students' lockstep checkpoints, of other models
        step = out / "students" / "checkpoints" / "step_00000004"
        step.mkdir(parents=True)
        (step / "progress.json").write_text(json.dumps({"step": 4, "models": ["a", "b"]}))
        (step.parent / "last").write_text(step.name)
        before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        run_dir = out / "students"
    else:
        run_dir = out / where.removesuffix("-unfinished")
        run_dir.mkdir(parents=True)
        before = _user_run(run_dir, user_cfg, finished=not where.endswith("unfinished"))
    assert main(["demo", "--out", str(out), "--data", str(data), "--minutes", "0"]) == 2
    one_line_naming(capsys.readouterr().err, str(run_dir), "not the demo's own")
    assert before == {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert not data.exists()  # refused before anything was made


def test_demo_takes_its_own_runs(tmp_path: Path) -> None:
    """Runs the demo wrote (another schedule, another --data) are trained anew; a finished
    teacher is reused, whoever wrote its folder."""
    from distill.engine.checkpoint import Progress
    from distill.experiments.demo import check_out, demo_configs

    out = tmp_path / "runs"
    earlier = demo_configs(out, tmp_path / "old-data", out / "teacher" / "teacher.pt", steps={
        "teacher": 7, "student": 9, "student + KD": 9,
    })  # fmt: skip
    for name in ("student", "student + KD"):
        run_dir = Path(earlier[name].output.dir)
        run_dir.mkdir(parents=True)
        _user_run(run_dir, earlier[name])
    step = out / "students" / "checkpoints" / "step_00000009"
    step.mkdir(parents=True)
    progress = Progress(step=9, models=["../student", "../distill"])
    (step / "progress.json").write_text(json.dumps(progress.__dict__))
    (step.parent / "last").write_text(step.name)
    teacher = out / "teacher"
    teacher.mkdir()
    _user_run(teacher, load_config(SMOKE, smoke_overrides(tmp_path, teacher)))
    (teacher / "teacher.pt").write_bytes(b"someone's teacher")
    now = demo_configs(out, tmp_path / "data", teacher / "teacher.pt")
    check_out(out, now, reuse_teacher=True)  # no error
    (teacher / "teacher.pt").unlink()  # no finished teacher: the folder is trained into
    with pytest.raises(FileExistsError, match=f"{teacher} holds a run that is not the demo's"):
        check_out(out, now, reuse_teacher=False)
