"""A feature kind added at runtime, in this file alone: its own keys (defaults, bounds), its
default levels, its trainable part and its loss go through the config reader, the resolved
config, the resume check and the training step without any other file naming it. (A KD term
added the same way: ``tests/test_kd_terms.py``, ``ToyKD``.)"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from distill.config import ConfigError, dump_config, load_config, replace
from distill.config.resume import check_resume_config
from distill.engine.build import build_models
from distill.engine.step import step_losses, teacher_forward
from distill.kd import Batch, FeatureKind, register_kind, unregister_kind
from distill.kd.features import KindConfig, KindPart
from distill.models.retinanet import DenseOutputs, build_transform
from tests.conftest import REPO

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
ON = ["distill.feature.kind=gain", "distill.feature.gain.weight=1", "distill.logit.weight=0",
      "distill.box.weight=0"]  # fmt: skip


@dataclass(frozen=True)
class GainConfig(KindConfig):
    weight: float = 0.5
    scale: float = 2.0


class GainPart(KindPart):
    """A learnable gain per level on the adapted student's features."""

    def __init__(self, levels: Sequence[str]) -> None:
        super().__init__()
        self.gain = nn.ParameterDict({lv: nn.Parameter(torch.tensor(1.5)) for lv in levels})

    def forward(
        self, adapted: Mapping[str, Tensor], teacher: DenseOutputs | None
    ) -> dict[str, Tensor]:
        return {f"gain/{lv}": adapted[lv] * self.gain[lv] for lv in self.gain}


class Gain(FeatureKind):
    """``scale * mean |gain * student - teacher|`` per level."""

    name = "gain"
    config_class = GainConfig
    positive = ("scale",)
    default_levels = ("p4", "p5")
    cfg: GainConfig

    def part(self, levels: Sequence[str], channels: int, seed: int) -> GainPart:
        return GainPart(levels)

    def loss(
        self, level: str, student: Tensor, teacher: Tensor, extras: Mapping[str, Tensor],
        batch: Batch,
    ) -> Tensor:  # fmt: skip
        return self.cfg.scale * (extras[f"gain/{level}"].float() - teacher.float()).abs().mean()


@pytest.fixture
def gain() -> Iterator[type[Gain]]:
    register_kind(Gain)
    yield Gain
    unregister_kind("gain")


def test_a_kind_added_at_runtime_owns_its_keys_defaults_and_bounds(
    gain: type[Gain], tmp_path: Path
) -> None:
    cfg = load_config(SMOKE, ON)
    feature = cfg.distill.feature
    assert feature.levels == ("p4", "p5")  # the kind's default levels, resolved
    assert feature.gain == GainConfig(weight=1.0) and feature.cwd.tau == 1.0  # every kind's section
    assert load_config(SMOKE, [*ON, "distill.feature.gain.scale=3"]).distill.feature.gain.scale == 3
    with pytest.raises(ConfigError, match=r"distill\.feature\.gain\.scale in --set .* > 0"):
        load_config(SMOKE, [*ON, "distill.feature.gain.scale=0"])
    with pytest.raises(ConfigError, match=r"unknown key distill\.feature\.gain\.scal\b"):
        load_config(SMOKE, [*ON, "distill.feature.gain.scal=3"])
    dump_config(cfg, tmp_path / "config.yaml")  # a run's resolved config reads back the same
    assert load_config(tmp_path / "config.yaml") == cfg
    # a CWD run resumes whatever the other kinds' keys say; the gain run does not
    cwd = load_config(SMOKE)
    dump_config(replace(cwd, **{"distill.feature.gain.scale": 5.0}), tmp_path / "config.yaml")
    check_resume_config(cwd, tmp_path)
    dump_config(replace(cfg, **{"distill.feature.gain.scale": 5.0}), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"distill\.feature\.gain\.scale: 5\.0 -> 2\.0"):
        check_resume_config(cfg, tmp_path)


def test_a_kind_added_at_runtime_has_its_own_weight_key(gain: type[Gain]) -> None:
    """``distill.feature.gain.weight``, its config's default (0.5) unless given: listed by
    ``weight_keys`` (all 0: the plain student), gone with the kind; a kind whose section has no
    weight is refused when it is registered."""
    from distill.kd import kd_terms, kd_weights, needs_teacher, weight_keys

    assert "distill.feature.gain.weight" in weight_keys()
    cfg = load_config(SMOKE, ["distill.feature.kind=gain"])
    assert kd_weights(kd_terms(cfg.distill))["feature"] == 0.5
    assert kd_terms(cfg.distill)["feature"].weight_key("feature") == "distill.feature.gain.weight"
    assert kd_weights(kd_terms(load_config(SMOKE, ON).distill)) == {"feature": 1.0}
    plain = load_config(SMOKE, [*ON, *(f"{key}=0" for key in weight_keys())])
    assert not needs_teacher(plain.distill)
    with pytest.raises(ConfigError, match=r"distill\.feature\.gain\.weight in .* >= 0"):
        load_config(SMOKE, [*ON, "distill.feature.gain.weight=-1"])
    unregister_kind("gain")
    assert "distill.feature.gain.weight" not in weight_keys()

    class NoWeight(Gain):
        name = "noweight"
        config_class = dataclass(frozen=True)(type("NoWeightConfig", (), {}))  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"noweight: .* must subclass KindConfig"):
        register_kind(NoWeight)


def test_a_kind_added_at_runtime_trains_through_the_step(gain: type[Gain]) -> None:
    """Its part sits in the trainable module and gets a gradient; its loss is the step's
    feature term, as computed by hand."""
    from accelerate import Accelerator

    cfg = load_config(SMOKE, ON)
    torch.manual_seed(0)
    module, teacher = build_models(cfg, "student", 9)
    assert teacher is not None
    part = module.kd["feature"].part
    assert isinstance(part, GainPart) and set(part.gain) == {"p4", "p5"}
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    image_list, targets = build_transform(cfg)(images, targets)
    teacher_out = teacher_forward(Accelerator(cpu=True), teacher, image_list, [module.terms])
    total, logs = step_losses(
        module, module.detector, module.terms, image_list, targets, teacher_out, 1.0
    )
    out = module(image_list.tensors, image_list.image_sizes, teacher_out)
    expected = sum(
        2.0 * (out.adapted[lv] * 1.5 - teacher_out.features[lv]).abs().mean() for lv in ("p4", "p5")
    )
    torch.testing.assert_close(logs["kd/feature"], expected)
    total.backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in part.gain.values())


def test_an_unregistered_kind_is_refused(gain: type[Gain]) -> None:
    unregister_kind("gain")
    with pytest.raises(ConfigError, match=r"distill\.feature\.kind .*'gain' is not one of"):
        load_config(SMOKE, ON)
    with pytest.raises(ConfigError, match=r"unknown key distill\.feature\.gain"):
        load_config(SMOKE, ["distill.feature.gain.scale=3"])


@pytest.mark.parametrize(
    ("old", "new"),
    [("tau", "cwd.tau"), ("fgd_tau", "fgd.tau"), ("fgd_lambda", "fgd.lambda_"),
     ("mgd_ratio", "mgd.ratio")],
)  # fmt: skip
def test_a_key_that_moved_into_a_kinds_section_is_read_at_its_new_place(
    old: str, new: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A config (an old run's config.yaml, an old recipe) that names a kind's key where it sat
    before the kinds had sections of their own is read with the value at its new place, and a
    warning names both; both names given is an error."""
    path = tmp_path / "old.yaml"
    path.write_text(f"distill:\n  feature: {{kind: cwd, weight: 1.0, {old}: 0.5}}\n")
    with caplog.at_level("WARNING", logger="distill.config"):
        cfg = load_config(path)
    kind, key = new.split(".")
    assert getattr(getattr(cfg.distill.feature, kind), key) == 0.5
    assert f"distill.feature.{old} -> distill.feature.{new}" in caplog.text
    both = tmp_path / "both.yaml"
    both.write_text(f"distill:\n  feature: {{{old}: 0.5, {kind}: {{{key}: 0.25}}}}\n")
    with pytest.raises(ConfigError, match=rf"distill\.feature\.{old} in {both} is the old name"):
        load_config(both)


@pytest.mark.parametrize("kind", ["fgd", "mgd"])
def test_a_checkpoint_from_before_the_kinds_parts_loads(kind: str) -> None:
    """FGD's blocks and MGD's generators (and its mask counter) sat at the feature module's top
    before the kinds had parts: such a state dict loads, strictly, at their new place."""
    from distill.kd.feature import MOVED_KEYS

    cfg = load_config(SMOKE, [f"distill.feature.kind={kind}"])
    torch.manual_seed(0)
    module, _ = build_models(cfg, "student", 9)
    state = module.state_dict()
    old_state = {}
    for key, value in state.items():
        for old, new in MOVED_KEYS:
            key = key.replace(f"kd.feature.{new}", f"kd.feature.{old}")
        old_state[key] = value.clone() + 1 if value.is_floating_point() else value.clone()
    assert set(old_state) != set(state)  # the old names
    torch.manual_seed(1)
    fresh, _ = build_models(cfg, "student", 9)
    fresh.load_state_dict(old_state)  # strict
    for key, value in fresh.state_dict().items():
        expected = state[key] + 1 if value.is_floating_point() else state[key]
        torch.testing.assert_close(value, expected)
