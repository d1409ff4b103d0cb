"""distill report: two tiny trained runs (shapes smoke config) -> one self-contained HTML page."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from distill.cli import main
from distill.config import load_config
from distill.report.collect import collect, evaluate_models
from distill.report.figures import bench_figure
from distill.report.html import training_section
from distill.report.model import Model, ReportError, gain_and_gap
from tests.conftest import REPO, smoke_overrides
from tests.test_bench_kd import load_bench_kd

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
# Two optimizer steps, one evaluation; a low score threshold so that the barely trained models
# still have detections (PR curves, matches) to report.
TINY = ["train.max_steps=2", "train.epochs=1", "eval.images_logged=0", "eval.score_threshold=0.01"]
SECTIONS = [
    "Summary",
    "Per class",
    "Per object size",
    "Precision–recall curves",
    "Training curves",
    "Detections side by side",
    "Sweep",
]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def trained(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sweep with a baseline (two runs trained in lockstep, as ``distill sweep`` does) and a
    teacher weights file (the smoke teacher: random weights, as the runs had)."""
    import torch

    from distill.data import build_dataset
    from distill.models.weights import save_state_dict_file
    from teachers import build_teacher

    root = tmp_path_factory.mktemp("report")
    sweep = root / "sweep"
    args = ["sweep", str(SMOKE), *sets(*smoke_overrides(shapes_root, sweep), *TINY),
            "--grid", "distill.feature.cwd.weight=30", "--with-baseline"]  # fmt: skip
    assert main(args) == 0
    cfg = load_config(SMOKE, smoke_overrides(shapes_root, sweep))
    torch.manual_seed(0)
    teacher = build_teacher(cfg, build_dataset(cfg.data, "val").num_categories + 1, frozen=False)
    save_state_dict_file(teacher.state_dict(), root / "teacher.pt")
    return {
        "sweep": sweep,
        "kd": sweep / "weight=30",
        "baseline": sweep / "baseline",
        "teacher": root / "teacher.pt",
    }


class _Page(HTMLParser):
    """The headings, images and metric cells (data-model, data-key, data-value, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.images: list[str] = []
        self.cells: list[tuple[str, str, str, str]] = []
        self._tag: str | None = None
        self._cell: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        a = dict(attrs)
        if tag == "img":
            self.images.append(str(a["src"]))
        if tag == "td" and "data-value" in a:
            self._cell = a
        if tag == "h2":
            self.h2.append("")

    def handle_data(self, data: str) -> None:
        if self._tag == "h2":
            self.h2[-1] += data
        if self._cell is not None:
            c = self._cell
            self.cells.append(
                (str(c["data-model"]), str(c["data-key"]), str(c["data-value"]), data)
            )
            self._cell = None

    def handle_endtag(self, tag: str) -> None:
        self._tag = None


def test_report_of_a_sweep_has_every_section_and_the_runs_numbers(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    args = ["report", str(trained["sweep"]), "--teacher", str(trained["teacher"]),
            "--out", str(out), "--images", "1", "--random-images", "1",
            "--min-score", "0.01"]  # fmt: skip
    assert main(args) == 0
    text = (out / "report.html").read_text()
    page = _Page()
    page.feed(text)
    assert [h.split(". ", 1)[1] for h in page.h2] == SECTIONS
    # self-contained: no script, nothing fetched; every figure embedded and also beside the page
    assert "<script" not in text.lower() and "http" not in text
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    for data in embedded:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes the whole image
            assert im.format == "PNG" and min(im.size) > 100
    files = sorted(out.glob("*.png"))
    names = ["detections", "per_class", "per_size", "pr_curves", "training_curves"]
    assert [f.stem for f in files] == names
    assert sorted(embedded) == sorted(f.read_bytes() for f in files)

    # every number from a run's metrics.json is that number, shown to 3 decimals
    seen: dict[str, set[str]] = {}
    for name in ("baseline", "kd"):
        run = trained[name]
        metrics = json.loads((run / "metrics.json").read_text())
        model = f"sweep/{run.name}"
        cells = [c for c in page.cells if c[0] == model]
        assert cells, model
        for _, key, value, shown in cells:
            expected = metrics["per_class"][key] if key in metrics["per_class"] else metrics[key]
            assert float(value) == expected, (model, key)
            assert shown == (f"{expected:.1f}" if key == "train_minutes" else f"{expected:.3f}"
                             if expected >= 0 else "–")  # fmt: skip
        seen[name] = {key for _, key, _, _ in cells}
    keys = {"map", "ap50", "ap75", "aps", "apm", "apl", "ar100", "train_minutes"}
    classes = set(json.loads((trained["kd"] / "metrics.json").read_text())["per_class"])
    assert seen["baseline"] == seen["kd"] == keys | classes
    # the classes where distillation helped least, in words
    kd, base = (json.loads((trained[k] / "metrics.json").read_text())["per_class"]
                for k in ("kd", "baseline"))  # fmt: skip
    gains = sorted((kd[c] - base[c], c) for c in kd)
    if gains[0][0] == gains[-1][0]:
        assert "on every class: no class was helped more" in text
    else:
        sentence = text.split("least on: <b>")[1].split("</b>")[0]
        assert sentence.startswith(f"{gains[0][1]} ({gains[0][0]:+.3f} AP)"), sentence
    assert "weight=30" in text.split('id="s7"')[1]  # the sweep's own table


def test_collect_explicit_runs_finds_the_plain_baseline(trained: dict[str, Path]) -> None:
    lineup = collect([trained["kd"], trained["baseline"]], teacher=str(trained["teacher"]))
    assert lineup.baseline is not None and lineup.baseline.run_dir == trained["baseline"]
    assert [m.run_dir for m in lineup.students] == [trained["kd"]]
    assert lineup.teacher is not None and lineup.teacher.metrics is None  # evaluated when drawn
    assert [m.role for m in lineup.models] == ["teacher", "baseline", "student"]
    given = collect([trained["kd"]], baseline=trained["baseline"])
    assert given.baseline is not None and given.teacher is None  # the smoke teacher: no weights
    assert any("no teacher" in n for n in given.notes)


def test_gain_and_gap_closed() -> None:
    cfg = load_config(SMOKE)

    def model(role: str, map_: float, aps: float) -> Model:
        return Model(role, role, "student", cfg, {"map": map_, "aps": aps})

    teacher, base, kd = (
        model("teacher", 0.5, -1.0),
        model("baseline", 0.1, 0.2),
        model("s", 0.3, 0.3),
    )
    gain, closed = gain_and_gap(kd, base, teacher, "map")
    assert gain == pytest.approx(0.2) and closed == pytest.approx(0.5)
    assert math.isnan(gain_and_gap(kd, base, teacher, "aps")[1])  # -1: no such objects
    assert math.isnan(gain_and_gap(kd, None, teacher, "map")[0])
    assert math.isnan(gain_and_gap(kd, base, model("t", 0.05, 0.0), "map")[1])  # teacher behind


def test_run_without_metrics_is_a_one_line_error_naming_it(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(trained["kd"] / "config.yaml", unfinished)
    cases = {unfinished: "has no metrics.json", tmp_path / "missing": "not a run directory"}
    for bad, why in cases.items():
        assert main(["report", str(bad), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{bad} {why}" in err.replace(":", ""), err
    with pytest.raises(ReportError, match="no such run directory or weights file"):
        collect([trained["kd"]], teacher=str(tmp_path / "nope.pt"))
    assert not (tmp_path / "out").exists()


def test_run_without_tensorboard_logs_is_left_out_of_the_curves_with_a_note(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.yaml", "metrics.json", "student.pt"):
        shutil.copy(trained["kd"] / name, bare)
    lineup = collect([bare], baseline=trained["baseline"])
    colors = {m.name: "#1f77b4" for m in lineup.models}
    html = training_section(lineup, colors, tmp_path)
    assert f"{bare} has no TensorBoard logs" in html
    assert "data:image/png;base64," in html  # the baseline's curves are still drawn
    assert "focal loss" in html and "feature KD" not in html  # the baseline has no KD terms
    with Image.open(tmp_path / "training_curves.png") as im:
        im.load()


def test_bench_kd_figure_and_report_runs_from_its_result(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """bench_kd.py's figure and report inputs, from a result laid out as its runs write it."""
    bench = load_bench_kd()
    metrics = {k: json.loads((trained[k] / "metrics.json").read_text()) for k in ("kd", "baseline")}

    def entry(m: dict[str, object], run: Path) -> dict[str, object]:
        return {**m, "map": {"mean": m["map"], "std": 0.0}, "run_dirs": [str(run)]}

    result = {
        "models": {
            "teacher": {**entry(metrics["kd"], trained["kd"]), "weights": str(trained["teacher"])},
            "student": entry(metrics["baseline"], trained["baseline"]),
            "student + KD": entry(metrics["kd"], trained["kd"]),
        },
        "date": "2026-12-03T00:00:00+00:00",
    }
    assert bench.report_runs(result) == ([trained["kd"]], trained["baseline"], trained["teacher"])
    figure = tmp_path / "bench_kd.png"
    bench.write_figures(result, figure, None)
    with Image.open(figure) as im:
        im.load()
        assert im.size[0] > 800
    del result["models"]["student"]["per_class"]  # results from before the report
    with pytest.raises(ValueError, match="student have no per-class AP"):
        bench_figure(result, figure)


def test_a_run_trained_in_fp16_on_a_gpu_is_reported_on_a_cpu(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """The report evaluates in its own --precision (default float32), not in the precision the
    run was trained in: a run whose config says fp16 (CUDA only) is evaluated here."""
    import yaml

    run = tmp_path / "gpu_run"
    shutil.copytree(trained["kd"], run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["train"]["mixed_precision"] = "fp16"
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    lineup = collect([run])
    evaluate_models(lineup)
    assert [m.evaluated for m in lineup.models if m.weights is not None] == [True]
