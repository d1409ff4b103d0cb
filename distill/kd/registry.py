"""The KD terms by name, timm-style: a plain dict from a name to a term class, which can also be
used directly (``FeatureKD.from_config(cfg.distill)``).

Adding a term: a file in ``distill/kd`` with its ``KDTerm`` subclass, a line here, its config
section (a field of ``distill.config.DistillConfig``, its weight keys in ``KD_WEIGHT_KEYS``) and
its tests. The engine loops over whatever is configured and names no term.
"""

from __future__ import annotations

from distill.config import DistillConfig
from distill.kd.base import KDTerm
from distill.kd.box import BoxKD
from distill.kd.crosskd import CrossKD
from distill.kd.feature import FeatureKD
from distill.kd.logit import LogitKD

__all__ = ["TERMS", "kd_terms", "kd_weights", "needs_teacher"]

# In build order: the terms' trainable parts are built in this order, and their initial weights
# draw from the global RNG in it (a run with the same config and seed gets the same weights).
TERMS: dict[str, type[KDTerm]] = {
    "feature": FeatureKD,
    "logit": LogitKD,
    "box": BoxKD,
    "crosskd": CrossKD,
}


def kd_terms(cfg: DistillConfig) -> dict[str, KDTerm]:
    """{name: term} of the terms ``cfg`` turns on (a weight > 0), in ``TERMS``'s order."""
    terms = {}
    for name, term_class in TERMS.items():
        term = term_class.from_config(cfg)
        if term is not None:
            terms[name] = term
    return terms


def kd_weights(cfg: DistillConfig) -> dict[str, float]:
    """{loss name: weight} of every loss of the configured terms, e.g. {"feature": w,
    "logit": w, "box": w, "crosskd_cls": w, "crosskd_box": w}; only weights > 0."""
    return {name: w for term in kd_terms(cfg).values() for name, w in term.weights().items()}


def needs_teacher(cfg: DistillConfig) -> bool:
    """True when some KD term is on, i.e. the teacher must run."""
    return bool(kd_terms(cfg))
