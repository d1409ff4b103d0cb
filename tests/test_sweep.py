"""distill sweep: grid parsing, lockstep == separate runs, outputs, resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.config import ConfigError, load_config, parse_value, value_text
from distill.experiments.sweep import (
    is_lockstep,
    parse_grid,
    teacher_reference,
    write_report,
)
from distill.models.weights import load_state_dict_file
from tests.conftest import REPO

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def assert_same_weights(a: Path, b: Path) -> None:
    ours, theirs = load_state_dict_file(a), load_state_dict_file(b)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), f"{a} vs {b}: {key} differs"


def test_report_gain_and_gap_closed_with_a_known_teacher(tmp_path: Path) -> None:
    """gain = mAP - plain student mAP; gap closed = gain / (teacher mAP - plain student mAP),
    the teacher's mAP read from the metrics.json beside its weights."""
    teacher = tmp_path / "teacher" / "teacher.pt"
    teacher.parent.mkdir()
    (teacher.parent / "metrics.json").write_text(json.dumps({"map": 0.6}))
    cfg = load_config(SMOKE, [f"teacher.weights={teacher}"])
    teacher_map = teacher_reference(cfg)
    assert teacher_map == 0.6
    key = "distill.logit.temperature"
    aps = {"ap50": 0.5, "aps": 0.1, "apm": 0.2, "apl": 0.3}
    rows = [
        {"run": "temperature=1", key: 1, "map": 0.30, **aps},
        {"run": "temperature=4", key: 4, "map": 0.45, **aps},
        {"run": "baseline", key: "", "map": 0.20, **aps},
    ]
    write_report(tmp_path / "sweep", rows, [key], teacher_map)
    with open(tmp_path / "sweep" / "sweep.csv") as f:
        got = {r["run"]: r for r in csv.DictReader(f)}
    expected = {"temperature=1": (0.10, 0.25), "temperature=4": (0.25, 0.625), "baseline": (0, 0)}
    for run, (gain, closed) in expected.items():
        assert float(got[run]["gain"]) == pytest.approx(gain)
        assert float(got[run]["gap_closed"]) == pytest.approx(closed)
    assert [r["best"] for r in got.values()] == ["False", "True", "False"]
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "teacher mAP: 0.600; plain student mAP: 0.200" in table
    assert (
        "| temperature=4 | 4 | 0.450 | 0.500 | 0.100 | 0.200 | 0.300 | 0.250 | 0.625 | **(best)**"
        in table
    )
    # a swept value is shown as given, however small (a weight of 1e-8 is not "0.000")
    small = [{**rows[0], key: 1e-8}]
    write_report(tmp_path / "small", small, [key], teacher_map)
    assert "| temperature=1 | 1e-08 | 0.300 |" in (tmp_path / "small" / "sweep.md").read_text()
    # with a teacher no better than the plain student there is no gap to close
    write_report(tmp_path / "weak", rows, [key], 0.1)
    with open(tmp_path / "weak" / "sweep.csv") as f:
        assert all(r["gap_closed"] == "nan" for r in csv.DictReader(f))


def test_parse_grid_values_and_errors() -> None:
    grid = parse_grid(["distill.logit.temperature=1,2.5,4", "distill.feature.levels=[p3, p4],[p5]"])
    assert grid == [
        ("distill.logit.temperature", [1, 2.5, 4]),
        ("distill.feature.levels", [["p3", "p4"], ["p5"]]),
    ]
    assert is_lockstep(grid)
    assert not is_lockstep(parse_grid(["train.lr=0.1,0.2"]))
    # word values stay words, as in --set: mixed_precision=no is the string "no"
    assert parse_grid(["train.mixed_precision=no,auto", "data.hflip=0"])[0][1] == ["no", "auto"]
    for value in ("no", "auto", "a b", "1", "true", "null", 4, 2.5, True, None, ["p3", "p4"]):
        assert parse_value(value_text(value)) == value  # a point's override reads back its value
    assert value_text("no") == "no" and value_text("1") == "'1'"
    assert parse_grid(["data.skip_bad_images=true,false"]) == [
        ("data.skip_bad_images", [True, False])
    ]
    for bad in (["temperature"], ["a="], ["=1,2"], ["a.b=,"], ["a.b=1,,2"], ["output.dir=a,b"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["a.b=1", "a.b=2"])


def test_unknown_grid_key_is_a_config_error(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sweep", str(SMOKE), *sets(f"data.root={shapes_root}", f"output.dir={tmp_path}"),
                 "--grid", "distill.logit.temprature=1,2"])  # fmt: skip
    assert code == 2
    assert "did you mean temperature" in capsys.readouterr().err


@pytest.mark.slow
def test_lockstep_sweep_equals_separate_runs(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [f"data.root={shapes_root}", "eval.images_logged=0", "train.max_steps=3"]
    sweep_dir = tmp_path / "sweep"
    args = ["sweep", str(SMOKE), *sets(*base, f"output.dir={sweep_dir}"),
            "--grid", "distill.logit.temperature=1,4", "--with-baseline"]  # fmt: skip
    assert main(args) == 0
    for name in ("temperature=1", "temperature=4", "baseline"):
        assert (sweep_dir / name / "student.pt").is_file()
        assert (sweep_dir / name / "config.yaml").is_file()
    for output in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (sweep_dir / output).is_file()
    assert list((sweep_dir / "tb_hparams").rglob("events.out.tfevents*"))
    with open(sweep_dir / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["temperature=1", "temperature=4", "baseline"]
    assert sum(r["best"] == "True" for r in rows) == 1

    # the same grid with --sequential: every point is a separate run of its config, one after
    # another (each with its own checkpoints), and ends with the weights of its lockstep
    # twin, bitwise (fp32, CPU)
    sequential_dir = tmp_path / "sequential"
    sequential = ["sweep", str(SMOKE), *sets(*base, f"output.dir={sequential_dir}"), "--grid",
                  "distill.logit.temperature=1,4", "--with-baseline", "--sequential"]  # fmt: skip
    assert main(sequential) == 0
    assert not (sequential_dir / "checkpoints").exists()
    for name in ("temperature=1", "temperature=4", "baseline"):
        assert (sequential_dir / name / "checkpoints").is_dir()
        assert_same_weights(sweep_dir / name / "student.pt", sequential_dir / name / "student.pt")
    with open(sequential_dir / "sweep.csv") as f:
        assert [r["map"] for r in csv.DictReader(f)] == [r["map"] for r in rows]

    # a grid over a non-distill key cannot share one loop: it runs sequentially by necessity;
    # its point at the config's own lr (0.005) is the baseline above
    lr_dir = tmp_path / "lr"
    plain = ["distill.feature.kind=null", "distill.logit.weight=0", "distill.box.weight=0"]
    assert main(["sweep", str(SMOKE), *sets(*base, *plain, f"output.dir={lr_dir}"),
                 "--grid", "train.lr=0.005"]) == 0  # fmt: skip
    assert not (lr_dir / "checkpoints").exists() and (lr_dir / "lr=0.005" / "checkpoints").is_dir()
    assert_same_weights(sweep_dir / "baseline" / "student.pt", lr_dir / "lr=0.005" / "student.pt")
    # the distilled points did change the weights relative to the plain student
    t4, plain = (
        load_state_dict_file(sweep_dir / "temperature=4" / "student.pt"),
        load_state_dict_file(sweep_dir / "baseline" / "student.pt"),
    )
    assert any(not torch.equal(t4[k], plain[k]) for k in t4 if t4[k].is_floating_point())

    # running the same sweep again resumes: every point is done, nothing is retrained
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/student.pt")}
    assert main(args) == 0
    assert before == {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/student.pt")}

    # a wider grid: the new point must not resume from the finished group's checkpoint
    wider = [*args[:-3], "--grid", "distill.logit.temperature=1,4,8", "--with-baseline"]
    assert main(wider) == 2
    err = capsys.readouterr().err
    assert "saved for the models ['temperature=1', 'temperature=4', 'baseline']" in err, err
    assert "not ['temperature=8']" in err and str(sweep_dir / "checkpoints") in err
    assert not (sweep_dir / "temperature=8" / "student.pt").exists()
    assert before == {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/student.pt")}
    shutil.rmtree(sweep_dir / "checkpoints")  # as the message says: the new point starts anew
    assert main(wider) == 0
    assert (sweep_dir / "temperature=8" / "student.pt").is_file()
    assert before == {p: p.stat().st_mtime_ns for p in before}
