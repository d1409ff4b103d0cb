"""``distill export`` to ONNX, ONNX Runtime parity, ``predict --onnx`` and deployment numbers.

Models are tiny (smoke config: 64 px, FPN width 32, one head conv) with random weights and a
raised classification bias, so that they detect hundreds of boxes per image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.config import Config, load_config
from distill.data import build_dataset
from distill.deploy.export import DeployedDetector, export_command
from distill.deploy.onnx_runtime import ExportError, require_onnx
from distill.evaluation.evaluate import coco_metrics
from distill.models.card import dataset_categories, write_card
from distill.models.weights import save_state_dict_file
from students import STUDENTS, build_student
from teachers import build_teacher
from tests.conftest import REPO, smoke_overrides

pytest.importorskip("onnxruntime", reason="the 'export' extra: pip install -e '.[export]'")

from distill.deploy.onnx_runtime import (
    check_export,
    detect_onnx,
    match_detections,
    open_session,
    read_metadata,
    run_detections,
)

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
# tiny models: one torch thread (an export took 5.6 s of CPU with 2 under load, 2.4 s with 1)
pytestmark = pytest.mark.usefixtures("one_thread")


def save_model(cfg: Config, role: str, folder: Path, bias: float = -1.5) -> Path:
    """A random ``role`` of ``cfg`` saved with its card in ``folder``; returns the weights."""
    dataset = build_dataset(cfg.data, "val")
    num_classes = dataset.num_categories + 1
    torch.manual_seed(0)
    if role == "teacher":
        model = build_teacher(cfg, num_classes, frozen=False)
    else:
        model = build_student(cfg, num_classes)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(bias)
    weights = folder / f"{role}.pt"
    write_card(weights, cfg, role, num_classes, dataset_categories(dataset))
    save_state_dict_file(model.state_dict(), weights)
    return weights


@pytest.fixture(scope="module")
def run_dir(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with a tiny student and its card (no config.yaml: the card suffices)."""
    folder = tmp_path_factory.mktemp("export")
    cfg = load_config(SMOKE, smoke_overrides(shapes_root, folder))
    save_model(cfg, "student", folder)
    return folder


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    return export_command(run_dir, out=run_dir / "model.onnx")


@pytest.mark.parametrize("arch", sorted(STUDENTS))
def test_each_student_exports_and_matches_pytorch(
    arch: str, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [*smoke_overrides(shapes_root, tmp_path), f"student.arch={arch}"]
    cfg = load_config(SMOKE, [*overrides, "student.fpn_channels=16"])
    weights = save_model(cfg, "student", tmp_path)
    # the command compares ONNX Runtime with torchvision's RetinaNet on 64x64 and 48x64
    # images in batches of 1 and 3, and raises on a mismatch
    out = export_command(weights)
    assert out == tmp_path / "student.onnx" and out.is_file()
    printed = capsys.readouterr().out
    assert "1x3x64x64, 3x3x64x64, 1x3x48x64, 3x3x48x64" in printed
    assert "same count per image: yes" in printed


def test_teacher_exports_raw_and_matches_pytorch(shapes_root: Path, tmp_path: Path) -> None:
    cfg = load_config(SMOKE, smoke_overrides(shapes_root, tmp_path))
    save_model(cfg, "teacher", tmp_path)
    out = export_command(tmp_path, model="teacher", raw=True)
    session = open_session(out)
    cls_logits, deltas, anchors = session.run(None, {"images": torch.rand(2, 3, 64, 64).numpy()})
    meta = read_metadata(session)
    assert meta["role"] == "teacher" and meta["graph"] == "raw"
    # 64 px: grids 8, 4, 2, 1, 1 with 9 anchors each
    assert anchors.shape == (9 * (64 + 16 + 4 + 1 + 1), 4)
    assert cls_logits.shape == (2, anchors.shape[0], meta["num_classes"])
    assert deltas.shape == (2, anchors.shape[0], 4)


def test_parity_on_two_sizes_batches_one_and_three(exported: Path, run_dir: Path) -> None:
    """Sizes that are not multiples of 32 (the graph pads, as torchvision does) against the
    same graph in PyTorch eager, and the eager graph against torchvision's forward."""
    detector, _, _ = _load(run_dir)
    session = open_session(exported)
    deployed = DeployedDetector(detector).eval()
    compared = 0
    for size in ((64, 64), (50, 70)):
        for batch in (1, 3):
            images = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
            got = run_detections(session, images)
            with torch.no_grad():
                boxes, scores, labels, counts = deployed(images)
                reference = detector(list(images)) if size == (64, 64) else None
            for i, n in enumerate(counts.tolist()):
                want = {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
                assert len(got[i]["scores"]) == n > 0
                box, score, unmatched = match_detections(got[i], want)
                assert unmatched == 0 and box <= 1e-2 and score <= 1e-4
                compared += n
                if reference is not None:  # the eager graph is torchvision's RetinaNet
                    keep = reference[i]["labels"] > 0
                    for key in ("boxes", "scores", "labels"):
                        assert torch.equal(want[key], reference[i][key][keep]), key
    assert compared > 500


def test_a_mismatch_is_an_error(exported: Path, run_dir: Path) -> None:
    detector, card, _ = _load(run_dir)
    with torch.no_grad():
        detector.head.classification_head.cls_logits.bias.add_(0.5)  # not what was exported
    with pytest.raises(ExportError, match="does not match PyTorch"):
        check_export(open_session(exported), detector, card, raw=False)


def test_metadata_round_trip(exported: Path, run_dir: Path) -> None:
    import onnx

    card = json.loads((run_dir / "student.json").read_text())
    meta = read_metadata(open_session(exported))
    assert {k: meta[k] for k in card} == card  # the whole card, as written
    assert meta["opset"] == 18 and meta["graph"] == "detections"
    assert meta["outputs"] == ["boxes", "scores", "labels", "num_detections"]
    assert "by the caller" in meta["input"]["resize"]
    model = onnx.load(str(exported))
    props = {p.key: p.value for p in model.metadata_props}
    names = {str(c["label"]): c["name"] for c in card["categories"]}
    assert json.loads(props["class_names"]) == names
    assert float(props["score_threshold"]) == card["postprocess"]["score_threshold"]
    assert model.opset_import[0].version == 18


def test_predict_onnx_equals_pytorch(exported: Path, run_dir: Path, shapes_root: Path) -> None:
    images = shapes_root / "images" / "val"
    for name, source in (("pt", [str(run_dir)]), ("onnx", ["--onnx", str(exported)])):
        assert main(["predict", *source, str(images), "--out", str(run_dir / name)]) == 0
    pt = json.loads((run_dir / "pt" / "detections.json").read_text())
    ort = json.loads((run_dir / "onnx" / "detections.json").read_text())
    assert len(pt) == len(ort) > 0
    for a, b in zip(pt, ort):
        assert (a["file_name"], a["category_id"]) == (b["file_name"], b["category_id"])
        assert abs(a["score"] - b["score"]) <= 1e-4
        assert max(abs(p - q) for p, q in zip(a["bbox"], b["bbox"])) <= 1e-2


def test_eval_a_run_directory(run_dir: Path, shapes_root: Path, tmp_path: Path) -> None:
    """``distill eval RUN_DIR``: the run's config.yaml names the validation set."""
    from distill.config import dump_config

    run = tmp_path / "run"
    run.mkdir()
    for name in ("student.pt", "student.json"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    dump_config(load_config(SMOKE, smoke_overrides(shapes_root, run)), run / "config.yaml")
    assert main(["eval", str(run), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == 6


def test_onnx_map_equals_pytorch_on_shapes_val(
    exported: Path, run_dir: Path, shapes_root: Path
) -> None:
    from distill.data import predictions_to_coco
    from distill.device import make_accelerator
    from distill.evaluation.evaluate import predict
    from distill.models.retinanet import build_transform

    cfg = load_config(SMOKE, smoke_overrides(shapes_root, run_dir))
    dataset = build_dataset(cfg.data, "val")
    detector, _, _ = _load(run_dir)
    pt = predict(detector, build_transform(cfg), dataset, make_accelerator(cfg), batch_size=2)
    session = open_session(exported)
    ort = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        det = detect_onnx(session, [image])[0]
        image_id = int(target["image_id"])
        ort += predictions_to_coco(dataset, image_id, det["boxes"], det["scores"], det["labels"])
    names = {c: dataset.class_names[label - 1] for c, label in dataset.cat_id_to_label.items()}
    pt_map = coco_metrics(dataset.coco, pt, dataset.image_ids, names)["map"]
    ort_map = coco_metrics(dataset.coco, ort, dataset.image_ids, names)["map"]
    assert pt_map > 0 and abs(pt_map - ort_map) <= 0.001


def test_bad_inputs_are_one_line_errors(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare.pt"
    bare.write_bytes((run_dir / "student.pt").read_bytes())  # weights without their card
    cases = {
        str(tmp_path / "missing-run"): "no such run directory or weights file",
        str(bare): "has no card",
        str(tmp_path): "has no student.pt",
    }
    for path, words in cases.items():
        assert main(["export", path]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert main(["eval", str(run_dir)]) == 2  # no config.yaml: no validation set
    err = capsys.readouterr().err.strip()
    assert "no config.yaml beside it" in err and "\n" not in err
    assert main(["export", str(run_dir), "--format", "tflite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--format tflite: unknown format; known: onnx" in err and "\n" not in err


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch, run_dir: Path, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name: str, *args: object, **kwargs: object) -> object:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    assert main(["export", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install -e '.[export]'" in err and "onnxruntime" in err and "\n" not in err
    monkeypatch.undo()
    require_onnx()


def test_summary_deployment_numbers(shapes_root: Path, tmp_path: Path) -> None:
    from distill.deploy.latency import deploy_latency, format_deploy

    cfg = load_config(SMOKE, smoke_overrides(shapes_root, tmp_path))
    save_model(cfg, "student", tmp_path)
    detector, card, _ = _load(tmp_path)
    numbers = deploy_latency(detector, card, 64, tmp_path / "work", "student", 1, 2)
    assert numbers["pytorch_ms"] > 0 and numbers["onnxruntime_ms"] > 0
    assert numbers["onnx_mb"] == pytest.approx(
        (tmp_path / "work" / "student.onnx").stat().st_size / 1e6
    )
    assert numbers["weights_mb"] == pytest.approx(
        (tmp_path / "student.pt").stat().st_size / 1e6, rel=0.01
    )
    result = {
        "image_size": 64,
        "teacher": {"deploy": numbers},
        "student": {"deploy": numbers},
        "ratio": {
            "deploy": {k: 1.0 for k in ("pytorch_ms", "onnxruntime_ms", "weights_mb", "onnx_mb")}
        },
    }
    table = format_deploy(result)
    assert "ONNX Runtime ms" in table and "student/teacher" in table


def _load(run_dir: Path):  # type: ignore[no-untyped-def]
    from distill.deploy.rebuild import load_from_card

    return load_from_card(run_dir)
