"""A trained model from its weights alone: a run directory or a weights file and its card.

    detector, card, weights = load_from_card("runs/shapes/distill")              # student.pt
    detector, card, weights = load_from_card("runs/shapes/teacher", "teacher")   # teacher.pt
    detector, card, weights = load_from_card("elsewhere/student.pt")             # + student.json

The card (``distill.models.card``) written beside the weights holds the architecture and its
options, the classes, anchors, resize, normalisation and detection settings;
``config_from_card`` turns it back into the ``Config`` the project's builders take, so the model
is rebuilt by the same code that trained it, without the training config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchvision.models.detection import RetinaNet

from distill.config import Config
from distill.evaluation.evaluate import load_detector
from distill.models.card import card_path, config_from_card, read_card
from distill.models.weights import WeightsError

ROLES = ("student", "teacher")


def find_weights(path: str | os.PathLike[str], model: str = "student") -> Path:
    """The weights file that ``path`` names: a run directory's ``{model}.pt``, or a file.

    Raises FileNotFoundError (one line, naming the path) when there is none.
    """
    if model not in ROLES:
        raise ValueError(f"model must be one of {ROLES}, got {model!r}")
    path = Path(path)
    if path.is_dir():
        weights = path / f"{model}.pt"
        if not weights.is_file():
            present = sorted(p.name for p in path.glob("*.pt"))
            hint = f" (it has {', '.join(present)})" if present else ""
            raise FileNotFoundError(
                f"{path} has no {weights.name}: not a finished {model} run directory{hint}"
            )
        return weights
    if not path.exists():
        raise FileNotFoundError(f"no such run directory or weights file: {path}")
    return path


def card_config(path: str | os.PathLike[str], model: str = "student") -> tuple[Config, Path]:
    """(the config rebuilt from the card, the weights file) of a run directory or weights file.
    A file without a card is an error naming the missing card."""
    weights = find_weights(path, model)
    card = read_card(weights)
    if card is None:
        raise WeightsError(
            f"{weights} has no card {card_path(weights)}: without it the architecture, classes "
            "and resize are unknown; pass the training config instead, or re-save the weights "
            "with a current distill"
        )
    return config_from_card(card, weights), weights


def load_from_card(
    path: str | os.PathLike[str], model: str = "student"
) -> tuple[RetinaNet, dict[str, Any], Path]:
    """(detector in eval mode with the card's detection settings, card, weights file) of a run
    directory or a weights file. A file without a card is an error naming the missing card."""

    cfg, weights = card_config(path, model)
    card = read_card(weights)
    assert card is not None  # card_config read it
    detector = load_detector(cfg, card["role"], str(weights), int(card["num_classes"]))
    return detector, card, weights


__all__ = ["card_config", "config_from_card", "find_weights", "load_from_card"]
