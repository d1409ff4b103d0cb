"""``distill check`` names each deliberately wrong setup: a random teacher, a teacher of another
task, classes in another order, a KD weight 1e6; ``distill run`` runs the cheap checks first
and refuses a failure unless ``--force``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.cli import main
from distill.config import Config, load_config, replace
from distill.data import build_dataset
from distill.engine import preflight
from distill.engine.build import build_models
from distill.engine.preflight import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Finding,
    check_setup,
    failures,
    judge_teacher,
    sample_images,
    teacher_scores,
)
from distill.kd.feature import FeatureKD
from distill.models.card import dataset_categories, write_card
from distill.models.weights import save_state_dict_file
from teachers import build_teacher
from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


@pytest.fixture(scope="module")
def setup(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A random teacher saved with a card naming the dataset's classes, and smoke overrides."""
    tmp = tmp_path_factory.mktemp("check")
    # smoke.yaml's teacher is random on purpose; here it must be judged
    overrides = [*smoke_overrides(shapes_root, tmp / "run"), "teacher.allow_random=false"]
    cfg = load_config(SMOKE, overrides)
    dataset = build_dataset(cfg.data, "train")
    torch.manual_seed(0)
    teacher = build_teacher(cfg, dataset.num_categories + 1, frozen=False)
    weights = tmp / "teacher.pt"
    categories = dataset_categories(dataset)
    write_card(weights, cfg, "teacher", dataset.num_categories + 1, categories)
    save_state_dict_file(teacher.state_dict(), weights)
    return weights, overrides


def config(setup: tuple[Path, list[str]], *more: str) -> Config:
    weights, overrides = setup
    return load_config(SMOKE, [*overrides, f"teacher.weights={weights}", *more])


def rewrite_card(weights: Path, target: Path, change: dict[int, str]) -> Path:
    """A copy of ``weights`` whose card names the classes of labels in ``change`` otherwise."""
    target.write_bytes(weights.read_bytes())
    card = json.loads(weights.with_suffix(".json").read_text())
    for category in card["categories"]:
        category["name"] = change.get(category["label"], category["name"])
    target.with_suffix(".json").write_text(json.dumps(card))
    return target


def test_a_matching_setup_passes_every_cheap_check(setup: tuple[Path, list[str]]) -> None:
    crosskd = [
        "distill.crosskd.cls_weight=1",
        "distill.crosskd.box_weight=1",
        "distill.crosskd.layer=1",
    ]
    findings = by_check(check_setup(config(setup, *crosskd), sample=0))
    assert findings["teacher"].status == OK
    assert findings["classes"].status == OK, findings["classes"]
    assert findings["teacher mAP"].status == SKIP
    assert findings["shapes"].status == OK and "FPN widths teacher 256, student 32" in (
        findings["shapes"].detail
    )
    assert {"kd/feature", "kd/logit", "kd/box", "kd/crosskd_cls", "dry step"} <= set(findings)
    assert findings["dry step"].status == OK
    assert all(f.status != FAIL for f in findings.values())


def test_a_random_teacher_fails_on_its_map(setup: tuple[Path, list[str]]) -> None:
    findings = by_check(check_setup(config(setup), sample=6))
    assert findings["teacher mAP"].status == FAIL
    assert "not trained on this data" in findings["teacher mAP"].detail
    assert findings["teacher mAP"].value is not None and findings["teacher mAP"].value < 0.01
    # random on purpose (smoke runs): a warning, on its mAP too
    on_purpose = by_check(check_setup(config(setup, "teacher.allow_random=true"), sample=6))
    assert on_purpose["teacher mAP"].status == WARN
    assert "(teacher.allow_random)" in on_purpose["teacher mAP"].detail
    # no weights at all fails, in so many words, unless random on purpose
    random = config(setup, "teacher.weights=null", "teacher.allow_random=true")
    found = by_check(check_setup(random, sample=0))
    assert found["teacher"].status == WARN and "randomly initialised" in found["teacher"].detail
    assert found["teacher mAP"].status == SKIP
    refused = config(setup, "teacher.weights=null")
    findings = by_check(check_setup(refused, sample=0))
    assert findings["teacher"].status == FAIL and "teacher.allow_random" in (
        findings["teacher"].detail
    )


def test_classes_swapped_or_of_another_task_are_named(
    setup: tuple[Path, list[str]], tmp_path: Path
) -> None:
    weights, _ = setup
    names = {
        c["label"]: c["name"]
        for c in json.loads(weights.with_suffix(".json").read_text())["categories"]
    }
    swapped = rewrite_card(weights, tmp_path / "swapped.pt", {1: names[2], 2: names[1]})
    found = by_check(check_setup(config(setup, f"teacher.weights={swapped}"), sample=0))
    assert found["classes"].status == FAIL
    assert found["classes"].detail.startswith("2 of the dataset's")
    assert f"label 1: dataset {names[1]!r}" in found["classes"].detail
    assert f"teacher {names[2]!r}" in found["classes"].detail

    other = rewrite_card(
        weights, tmp_path / "other.pt", {label: f"vehicle{label}" for label in names}
    )
    found = by_check(check_setup(config(setup, f"teacher.weights={other}"), sample=0))
    assert found["classes"].status == FAIL and "'vehicle1'" in found["classes"].detail


def test_a_kd_weight_orders_of_magnitude_off_is_named(setup: tuple[Path, list[str]]) -> None:
    """Balance is the gradient each KD loss sends into the student's backbone and FPN against
    the detection loss's, and the weight that would bring it to 1 is named."""
    fine = by_check(check_setup(config(setup), sample=0))["kd/feature"]
    assert fine.status == OK and fine.value is not None and 0.1 < fine.value < 10
    findings = by_check(check_setup(config(setup, "distill.feature.cwd.weight=1e6"), sample=0))
    loud = findings["kd/feature"]
    assert loud.status == WARN and "drowns" in loud.detail
    # the gradient is linear in the weight: 1e6 / 0.2 times the fine one, and the suggestion
    # is the weight that gives a ratio of 1
    assert loud.value == pytest.approx(fine.value * 1e6 / 0.2, rel=1e-3)
    assert f"suggested {FeatureKD(config(setup).distill.feature).weight_key('feature')}=" in (
        loud.detail
    )
    suggested = float(loud.detail.split("suggested ")[1].split("=")[1].split(")")[0])
    assert suggested == pytest.approx(1e6 / loud.value, rel=1e-2)


def test_a_kd_loss_without_signal_on_the_sample_is_no_alarm(
    setup: tuple[Path, list[str]],
) -> None:
    """Box KD when no anchor reaches its score threshold is 0 on these images: no signal
    here, not "teaches nothing"."""
    findings = by_check(check_setup(config(setup, "distill.box.score_threshold=1.0"), sample=0))
    assert findings["kd/box"].status == SKIP and "no signal on these images" in (
        findings["kd/box"].detail
    )
    assert not failures(list(findings.values()))


def test_a_kd_part_left_out_of_the_loss_fails_the_dry_step(
    setup: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def with_orphan(*args: Any, **kwargs: Any) -> Any:
        module, teacher = build_models(*args, **kwargs)
        module.kd["feature"].register_parameter("orphan", torch.nn.Parameter(torch.ones(3)))
        return module, teacher

    monkeypatch.setattr(preflight, "build_models", with_orphan)
    findings = by_check(check_setup(config(setup), sample=0))
    assert findings["dry step"].status == FAIL
    assert "get no gradient" in findings["dry step"].detail
    assert "kd.feature.orphan" in findings["dry step"].detail


def test_classes_are_compared_as_the_model_sees_them(
    setup: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """Other category ids with the same names in the same label order are the same classes
    when the labels are 1..K; they differ only where the ids are the labels."""
    weights, _ = setup
    copy = tmp_path / "ids.pt"
    copy.write_bytes(weights.read_bytes())
    card = json.loads(weights.with_suffix(".json").read_text())
    for category in card["categories"]:
        category["id"] = 10 * category["id"]
    copy.with_suffix(".json").write_text(json.dumps(card))
    found = by_check(check_setup(config(setup, f"teacher.weights={copy}"), sample=0))
    assert found["classes"].status == OK, found["classes"]
    with_ids = config(setup, f"teacher.weights={copy}", "data.category_ids_as_labels=true")
    found = by_check(check_setup(with_ids, sample=0))
    assert found["classes"].status == FAIL and "(id 10)" in found["classes"].detail


def test_fgd_attention_on_a_handful_of_pixels_and_channels_is_named(
    setup: tuple[Path, list[str]],
) -> None:
    fgd = ["distill.feature.kind=fgd", "distill.feature.fgd.weight=5e-4"]
    findings = by_check(check_setup(config(setup, *fgd), sample=0))
    assert "kd/fgd attention" in findings  # FGD only
    assert "kd/fgd attention" not in by_check(check_setup(config(setup), sample=0))
    # the finest level distilled, in whatever order the levels are given
    cfg = config(setup, *fgd, "distill.feature.levels=[p4, p3]")
    torch.manual_seed(0)
    # features of a teacher trained from scratch here (|f| ~ 25, channel means ~10 apart) put
    # fgd.tau 0.5's channel softmax on about one channel; features at 1/100 of that scale do not
    large = {"p3": 25 + 10 * torch.randn(2, 256, 16, 16), "p4": torch.randn(2, 256, 8, 8)}
    large["p3"] = large["p3"] + 10 * torch.randn(1, 256, 1, 1)  # channels of different sizes
    small = {level: x / 100 for level, x in large.items()}
    term = FeatureKD(cfg.distill.feature)
    (warned,) = term.kind.findings(term.levels, large)
    (fine,) = term.kind.findings(term.levels, small)
    assert warned.status == WARN and fine.status == OK
    assert "on p3" in warned.detail and "distill.feature.fgd.tau" in warned.detail
    assert warned.value is not None and warned.value < 0.02 <= (fine.value or 0)
    # attention on one pixel warns as well, and a temperature that spreads it is named
    peaked = torch.ones(2, 256, 16, 16)
    peaked[:, :, 5, 7] = 40.0
    (one_pixel,) = term.kind.findings(term.levels, {"p3": peaked})
    assert one_pixel.status == WARN and "about 1 pixels and 256 channels" in one_pixel.detail
    assert "set distill.feature.fgd.tau to 8, the first of these over 2%" in one_pixel.detail


def test_check_command_and_run_refusal(
    setup: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, overrides = setup
    swapped = rewrite_card(weights, tmp_path / "swapped.pt", {1: "x", 2: "y"})
    out = tmp_path / "found.json"
    run_dir = tmp_path / "run"
    args = sets([*overrides, f"teacher.weights={swapped}", f"output.dir={run_dir}"])
    capsys.readouterr()
    assert main(["check", str(SMOKE), *args, "--sample", "0", "--out", str(out)]) == 1
    table = capsys.readouterr().err
    assert "classes" in table and "FAIL" in table and "1 failed" in table
    saved = json.loads(out.read_text())
    assert saved["failed"] == ["classes"] and saved["sample"] == 0
    assert {f["check"]: f["status"] for f in saved["findings"]}["classes"] == FAIL

    # distill run refuses before training, names the way on, and writes nothing
    assert main(["run", str(SMOKE), *args]) == 2
    err = capsys.readouterr().err
    assert "classes, teacher mAP: a check of the setup failed" in err and "--force" in err
    assert not run_dir.exists()


def test_run_refuses_a_random_or_unfit_teacher_and_reuses_a_recorded_verdict(
    setup: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, overrides = setup
    run_dir = tmp_path / "run"
    base = [*overrides, f"output.dir={run_dir}"]
    # a random teacher (no weights) is refused unless random on purpose
    assert main(["run", str(SMOKE), *sets(base)]) == 2
    err = capsys.readouterr().err
    assert "teacher: a check of the setup failed" in err and "teacher.allow_random" in err
    # a teacher no better than chance is refused: distill run evaluates it too
    unfit = sets([*base, f"teacher.weights={weights}"])
    assert main(["run", str(SMOKE), *unfit]) == 2
    err = capsys.readouterr().err
    assert "teacher mAP: a check of the setup failed" in err and "no better than chance" in err
    assert "(recorded in" not in err and not run_dir.exists()
    # a distill check's verdict in the run directory stands for the same teacher and data ...
    assert main(["check", str(SMOKE), *unfit, "--sample", "4"]) == 1
    verdict = json.loads((run_dir / "check.json").read_text())
    assert verdict["failed"] == ["teacher mAP"] and verdict["teacher"]["weights_file"]
    assert main(["run", str(SMOKE), *unfit]) == 2
    assert f"(recorded in {run_dir / 'check.json'})" in capsys.readouterr().err
    # ... and not for other weights (the file changed since)
    weights.touch()
    try:
        assert main(["run", str(SMOKE), *unfit]) == 2
        assert "(recorded in" not in capsys.readouterr().err
    finally:
        (run_dir / "check.json").unlink()


def val_with_empty_images_first(root: Path, tmp_path: Path, empty: int) -> Path:
    """A copy of the dataset whose validation file starts with ``empty`` images without boxes
    (the same picture files, other ids)."""
    copy = tmp_path / "data"
    copy.mkdir()
    (copy / "images").symlink_to(root / "images")
    (copy / "train.json").write_text((root / "train.json").read_text())
    val = json.loads((root / "val.json").read_text())
    first = val["images"][0]
    extra = [{**first, "id": 10_000 + k} for k in range(empty)]
    val["images"] = extra + val["images"]
    (copy / "val.json").write_text(json.dumps(val))
    return copy


def test_the_map_sample_holds_boxes_and_every_class(
    setup: tuple[Path, list[str]], shapes_root: Path, tmp_path: Path
) -> None:
    """The first validation images hold no boxes: a sample of the first N scored -1 (COCO's
    "no ground truth") and failed a good teacher; the sample is drawn from images with boxes,
    one of each class first, the same for the same seed."""
    root = val_with_empty_images_first(shapes_root, tmp_path, empty=8)
    cfg = config(setup, f"data.root={root}")
    val_set = build_dataset(replace(cfg.data, max_val_images=None), "val")
    picked = sample_images(val_set, 4, seed=0)
    assert picked == sample_images(val_set, 4, seed=0) and len(picked) >= 4
    assert all(len(val_set.labels_of(i)) > 0 for i in picked)
    present = {int(c) for i in range(len(val_set)) for c in val_set.labels_of(i)}
    assert {int(c) for i in picked for c in val_set.labels_of(i)} == present
    found = by_check(check_setup(cfg, sample=4))["teacher mAP"]
    assert found.value is not None and found.value >= 0
    assert f"{len(picked)} images of {val_set.ann_path} with boxes" in found.detail


def ground_truth_detections(dataset: Any, relabel: dict[int, int] | None = None) -> list[dict]:
    """The validation boxes as detections (score 1), labels mapped through ``relabel``."""
    results = []
    for ann in dataset.coco.dataset["annotations"]:
        cat = ann["category_id"]
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": (relabel or {}).get(cat, cat),
                "bbox": list(ann["bbox"]),
                "score": 1.0,
            }
        )
    return results


def test_the_teacher_is_judged_against_chance_its_classes_and_its_card(
    setup: tuple[Path, list[str]],
) -> None:
    """Detections that are the ground truth pass; the same boxes with the classes permuted
    fail as permuted classes (class-agnostic mAP high, class-aware low); boxes that are noise
    fail against chance; a right teacher far under the mAP its card records fails."""
    cfg = config(setup)
    val_set = build_dataset(cfg.data, "val")
    ids = list(val_set.image_ids)
    cats = sorted(val_set.cat_id_to_label)
    perfect = teacher_scores(val_set, ground_truth_detections(val_set), ids, cfg)
    assert perfect["map"] == pytest.approx(1.0) and perfect["agnostic"] == pytest.approx(1.0)
    assert perfect["chance"] < 0.5
    assert judge_teacher(perfect, None, "here").status == OK
    assert "judged on this data alone" in judge_teacher(perfect, None, "here").detail
    assert judge_teacher(perfect, (0.9, "its val set"), "here").status == OK

    rotate = dict(zip(cats, cats[1:] + cats[:1]))  # every class named as the next one
    permuted = teacher_scores(val_set, ground_truth_detections(val_set, rotate), ids, cfg)
    verdict = judge_teacher(permuted, None, "here")
    assert verdict.status == FAIL and "names them wrongly" in verdict.detail

    noise = [
        {"image_id": i, "category_id": c, "bbox": [1.0, 1.0, 3.0, 3.0], "score": 0.5}
        for i in ids
        for c in cats
    ]
    verdict = judge_teacher(teacher_scores(val_set, noise, ids, cfg), None, "here")
    assert verdict.status == FAIL and "no better than chance" in verdict.detail

    # a right teacher at another resize: the boxes 0.8 of their size about their centres
    # (IoU 0.64: counted at the IoU thresholds 0.5 and 0.55, 0.6 only)
    small = [
        {**r, "bbox": [r["bbox"][0] + r["bbox"][2] / 10, r["bbox"][1] + r["bbox"][3] / 10,
                       r["bbox"][2] * 0.8, r["bbox"][3] * 0.8]}
        for r in ground_truth_detections(val_set)
    ]  # fmt: skip
    shrunk = teacher_scores(val_set, small, ids, cfg)
    assert 0 < shrunk["map"] < 0.45
    assert judge_teacher(shrunk, None, "here").status == OK  # no card: this data alone
    verdict = judge_teacher(shrunk, (0.95, "500 images of its val.json"), "here")
    assert verdict.status == FAIL and "0.950 its card records on 500 images" in verdict.detail
    # somewhat under its card's: a warning, not a refusal
    verdict = judge_teacher(shrunk, (shrunk["map"] / 0.7, "its val.json"), "here")
    assert verdict.status == WARN and "x0.70 the" in verdict.detail


@pytest.mark.slow
def test_the_check_runs_once_under_two_processes(shapes_root: Path, tmp_path: Path) -> None:
    """Under a launch the main process checks and the others wait for its verdict: the teacher
    is built once (one warning of its random weights), the table printed once, and every
    process exits with the verdict (0: both received it)."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "distill", "check", str(SMOKE),
        *sets(smoke_overrides(shapes_root, out)), "--sample", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert log.count("has random weights") == 1, log[-3000:]  # the teacher built once
    assert log.count("the setup looks right") == 1
    assert json.loads((out / "check.json").read_text())["failed"] == []
