"""Weights know what they were trained with: anchors and resize, checked against the config.

A detector run with anchors or a resize other than those it was trained with still produces
boxes, only wrong ones (torchvision's COCO RetinaNet at 800 / 800 px with anchors from 16 px:
boxes hundreds of pixels off). So before weights are loaded, ``check_trained_settings`` finds
what they were trained with and refuses a config that differs, naming each key and the value
the weights expect. What the weights were trained with, first match wins:

1. ``weights_settings: ignore`` in the model's section: nothing is checked (a deliberate
   override); ``weights_settings: torchvision``: torchvision's COCO training settings.
2. A torchvision weights name (``COCO_V1``, ``DEFAULT``): torchvision's COCO training settings
   (800 / 1333 resize, its RetinaNet anchors, ``anchors.name: torchvision``).
3. The card beside a file (``teacher.json`` beside ``teacher.pt``, see ``distill.models.card``).
4. A card-less file that is one of torchvision's published files (its name, e.g.
   ``retinanet_resnet50_fpn_coco-eeacb38b.pth``, as torch's cache keeps it): torchvision's.
5. A card-less file with a resolved config beside it (``NAME.config.yaml`` beside ``NAME.pt``,
   or the ``config.yaml`` of the run directory it sits in): that config's anchors and resize.
6. A card-less state dict saved from a torchvision RetinaNet built with pretrained weights:
   its ResNet's BatchNorm layers are torchvision's FrozenBatchNorm2d, which have no
   ``num_batches_tracked`` entries (this project always writes them): torchvision's.
7. Anything else is not checked; a warning says how to have it checked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torchvision.models import WeightsEnum, get_model_weights

from distill.config import (
    TORCHVISION_ANCHORS,
    AnchorConfig,
    Config,
    ConfigError,
    load_config,
    resize_bounds,
)
from distill.models.card import card_path, read_card
from distill.models.retinanet import build_anchor_generator

log = logging.getLogger(__name__)

# torchvision's COCO RetinaNets (retinanet_resnet50_fpn and _v2, COCO_V1) were trained with
# GeneralizedRCNNTransform(min_size=800, max_size=1333) and its default anchor generator.
TORCHVISION_RESIZE = (800, 1333)
TORCHVISION_ARCHS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")


class SettingsError(ConfigError):
    """A config whose anchors or resize differ from what its weights were trained with."""


@dataclass(frozen=True)
class TrainedSettings:
    """Anchors and resize that weights were trained with, and where that is known from."""

    anchors: AnchorConfig
    resize: tuple[int, int]  # (min_size, max_size)
    source: str  # for messages: "torchvision's COCO training", "its card x.json", ...
    torchvision: bool = False  # torchvision's own COCO weights


def torchvision_settings(source: str) -> TrainedSettings:
    return TrainedSettings(TORCHVISION_ANCHORS, TORCHVISION_RESIZE, source, torchvision=True)


def torchvision_file_names() -> dict[str, str]:
    """{file name of a published torchvision RetinaNet weights file: its weights name}."""
    names = {}
    for arch in TORCHVISION_ARCHS:
        for weights in get_model_weights(arch):
            names[Path(weights.url).name] = f"{type(weights).__name__}.{weights.name}"
    return names


def is_torchvision_name(arch: str, weights: str) -> bool:
    """Whether ``weights`` is a torchvision weights name of ``arch`` (COCO_V1, DEFAULT, ...)."""
    enum = get_model_weights(arch)
    return weights.removeprefix(f"{enum.__name__}.") in [w.name for w in enum] + ["DEFAULT"]


def torchvision_categories(cfg: Config, weights: str) -> list[str] | None:
    """torchvision's COCO names (index = category id; "N/A" for ids COCO leaves unused) if the
    teacher's ``weights`` are its COCO weights: a weights name, its published file, or a file
    the config says is torchvision's (``teacher.weights_settings: torchvision``); else None."""
    enum = get_model_weights(cfg.teacher.arch)
    published = torchvision_file_names().get(Path(weights).name, "")
    if (
        is_torchvision_name(cfg.teacher.arch, weights)
        or published.startswith(enum.__name__)
        or cfg.teacher.weights_settings == "torchvision"
    ):
        return list(enum.DEFAULT.meta["categories"])
    return None


def trained_settings(
    weights: WeightsEnum | Path,
    mode: str = "check",
    state: Mapping[str, Tensor] | None = None,
) -> TrainedSettings | None:
    """What ``weights`` were trained with (the rules in this module's docstring), or None.

    mode:  the section's ``weights_settings`` (check | torchvision | ignore).
    state: the file's state dict, if already read (for rule 6).
    """

    if mode == "ignore":
        return None
    if mode == "torchvision":
        return torchvision_settings("torchvision's COCO training (weights_settings: torchvision)")
    if isinstance(weights, WeightsEnum):
        name = f"{type(weights).__name__}.{weights.name}"
        return torchvision_settings(f"torchvision's COCO training of {name}")
    card = read_card(weights)
    if card is not None:
        a = card["anchors"]
        anchors = AnchorConfig(
            name=a.get("name"),
            sizes=tuple(a["sizes"]),
            scales=tuple(a["scales"]),
            aspect_ratios=tuple(a["aspect_ratios"]),
        )
        resize = (int(card["resize"]["min_size"]), int(card["resize"]["max_size"]))
        return TrainedSettings(anchors, resize, f"its card {card_path(weights)}")
    published = torchvision_file_names().get(weights.name)
    if published is not None:
        return torchvision_settings(f"torchvision's COCO training of {published}")
    for beside in (weights.with_suffix(".config.yaml"), weights.parent / "config.yaml"):
        if beside.is_file():
            try:
                cfg = load_config(beside)
            except ConfigError as err:
                log.warning("%s: cannot read %s to check its settings: %s", weights, beside, err)
                break
            return TrainedSettings(cfg.anchors, resize_bounds(cfg.data), f"the config {beside}")
    if state is not None and _frozen_batchnorm(state):
        return torchvision_settings(
            "torchvision's COCO training (a state dict of a torchvision RetinaNet built with "
            "pretrained weights: FrozenBatchNorm2d, no num_batches_tracked entries)"
        )
    return None


def _frozen_batchnorm(state: Mapping[str, Tensor]) -> bool:
    """A ResNet body whose BatchNorm layers have running statistics but no
    ``num_batches_tracked``: torchvision's FrozenBatchNorm2d."""
    body = [k for k in state if k.startswith("backbone.body.")]
    return any(k.endswith(".running_var") for k in body) and not any(
        k.endswith(".num_batches_tracked") for k in body
    )


def check_trained_settings(
    cfg: Config,
    role: str,
    weights: WeightsEnum | Path,
    state: Mapping[str, Tensor] | None = None,
) -> TrainedSettings | None:
    """Raise SettingsError if ``cfg``'s anchors or resize differ from what ``weights`` (of the
    ``role`` section, teacher | student) were trained with; returns what they were trained
    with (None: unknown, not checked)."""
    section = cfg.teacher if role == "teacher" else cfg.student
    key = f"{role}.weights_settings"
    where = f"{role} weights {weights.name if isinstance(weights, WeightsEnum) else weights}"
    found = trained_settings(weights, section.weights_settings, state)
    if found is None:
        if section.weights_settings != "ignore":
            log.warning(
                "%s: no card, no config beside them and not torchvision's, so their anchors and "
                "resize are not checked against the config's (torchvision's COCO weights saved "
                "to a file: set %s=torchvision to check them)",
                where,
                key,
            )
        return None
    problems = _differences(cfg, found)
    if problems:
        hint = ""
        if found.torchvision:
            hint = (
                " (torchvision's: anchors.name=torchvision, data.min_size=800, data.max_size=1333)"
            )
        raise SettingsError(
            f"{where} were trained with other settings than the config's (known from "
            f"{found.source}): {'; '.join(problems)}. Set the expected values{hint}, or set "
            f"{key}=ignore to use these weights with other settings anyway"
        )
    return found


def _differences(cfg: Config, found: TrainedSettings) -> list[str]:
    """'key value (expected value)' for each anchor and resize key that differs."""

    problems = []

    def generator(anchors: AnchorConfig) -> tuple[object, object]:
        gen = build_anchor_generator(anchors)
        return gen.sizes, gen.aspect_ratios

    # Compared as the anchors they make: scales 1.26 and 2^(1/3) give the same integer sizes.
    if generator(cfg.anchors) != generator(found.anchors):
        for key in ("sizes", "scales", "aspect_ratios"):
            got, want = getattr(cfg.anchors, key), getattr(found.anchors, key)
            if got != want:
                problems.append(f"anchors.{key} {list(got)} (expected {list(want)})")
    got_min, got_max = resize_bounds(cfg.data)
    want_min, want_max = found.resize
    if (got_min, got_max) == (want_min, want_max):
        return problems
    if cfg.data.min_size is None and want_min == want_max:
        problems.append(f"data.image_size {cfg.data.image_size} (expected {want_min})")
    elif cfg.data.min_size is None:
        problems.append(
            f"data.image_size {cfg.data.image_size} (expected data.min_size {want_min} and "
            f"data.max_size {want_max} instead)"
        )
    else:
        for key, got, want in (("min_size", got_min, want_min), ("max_size", got_max, want_max)):
            if got != want:
                problems.append(f"data.{key} {got} (expected {want})")
    return problems
