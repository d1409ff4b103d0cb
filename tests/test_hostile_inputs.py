"""Hostile user inputs (issue 33, items 1, 2, 3, 7, 8, 11): truncated JPEGs, EXIF orientation,
16-bit PNGs, images predict cannot run, paths YAML would misread, names matplotlib would read
as math, and KD terms the report's curves must show. Every hostile file is made in tmp_path."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import main
from distill.config import load_config, override
from distill.data import CocoDetection, build_dataset, load_image
from distill.deploy.predict import _reason, _run_each, find_images
from distill.models.card import dataset_categories, write_card
from distill.models.weights import save_state_dict_file
from students import build_student
from tests.conftest import REPO, smoke_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def write_coco(root: Path, images: dict[str, tuple[int, int] | None]) -> Path:
    """``root/ann.json`` for the files ``root/images/<name>`` with (width, height) (None: not
    in the JSON) and one box each, the left half of the image; returns the JSON's path."""
    entries, anns = [], []
    for i, (name, size) in enumerate(images.items(), 1):
        entry: dict[str, Any] = {"id": i, "file_name": name}
        if size is not None:
            entry["width"], entry["height"] = size
        entries.append(entry)
        w, h = size or (8, 8)
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, w / 2, h]})
    path = root / "ann.json"
    categories = [{"id": 1, "name": "thing"}]
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": categories}))
    return path


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# 1. skip_bad_images catches truncated JPEGs
# --------------------------------------------------------------------------------------------


def test_skip_bad_images_catches_a_truncated_jpeg(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("good.jpg", "cut.jpg"):
        Image.fromarray(noise(48, 64)).save(folder / name, quality=95)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(folder / "cut.jpg") as im:
        im.verify()  # what the check did: it passes a truncated JPEG
    write_coco(tmp_path, {"good.jpg": (64, 48), "cut.jpg": (64, 48)})

    with caplog.at_level(logging.WARNING, logger="distill.data"):
        ds = CocoDetection(tmp_path, "ann.json", skip_bad_images=True)
    assert len(ds) == 1 and ds.num_skipped_images == 1
    assert str(folder / "cut.jpg") in caplog.text and "truncated" in caplog.text
    image, _ = ds[0]  # what is left loads
    assert image.shape == (3, 48, 64)


# --------------------------------------------------------------------------------------------
# 2. EXIF orientation and 16-bit PNGs
# --------------------------------------------------------------------------------------------


def rotated_jpeg(path: Path) -> None:
    """A JPEG stored 60 wide x 30 tall, black with a white top-left corner, whose EXIF says
    "rotate 90 degrees clockwise to show" (orientation 6): shown 30 wide x 60 tall, the white
    corner at the top right."""
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, quality=95, exif=exif)


def test_load_image_applies_the_exif_orientation(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rotated_jpeg(folder / "phone.jpg")
    image = load_image(folder / "phone.jpg")
    assert image.shape == (3, 60, 30)  # as shown: 30 wide, 60 tall
    assert image[:, :10, -10:].mean() > 0.9 and image[:, -10:, :10].mean() < 0.1

    # COCO's width / height are those of the shown image: the dataset reads and checks them so
    write_coco(tmp_path, {"phone.jpg": (30, 60)})
    for skip in (False, True):
        ds = CocoDetection(tmp_path, "ann.json", skip_bad_images=skip)
        shown, target = ds[0]
        assert shown.shape == (3, 60, 30) and ds.num_skipped_images == 0
        assert target["boxes"].tolist() == [[0.0, 0.0, 15.0, 60.0]]  # not clipped to 30 tall
    write_coco(tmp_path, {"phone.jpg": None})  # sizes from the file: those shown
    ds = CocoDetection(tmp_path, "ann.json")
    assert ds.coco.imgs[1]["width"] == 30 and ds.coco.imgs[1]["height"] == 60
    assert ds[0][0].shape == (3, 60, 30)


def test_load_image_scales_16_bit_pngs(tmp_path: Path) -> None:
    values = (np.arange(40 * 50).reshape(40, 50) * 32).astype(np.uint16)  # 0 .. 63968
    values[0, 0], values[0, 1] = 65535, 129  # the top, and a value that rounds up (129 / 257)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    image = load_image(path)
    eight = torch.from_numpy(np.round(values / 257).astype(np.uint8))
    assert image.shape == (3, 40, 50) and image.dtype == torch.float32
    for channel in image:
        assert torch.equal(channel, eight.float() / 255)  # x / 255, as every other image
    assert image[0, 0, 0] == 1.0 and image[0, 0, 1] == 1 / 255
    assert (image == 1.0).float().mean() < 0.01  # not the near-white image of PIL's convert


# --------------------------------------------------------------------------------------------
# 3. distill predict: per-image failures, results as it goes, --out, names, exit status
# --------------------------------------------------------------------------------------------

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"


@pytest.fixture(scope="module")
def student(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``distill predict`` arguments up to the inputs: a random student (bias raised: it
    detects) saved with its card, on the smoke config (64 px)."""
    tmp = tmp_path_factory.mktemp("hostile_predict")
    overrides = smoke_overrides(shapes_root, tmp / "run")
    cfg = load_config(SMOKE, overrides)
    dataset = build_dataset(cfg.data, "val")
    torch.manual_seed(0)
    model = build_student(cfg, dataset.num_categories + 1)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(-1.0)
    weights = tmp / "student.pt"
    write_card(weights, cfg, "student", dataset.num_categories + 1, dataset_categories(dataset))
    save_state_dict_file(model.state_dict(), weights)
    sets = [a for o in overrides for a in ("--set", o)]
    return ["predict", str(SMOKE), *sets, "--weights", str(weights)]


def photos(shapes_root: Path, folder: Path, count: int = 2) -> list[Path]:
    """``count`` of the shapes validation images copied into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((shapes_root / "images" / "val").glob("*.png"))[:count]
    for source in sources:
        shutil.copy(source, folder / source.name)
    return [folder / s.name for s in sources]


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The lines of stderr that are not tqdm's progress bar."""
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("predict:")]


def banner(path: Path) -> None:
    """A 10 x 2000 image: resized for a 64 px model it is 0 pixels tall, and the resize fails."""
    Image.fromarray(noise(10, 2000)).save(path)


def test_predict_goes_on_past_images_that_fail(
    student: list[str], shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    good = photos(shapes_root, folder)
    banner(folder / "b_banner.png")
    (folder / "c_broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main([*student, str(folder), "--out", str(out), "--draw", "--batch-size", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and summary["predicted"] == 2 and summary["complete"]
    reasons = {Path(f["file"]).name: f["reason"] for f in summary["failed"]}
    assert "Input and output sizes should be greater than 0" in reasons["b_banner.png"]
    assert "cannot read image" in reasons["c_broken.png"]
    rows = json.loads((out / "detections.json").read_text())
    assert rows and {r["file_name"] for r in rows} == {p.name for p in good}
    assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)  # input order
    assert sorted(p.name for p in (out / "drawn").glob("*.png")) == sorted(p.name for p in good)
    assert "2 failed" in capsys.readouterr().out


def test_a_failing_batch_runs_again_one_image_at_a_time() -> None:
    """Three images of one size in one batch, the middle one bad: only it is lost."""
    images = [torch.full((3, 8, 8), v) for v in (0.1, 0.9, 0.2)]
    calls = []

    def run(batch: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        calls.append(len(batch))
        if any(float(im.max()) > 0.5 for im in batch):
            raise RuntimeError("this image cannot run\nsecond line")
        return [{"scores": im.flatten()[:1]} for im in batch]

    outcomes = _run_each(run, [(im, i) for i, im in enumerate(images)])
    assert calls == [3, 1, 1, 1]
    assert [i for i, _ in outcomes] == [0, 1, 2]
    assert isinstance(outcomes[1][1], RuntimeError)
    assert [o["scores"].item() for _, o in (outcomes[0], outcomes[2])] == pytest.approx([0.1, 0.2])
    assert _reason(outcomes[1][1]) == "RuntimeError: this image cannot run"


def test_predict_fails_when_nothing_could_be_predicted(
    student: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    banner(folder / "b.png")
    out = tmp_path / "out"
    assert main([*student, str(folder), "--out", str(out)]) == 1
    [err] = error_lines(capsys)
    assert err.startswith("distill: error: none of the 2 images")
    assert str(folder / "a.png") in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 0 and len(summary["failed"]) == 2
    assert json.loads((out / "detections.json").read_text()) == []


def test_predict_checks_out_before_the_compute(
    student: list[str],
    shapes_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "photos"
    photos(shapes_root, folder, 1)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr("distill.deploy.predict.load_detector", no_model)
    assert main([*student, str(folder), "--out", str(out)]) == 2
    [err] = error_lines(capsys)
    assert f"--out {out}" in err and "a_file" in err


def test_predict_writes_as_it_goes(
    student: list[str], shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped at its second image, a run has written the first image's detections."""
    import distill.deploy.predict as predict

    folder = tmp_path / "photos"
    good = photos(shapes_root, folder, 3)
    real, calls = predict.detect, []

    def detect(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(predict, "SAVE_EVERY_S", 0.0, raising=False)  # before: none
    monkeypatch.setattr(predict, "detect", detect)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main([*student, str(folder), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 1 and not summary["complete"]
    rows = json.loads((out / "detections.json").read_text())
    assert rows and {r["file_name"] for r in rows} == {good[0].name}


def test_predict_out_inside_an_input_folder(
    student: list[str], shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    photos(shapes_root, folder)
    out = folder / "out"
    for _ in range(2):  # the second run does not read the first one's drawings
        assert main([*student, str(folder), "--out", str(out), "--draw"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images"] == summary["predicted"] == 2
    assert len(list((out / "drawn").glob("*.png"))) == 2
    capsys.readouterr()
    assert main([*student, str(folder), "--out", str(folder)]) == 2
    [err] = error_lines(capsys)
    assert "is the input folder" in err


def test_predict_names_are_unique_across_input_folders(
    student: list[str], shapes_root: Path, tmp_path: Path
) -> None:
    first = photos(shapes_root, tmp_path / "a", 1)[0]
    second = tmp_path / "b" / first.name  # same name, another image
    second.parent.mkdir()
    shutil.copy(sorted((shapes_root / "images" / "val").glob("*.png"))[-1], second)
    inputs = [str(tmp_path / "a"), str(tmp_path / "b"), str(first)]  # first given twice
    assert find_images([Path(i) for i in inputs]) == [
        (first, first.as_posix()),
        (second, second.as_posix()),
    ]
    out = tmp_path / "out"
    assert main([*student, *inputs, "--out", str(out), "--draw"]) == 0
    rows = json.loads((out / "detections.json").read_text())
    assert {r["file_name"] for r in rows} == {first.as_posix(), second.as_posix()}
    assert {r["image_id"] for r in rows if r["file_name"] == first.as_posix()} == {1}
    assert len(list((out / "drawn").rglob("*.png"))) == 2


def test_predict_onnx_goes_on_past_an_image_that_fails(
    student: list[str], shapes_root: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime", reason="the 'export' extra: pip install -e '.[export]'")
    from distill.deploy.export import export_command

    weights = Path(student[student.index("--weights") + 1])
    model = export_command(weights.parent, out=tmp_path / "model.onnx")
    folder = tmp_path / "photos"
    good = photos(shapes_root, folder, 1)
    banner(folder / "banner.png")
    out = tmp_path / "out"
    assert main(["predict", "--onnx", str(model), str(folder), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 1 and [f["file_name"] for f in summary["failed"]] == [
        "banner.png"
    ]
    assert "sizes should be greater than 0" in summary["failed"][0]["reason"]
    rows = json.loads((out / "detections.json").read_text())
    assert rows and {r["file_name"] for r in rows} == {good[0].name}


# --------------------------------------------------------------------------------------------
# 7. paths the demo and the sweep put into --set overrides
# --------------------------------------------------------------------------------------------

HOSTILE_PATHS = ["runs/demo #1", "runs/a: b", 'runs/it\'s "quoted"', "-lead/x", "yes", "~"]


@pytest.mark.parametrize("name", HOSTILE_PATHS)
def test_override_keeps_any_path(name: str, tmp_path: Path) -> None:
    for value in (name, tmp_path / name):
        assert load_config(None, [override("output.dir", value)]).output.dir == str(value)


def test_demo_and_sweep_keep_hostile_paths(tmp_path: Path) -> None:
    from distill.experiments.demo import demo_configs
    from distill.experiments.sweep import make_points, parse_grid

    root = tmp_path / "-data: #1"
    for name in HOSTILE_PATHS:
        out = tmp_path / name
        teacher = out / "teacher 'v1' #2.pt"
        cfgs = demo_configs(out, root, teacher)
        assert {k: c.output.dir for k, c in cfgs.items()} == {
            "teacher": str(out / "teacher"),
            "student": str(out / "student"),
            "student + KD": str(out / "distill"),
        }
        assert {c.data.root for c in cfgs.values()} == {str(root)}
        assert {cfgs[k].teacher.weights for k in ("student", "student + KD")} == {str(teacher)}

        grid = parse_grid(["distill.logit.temperature=1,2"])
        config = REPO / "configs" / "shapes" / "distill.yaml"
        points = make_points(config, [override("output.dir", out)], grid, with_baseline=True)
        assert [p.cfg.output.dir for p in points] == [str(out / p.name) for p in points]
        assert [p.cfg.distill.logit.temperature for p in points[:2]] == [1.0, 2.0]


# --------------------------------------------------------------------------------------------
# 8. names matplotlib would read as math; 11. every KD term in the training curves
# --------------------------------------------------------------------------------------------

CLASS_NAMES = ["a$^$b", "$_$", "x$\\alpha$", "c^d_e\\f", "_under"]
RUN_NAMES = ["run $^$", "_run_b"]


@pytest.fixture
def figure_texts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts of every figure that ``figures._save`` writes; each must be shown as given
    (no mathtext: ``x$\\alpha$`` would draw an alpha)."""
    import matplotlib.text

    import distill.report.figures as figures

    texts: list[str] = []
    save = figures._save

    def keep(fig: Any, path: Path) -> None:
        fig.canvas.draw()  # tick labels are made when drawn
        for text in fig.findobj(matplotlib.text.Text):
            if text.get_visible() and text.get_text():
                texts.append(text.get_text())
                assert not text.get_parse_math(), text.get_text()
        save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return texts


def test_report_figures_show_names_as_given(tmp_path: Path, figure_texts: list[str]) -> None:
    from distill.report.figures import (
        per_class_figure,
        per_size_figure,
        role_colors,
        training_figure,
    )

    colors = role_colors(["baseline", "student"])
    series = [
        (name, color, {c: 0.1 * i for i, c in enumerate(CLASS_NAMES)})
        for name, color in zip(RUN_NAMES, colors)
    ]
    per_class_figure(tmp_path / "per_class.png", CLASS_NAMES, series, f"gain of {RUN_NAMES[0]}")
    sizes = [(n, c, {"aps": 0.1, "apm": 0.2, "apl": 0.3}) for n, c in zip(RUN_NAMES, colors)]
    per_size_figure(tmp_path / "per_size.png", sizes, sizes)
    curves = {"loss/total": ([1, 2], [1.0, 0.5])}
    training_figure(tmp_path / "training.png", [(n, c, curves) for n, c in zip(RUN_NAMES, colors)])
    for name in ("per_class", "per_size", "training"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    shown = [t.removeprefix("\u200b") for t in figure_texts]
    for name in [*CLASS_NAMES, *RUN_NAMES, f"gain of {RUN_NAMES[0]}"]:
        assert name in shown, name  # legend entries too, "_run_b" among them


def test_detections_figure_shows_names_as_given(tmp_path: Path) -> None:
    from distill.report.detections import Outcome, detections_figure

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(noise(32, 32)).save(folder / "a.png")
    write_coco(tmp_path, {"a.png": (32, 32)})
    dataset = CocoDetection(tmp_path, "ann.json")
    columns = [(name, {1: Outcome()}) for name in RUN_NAMES]
    path = tmp_path / "detections.png"
    detections_figure(path, dataset, columns, [(1, "why $^$")], {1: CLASS_NAMES[0]})
    assert path.stat().st_size > 0


def test_training_curves_show_every_kd_term_logged(tmp_path: Path) -> None:
    from distill.kd import kd_terms, kd_weights, weight_keys
    from distill.report.figures import curve_panels, training_figure

    every_weight = ["distill.feature.kind=cwd", *(f"{key}=1" for key in weight_keys())]
    every_term = load_config(None, every_weight).distill
    losses = list(kd_weights(kd_terms(every_term)))  # feature, logit, box, crosskd_cls, crosskd_box
    assert {"crosskd_cls", "crosskd_box"} <= set(losses)
    logged = {f"kd_weighted/{loss}": ([1, 2], [0.2, 0.1]) for loss in losses}
    logged["kd_weighted/toy_term"] = ([1, 2], [0.3, 0.2])  # a term the registry does not know
    logged["loss/classification"] = logged["loss/total"] = ([1, 2], [1.0, 0.8])
    logged["kd/crosskd_cls"] = ([1, 2], [0.4, 0.2])  # unweighted: not a panel

    titles = training_figure(tmp_path / "curves.png", [("distilled", "#1f77b4", logged)])
    assert titles == [
        "focal loss (classification)",
        *(f"{loss} KD (weighted)" for loss in ["feature", "logit", "box"]),
        "crosskd_box KD (weighted)",
        "crosskd_cls KD (weighted)",
        "toy_term KD (weighted)",
        "total loss",
    ]
    assert list(curve_panels({"kd_weighted/crosskd_cls", "loss/total"})) == [
        "kd_weighted/crosskd_cls",
        "loss/total",
    ]
