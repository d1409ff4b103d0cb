"""The feature-KD kinds (``distill.feature.kind``) by name: one file each, registered here.

Adding a kind: a file with its ``FeatureKind`` subclass (``base``) and a ``register_kind`` line
below. Its keys, its weight among them, live under ``distill.feature.<name>``; nothing else
names it.
"""

from __future__ import annotations

from distill.config import Section, register_choices, register_section, unregister_section
from distill.kd.features.base import FeatureKind, KindConfig, KindPart
from distill.kd.features.cwd import CWD
from distill.kd.features.fgd import FGD
from distill.kd.features.mgd import MGD
from distill.kd.features.mse import MSE
from distill.kd.features.pkd import PKD

__all__ = ["KINDS", "FeatureKind", "KindConfig", "KindPart", "register_kind", "unregister_kind"]

KINDS: dict[str, type[FeatureKind]] = {}
AT = "distill.feature"  # the section the kinds' own sections sit in


def register_kind(kind: type[FeatureKind]) -> type[FeatureKind]:
    """Make ``kind`` a value of ``distill.feature.kind``; its own keys, its weight first, become
    the section ``distill.feature.<name>``."""
    if not issubclass(kind.config_class, KindConfig):
        raise TypeError(
            f"feature kind {kind.name}: its config_class {kind.config_class.__name__} must "
            "subclass KindConfig (its weight, distill.feature.<kind>.weight)"
        )
    KINDS[kind.name] = kind
    non_negative = ("weight", *kind.non_negative)
    section = Section(kind.config_class, kind.positive, non_negative, check=kind.check)
    register_section(AT, kind.name, section)
    register_choices({f"{AT}.kind": (None, *KINDS)})  # null: no feature KD
    return kind


def unregister_kind(name: str) -> None:
    """Undo ``register_kind`` (tests add their own kinds)."""
    KINDS.pop(name, None)
    unregister_section(AT, name)
    register_choices({f"{AT}.kind": (None, *KINDS)})


for _kind in (MSE, CWD, PKD, FGD, MGD):
    register_kind(_kind)
