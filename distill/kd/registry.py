"""The KD terms by name, timm-style: a plain dict from a name to a term class, which can also be
used directly (``FeatureKD.from_config(cfg.distill)``).

Adding a term: a file in ``distill/kd`` with its ``KDTerm`` subclass, which declares its config
section and what it owns (``distill.kd.base.KDTerm``), and a ``register_term`` line below. The
config reader, the engine and the command line loop over whatever is registered and name none.
"""

from __future__ import annotations

from collections.abc import Mapping

from distill.config import (
    DistillConfig,
    Section,
    register_choices,
    register_section,
    unregister_section,
)
from distill.kd.base import KDTerm
from distill.kd.box import BoxKD
from distill.kd.crosskd import CrossKD
from distill.kd.feature import FeatureKD
from distill.kd.logit import LogitKD

__all__ = [
    "TERMS",
    "kd_terms",
    "kd_weights",
    "needs_teacher",
    "register_term",
    "unregister_term",
    "weight_keys",
]

# In build order: the terms' trainable parts are built in this order, and their initial weights
# draw from the global RNG in it (a run with the same config and seed gets the same weights).
TERMS: dict[str, type[KDTerm]] = {}


def register_term(term: type[KDTerm]) -> type[KDTerm]:
    """Add ``term`` after the registered ones; its section ``distill.<name>`` is read, checked,
    resolved and compared on resume as the term declares."""
    TERMS[term.name] = term
    section = Section(
        term.config_class,
        positive=term.positive,
        non_negative=(*term.weight_keys, *term.non_negative),
        resolve=term.resolve,
        check=term.check,
        unused=term.unused_keys,
        renamed=term.renamed,
        upgrade=term.upgrade,
    )
    register_section("distill", term.name, section)
    register_choices({f"distill.{term.name}.{key}": names for key, names in term.choices.items()})
    return term


def unregister_term(name: str) -> None:
    """Undo ``register_term`` (tests add their own terms)."""
    TERMS.pop(name, None)
    unregister_section("distill", name)


for _term in (FeatureKD, LogitKD, BoxKD, CrossKD):
    register_term(_term)


def kd_terms(cfg: DistillConfig) -> dict[str, KDTerm]:
    """{name: term} of the terms ``cfg`` turns on (a weight > 0), in ``TERMS``'s order."""
    terms = {}
    for name, term_class in TERMS.items():
        term = term_class.from_config(cfg)
        if term is not None:
            terms[name] = term
    return terms


def kd_weights(terms: Mapping[str, KDTerm]) -> dict[str, float]:
    """{loss name: weight} of every loss of ``terms`` (``kd_terms``), e.g. {"feature": w,
    "logit": w, "box": w, "crosskd_cls": w, "crosskd_box": w}; only weights > 0."""
    return {name: w for term in terms.values() for name, w in term.weights().items()}


def needs_teacher(cfg: DistillConfig) -> bool:
    """True when some KD term is on, i.e. the teacher must run."""
    return bool(kd_terms(cfg))


def weight_keys() -> tuple[str, ...]:
    """The dotted config key of every registered term's every weight (the feature kinds' each,
    ``distill.feature.<kind>.weight``): all 0 is the plain student (no teacher runs)."""
    return tuple(
        f"distill.{name}.{key}" for name, t in TERMS.items() for key in t.all_weight_keys()
    )
