"""Each feature kind has its own weight, ``distill.feature.<kind>.weight``, its reference's by
default (issue 43, item 5): a weight written for one kind never applies to another. An old
config's single ``distill.feature.weight`` is read as the weight of the kind it was written for.
(A kind added at runtime gets its own weight key too: ``tests/test_registries.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill.config import (
    ConfigError,
    check_resume_config,
    dump_config,
    load_config,
    replace,
    to_dict,
)
from distill.kd import KINDS, kd_terms, kd_weights, needs_teacher, weight_keys
from distill.kd.feature import FeatureKD
from tests.conftest import REPO

RECIPE = REPO / "configs" / "shapes" / "distill.yaml"  # CWD, weight 6
SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"  # CWD, weight 0.2
COCO = REPO / "configs" / "coco"
# each kind's reference weight on RetinaNet, and the COCO recipe that runs it as its reference did
REFERENCE = {"cwd": 10.0, "pkd": 10.0, "fgd": 1.0, "mgd": 2e-5}


def feature_weight(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> float | None:
    """The weight the feature term trains with (None: the term is off)."""
    return kd_weights(kd_terms(load_config(path, overrides).distill)).get("feature")


def write(tmp_path: Path, feature: str, name: str = "old.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"distill:\n  feature: {feature}\n")
    return path


def test_switching_the_kind_trains_with_the_new_kinds_reference_weight(tmp_path: Path) -> None:
    """The shapes recipe's CWD weight 6 does not follow ``--set distill.feature.kind=mgd``: MGD
    trains at MGD's reference 2e-5 (6 would be ~3e5 times it), unless its own weight is given."""
    assert feature_weight(RECIPE) == 6.0
    assert feature_weight(RECIPE, ["distill.feature.kind=mgd"]) == REFERENCE["mgd"]
    given = ["distill.feature.kind=mgd", "distill.feature.mgd.weight=1e-8"]
    assert feature_weight(RECIPE, given) == 1e-8
    # another kind's weight is simply unused while the kind is CWD
    assert feature_weight(RECIPE, ["distill.feature.mgd.weight=1e-3"]) == 6.0
    # an old config's one weight was written for its own kind (cwd), not for the one set over it
    old = write(tmp_path, "{kind: cwd, weight: 6.0}")
    assert feature_weight(old, ["distill.feature.kind=mgd"]) == REFERENCE["mgd"]
    cfg = load_config(old, ["distill.feature.kind=mgd"])
    term = kd_terms(cfg.distill)["feature"]
    assert term.weight_key("feature") == "distill.feature.mgd.weight"  # `distill check` names it


def test_each_kinds_default_weight_is_its_references() -> None:
    """MMRazor's RetinaNet configs: CWD and PKD loss_weight 10 on each level, MGD alpha_mgd 2e-5;
    FGD's: 1 (its loss carries alpha, beta, gamma, lambda); FitNet has no RetinaNet reference: 1.
    The COCO recipes, which run each method as its reference did, give the same values."""
    feature = load_config(None).distill.feature
    assert {kind: getattr(feature, kind).weight for kind in KINDS} == {"mse": 1.0, **REFERENCE}
    for kind, weight in REFERENCE.items():
        assert feature_weight(COCO / f"{kind}.yaml") == weight, kind
        assert feature_weight(None, [f"distill.feature.kind={kind}"]) == weight, kind


def test_the_old_key_is_read_as_the_weight_of_its_kind_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        cfg = load_config(write(tmp_path, "{kind: mgd, weight: 1.0e-6}"))
    feature = cfg.distill.feature
    assert (feature.kind, feature.mgd.weight, feature.cwd.weight) == ("mgd", 1e-6, 10.0)
    assert "distill.feature.weight read as distill.feature.mgd.weight" in caplog.text
    # no kind named: cwd, the kind an old config without one distilled with
    cfg = load_config(write(tmp_path, "{weight: 3.0}"))
    assert (cfg.distill.feature.kind, cfg.distill.feature.cwd.weight) == ("cwd", 3.0)
    # 0 turned feature KD off: kind null
    caplog.clear()
    with caplog.at_level("WARNING"):
        off = load_config(write(tmp_path, "{kind: cwd, weight: 0.0}"))
    assert off.distill.feature.kind is None and "feature" not in kd_terms(off.distill)
    assert "distill.feature.weight 0 read as distill.feature.kind null" in caplog.text
    # an old --set over a file in today's keys (a recorded command): over the file's own weight
    assert feature_weight(RECIPE, ["distill.feature.weight=30"]) == 30.0
    assert feature_weight(RECIPE, ["distill.feature.weight=0"]) is None
    assert load_config(RECIPE, ["distill.feature.weight=0"]).distill.feature.kind is None
    # an old file over a base in today's keys: its own weight wins, for the base's kind
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {RECIPE}\ndistill:\n  feature: {{weight: 3.0}}\n")
    assert feature_weight(child) == 3.0


def test_an_old_runs_config_resumes_with_the_config_in_todays_keys(tmp_path: Path) -> None:
    """A run's config.yaml written before the kinds had their own weights holds one
    ``distill.feature.weight``: the run resumes with today's config that means the same, and is
    refused with one that changes its kind's weight."""
    for new in (load_config(SMOKE), load_config(RECIPE.parent / "student.yaml")):
        raw = to_dict(new)
        feature = raw["distill"]["feature"]
        weight = feature[feature["kind"]]["weight"] if feature["kind"] else 0.0
        feature["kind"] = feature["kind"] or "cwd"
        for kind in KINDS:
            del feature[kind]["weight"]
        feature["weight"] = weight  # as it was written then
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        check_resume_config(new, tmp_path)  # no error
    smoke = load_config(SMOKE)
    dump_config(replace(smoke, **{"distill.feature.mgd.weight": 1.0}), tmp_path / "config.yaml")
    check_resume_config(smoke, tmp_path)  # a kind not in use
    dump_config(replace(smoke, **{"distill.feature.cwd.weight": 1.0}), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"distill\.feature\.cwd\.weight: 1\.0 -> 0\.2"):
        check_resume_config(smoke, tmp_path)


def test_the_old_and_the_new_key_together_is_an_error_naming_both(tmp_path: Path) -> None:
    both = write(tmp_path, "{kind: cwd, weight: 1.0, cwd: {weight: 2.0}}")
    with pytest.raises(ConfigError) as err:
        load_config(both)
    assert (
        f"distill.feature.weight in {both} is the old name of distill.feature.cwd.weight, which "
        "is given too" in str(err.value)
    )
    # the old weight for no kind, or for an unknown one, is refused rather than put anywhere
    with pytest.raises(ConfigError, match=r"distill\.feature\.weight in .*kind null"):
        load_config(write(tmp_path, "{kind: null, weight: 1.0}"))
    with pytest.raises(ConfigError, match=r"distill\.feature\.kind in .*'foo' is not one of null"):
        load_config(write(tmp_path, "{kind: foo, weight: 1.0}"))
    with pytest.raises(ConfigError, match=r"unknown key distill\.feature\.cwd\.wieght"):
        load_config(None, ["distill.feature.cwd.wieght=1"])
    with pytest.raises(ConfigError) as err:  # a typo of the old key: every kind's weight named
        load_config(None, ["distill.feature.wieght=1"])
    assert "did you mean mse.weight, cwd.weight, pkd.weight, fgd.weight or mgd.weight?" in str(
        err.value
    )


def test_every_weight_key_at_0_is_the_plain_student() -> None:
    """``weight_keys`` names every kind's weight: all of them 0 turns every term off, whatever
    the kind (the plain student of ``distill sweep --with-baseline`` and the benchmarks)."""
    keys = set(weight_keys())
    assert {f"distill.feature.{kind}.weight" for kind in KINDS} <= keys
    assert "distill.feature.weight" not in keys
    plain = [f"{key}=0" for key in weight_keys()]
    for kind in KINDS:
        cfg = load_config(RECIPE, [f"distill.feature.kind={kind}", *plain])
        assert kd_terms(cfg.distill) == {} and not needs_teacher(cfg.distill), kind


def test_kind_null_is_no_feature_kd_and_needs_no_teacher() -> None:
    from distill.engine.build import build_models
    from distill.report.collect import is_plain

    assert load_config(None).distill.feature.kind is None  # the default: off
    off = ["distill.feature.kind=null", "distill.logit.weight=0", "distill.box.weight=0"]
    cfg = load_config(SMOKE, off)
    assert cfg.distill.feature.cwd.weight == 0.2  # kept, unused
    assert not needs_teacher(cfg.distill) and is_plain(cfg)
    assert build_models(cfg, "student", 4)[1] is None  # no teacher built
    assert needs_teacher(load_config(SMOKE, off[:1]).distill)  # the other terms still on
    with pytest.raises(ValueError, match="kind is null"):
        FeatureKD(cfg.distill.feature).weights()
