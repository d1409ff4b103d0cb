"""The KD-term interface: a term defined outside the package, registered at runtime, goes through
a real training run with nothing of the engine changed; and the engine names no term."""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet

from distill.config import ConfigError, DistillConfig, load_config
from distill.data import build_dataset
from distill.engine.build import build_models
from distill.engine.checkpoint import state_digest
from distill.engine.loop import train
from distill.engine.step import step_losses, teacher_forward, train_step
from distill.engine.trainable import TrainableModule
from distill.kd import (
    KDTerm,
    TermModule,
    combine,
    distill_terms,
    kd_terms,
    kd_weights,
    needs_teacher,
    register_term,
    unregister_term,
)
from distill.kd.base import Batch
from distill.losses import mse_loss
from distill.models.retinanet import DenseOutputs
from distill.models.weights import load_state_dict_file
from distill.report.figures import read_scalars
from students import build_student
from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"


@contextmanager
def head_input(model: RetinaNet) -> Iterator[list[Tensor]]:
    """While inside, the P3 feature that ``model``'s head gets (a forward pre-hook)."""
    held: list[Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda _m, args: held.append(args[0][0]))
    try:
        yield held
    finally:
        hook.remove()


class ToyModule(TermModule):
    """A learnable 1x1 projection of the student's P3 head input (held by a hook on the
    student's head, as CrossKD holds a tower conv) to the teacher's width."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.grad_sums: list[float] = []  # |gradient| of proj.weight, one per backward
        self.proj.weight.register_hook(lambda g: self.grad_sums.append(float(g.abs().sum())))

    def watch(self, detector: RetinaNet) -> Any:
        return head_input(detector)

    def forward(self, out: DenseOutputs, teacher: DenseOutputs | None, held: list[Tensor]) -> None:
        out.extras["toy/p3"] = self.proj(held[0])


@dataclass(frozen=True)
class ToyProbe:
    """The teacher's P3 head input, by a hook on the teacher's head."""

    @contextmanager
    def watch(self, teacher: RetinaNet) -> Iterator[Callable[[DenseOutputs], dict[str, Tensor]]]:
        with head_input(teacher) as held:
            yield lambda _out: {"toy/teacher_p3": held[0]}


@dataclass(frozen=True)
class ToyConfig:
    weight: float = 0.5
    scale: float = 1.0  # a key of its own, bounded by the term


@dataclass(frozen=True)
class ToyKD(KDTerm):
    """MSE between the projected student P3 and the teacher's P3; its settings are its own:
    the section ``distill.toy``, which the term declares."""

    name: ClassVar[str] = "toy"
    config_class: ClassVar[type] = ToyConfig
    positive: ClassVar[tuple[str, ...]] = ("scale",)
    built: ClassVar[list[tuple[ToyModule, Tensor, nn.Module, str]]] = []

    weight: float = 0.5

    @classmethod
    def from_config(cls, cfg: DistillConfig) -> ToyKD | None:
        section = cls.section_of(cfg)
        return cls(section.weight) if cls.is_on(section) else None

    def weights(self) -> dict[str, float]:
        return {"toy": self.weight}

    def build(self, student: RetinaNet, teacher: RetinaNet, seed: int) -> ToyModule:
        part = ToyModule(student.backbone.out_channels, teacher.backbone.out_channels)
        ToyKD.built.append(
            (part, part.proj.weight.detach().clone(), teacher, state_digest(teacher))
        )
        return part

    def teacher_probes(self) -> tuple[ToyProbe]:
        return (ToyProbe(),)

    def losses(
        self, student: DenseOutputs, teacher: DenseOutputs, batch: Batch
    ) -> dict[str, Tensor]:
        return {"toy": mse_loss(student.extras["toy/p3"], teacher.extras["toy/teacher_p3"])}


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[ToyKD]]:
    register_term(ToyKD)
    monkeypatch.setattr(ToyKD, "built", [])
    yield ToyKD
    unregister_term("toy")


OFF = ["distill.feature.kind=null", "distill.logit.weight=0", "distill.box.weight=0"]


def test_a_registered_term_is_configured_with_its_own_weights(
    toy: type[ToyKD], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None)  # every weight of the built-in terms 0, the toy's default 0.5
    assert needs_teacher(cfg.distill) and kd_weights(kd_terms(cfg.distill)) == {"toy": 0.5}
    assert cfg.distill.toy == ToyConfig()
    off = load_config(None, ["distill.toy.weight=0"])
    assert not needs_teacher(off.distill)
    with pytest.raises(ConfigError, match=r"distill\.toy\.scale in --set .*must be > 0"):
        load_config(None, ["distill.toy.scale=0"])
    with pytest.raises(ConfigError, match=r"unknown key distill\.toy\.scael.*did you mean scale"):
        load_config(None, ["distill.toy.scael=2"])
    unregister_term("toy")
    assert not needs_teacher(DistillConfig()) and kd_weights(kd_terms(DistillConfig())) == {}
    with pytest.raises(ConfigError, match=r"unknown key distill\.toy"):
        load_config(None, ["distill.toy.weight=1"])


def test_a_term_added_at_runtime_trains_with_the_student_and_stays_out_of_student_pt(
    toy: type[ToyKD], shapes_root: Path, tmp_path: Path
) -> None:
    """The toy alone (the real terms off) through ``train``: its loss is logged as ``kd/toy``,
    its projection gets a gradient at each step and moves, ``student.pt`` holds the detector
    alone and the teacher is unchanged."""
    out = tmp_path / "toy"
    cfg = load_config(SMOKE, [*smoke_overrides(shapes_root, out), *OFF, "train.max_steps=2",
                              "train.epochs=1", "data.max_val_images=2", "eval.every_epochs=0",
                              "eval.images_logged=0", "train.log_every=1"])  # fmt: skip
    metrics = train(cfg)
    assert metrics["step"] == 2
    assert len(toy.built) == 1
    part, initial, teacher, teacher_digest = toy.built[0]

    scalars = read_scalars(out / "tb")
    steps, values = scalars["kd/toy"]
    assert steps == [1, 2] and all(math.isfinite(v) and v > 0 for v in values)
    assert scalars["kd_weighted/toy"][1] == pytest.approx([0.5 * v for v in values])
    assert {tag for tag in scalars if tag.startswith("kd/")} == {"kd/toy", "kd/scale"}

    assert len(part.grad_sums) == 2 and all(g > 0 for g in part.grad_sums)
    assert not torch.equal(part.proj.weight.detach(), initial)  # the optimizer stepped it

    student = load_state_dict_file(out / "student.pt")
    plain = build_student(cfg, build_dataset(cfg.data, "train").num_categories + 1)
    assert set(student) == set(plain.state_dict())  # the detector's keys, no toy part

    assert state_digest(teacher) == teacher_digest
    assert json.loads((out / "metrics.json").read_text())["teacher_digest"] == teacher_digest
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())


def test_the_trainable_module_holds_the_part_under_its_terms_name(toy: type[ToyKD]) -> None:
    cfg = load_config(SMOKE, OFF)
    module, teacher = build_models(cfg, "student", 9)
    assert isinstance(module, TrainableModule) and teacher is not None
    assert list(module.kd) == ["toy"]
    extras = {k for k in module.state_dict() if not k.startswith("detector.")}
    assert extras == {"kd.toy.proj.weight", "kd.toy.proj.bias"}


# ---------------------------------------------------------------------------------------------
# The engine loops over terms and names none
# ---------------------------------------------------------------------------------------------

TERM_WORDS = re.compile(
    r"feature|logit|box|crosskd|cross_head|adapter|global_[st]|fgd|mgd|generator|toy", re.I
)
ENGINE = (
    build_models, teacher_forward, step_losses, train_step, TrainableModule, distill_terms, combine
)  # fmt: skip


def code_without_docstrings(obj: Any) -> str:
    """The source of a function or class, docstrings and comments left out."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and ast.get_docstring(node):
            node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


LAYERS_ABOVE_AND_BELOW = ("config", "cli", "engine", "experiments")


@pytest.mark.parametrize("package", LAYERS_ABOVE_AND_BELOW)
def test_the_config_the_engine_and_the_command_line_name_no_kd_method(package: str) -> None:
    """Their code (docstrings and comments aside) names no KD term, feature kind or KD part:
    the terms and kinds declare what they own in distill/kd."""
    for path in sorted((REPO / "distill" / package).glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and ast.get_docstring(
                node
            ):
                node.body = node.body[1:] or [ast.Pass()]
        code = ast.unparse(tree)
        # generic words: the targets' boxes and box deltas, logits in a help text, generators
        for word in ("boxes", "bbox_regression", "box deltas", "class logits", "Generator",
                     "anchor_generator", "feature_strides", "its boxes"):  # fmt: skip
            code = code.replace(word, "")
        names = re.compile(r"feature|logit|\bbox|crosskd|adapter|fgd|mgd|cwd|pkd|mse", re.I)
        assert not names.findall(code), (path, names.findall(code))


@pytest.mark.parametrize("obj", ENGINE, ids=lambda o: o.__name__)
def test_the_engine_names_no_kd_term(obj: Any) -> None:
    code = code_without_docstrings(obj)
    # bounding boxes are everyone's: the targets' "boxes" and the detector's box loss
    code = code.replace("boxes", "").replace("bbox_regression", "")
    assert not TERM_WORDS.findall(code), TERM_WORDS.findall(code)
