"""``distill check`` names each deliberately wrong setup: a random teacher, a teacher of another
task, classes in another order, a KD weight 1e6; ``distill run`` runs the cheap checks first
and refuses a failure unless ``--force``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.config import Config, load_config
from distill.data import build_dataset
from distill.engine.preflight import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Finding,
    check_setup,
)
from distill.kd.feature import FeatureKD
from distill.models.card import dataset_categories, write_card
from distill.models.weights import save_state_dict_file
from teachers import build_teacher
from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


@pytest.fixture(scope="module")
def setup(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A random teacher saved with a card naming the dataset's classes, and smoke overrides."""
    tmp = tmp_path_factory.mktemp("check")
    overrides = smoke_overrides(shapes_root, tmp / "run")
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
    # no weights at all is said in so many words
    findings = by_check(check_setup(config(setup, "teacher.weights=null"), sample=0))
    assert findings["teacher"].status == WARN and "randomly initialised" in (
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
    findings = by_check(check_setup(config(setup, "distill.feature.cwd.weight=1e6"), sample=0))
    assert findings["kd/feature"].status == WARN
    assert "drowns" in findings["kd/feature"].detail
    assert findings["kd/logit"].status == OK  # the others are fine


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
    assert "classes: a check of the setup failed" in err and "--force" in err
    assert not run_dir.exists()
