"""The feature-KD kinds (``distill.feature.kind``) by name: one file each, registered here.

Adding a kind: a file with its ``FeatureKind`` subclass (``base``) and a ``register_kind`` line
below. Its keys live under ``distill.feature.<name>``; nothing else names it.
"""

from __future__ import annotations

from distill.config import Section, register_choices, register_section, unregister_section
from distill.kd.features.base import FeatureKind, KindPart
from distill.kd.features.cwd import CWD
from distill.kd.features.fgd import FGD
from distill.kd.features.mgd import MGD
from distill.kd.features.mse import MSE
from distill.kd.features.pkd import PKD

__all__ = ["KINDS", "FeatureKind", "KindPart", "register_kind", "unregister_kind"]

KINDS: dict[str, type[FeatureKind]] = {}
AT = "distill.feature"  # the section the kinds' own sections sit in


def register_kind(kind: type[FeatureKind]) -> type[FeatureKind]:
    """Make ``kind`` a value of ``distill.feature.kind``; its own keys, if any, become the
    section ``distill.feature.<name>``."""
    KINDS[kind.name] = kind
    if kind.config_class is not None:
        register_section(
            AT,
            kind.name,
            Section(kind.config_class, kind.positive, kind.non_negative, check=kind.check),
        )
    register_choices({f"{AT}.kind": KINDS})
    return kind


def unregister_kind(name: str) -> None:
    """Undo ``register_kind`` (tests add their own kinds)."""
    KINDS.pop(name, None)
    unregister_section(AT, name)
    register_choices({f"{AT}.kind": KINDS})


for _kind in (MSE, CWD, PKD, FGD, MGD):
    register_kind(_kind)
