"""The KD terms: one file per term, each declaring its config section (keys, defaults, bounds,
weights, what a resumed run may ignore), what trainable part it adds, what it needs from the
teacher's forward, and its losses.

- ``base``: the interface (``KDTerm``, ``TermModule``, ``TeacherProbe``, ``Finding``)
- ``feature``: feature KD and its adapters; ``features``: its kinds (mse, cwd, pkd, fgd, mgd),
  one file each, registered by ``register_kind``
- ``logit``: soft-label logit KD; ``box``: box KD
- ``crosskd``: CrossKD, through the teacher's head
- ``registry``: ``TERMS``, the terms by name (``register_term``), and which a config turns on
- ``combine``: the terms' losses, their warmup/stop schedule and the total loss

    terms = kd_terms(cfg.distill)        # {"feature": FeatureKD(...), ...}, weight > 0 only
    kd = distill_terms(terms, student_out, teacher_out, batch)
    total, log = combine(det_losses, kd, kd_weights(terms), kd_scale(cfg.distill, step, epoch))
"""

from distill.kd.base import FAIL, OK, SKIP, WARN, Batch, Finding, KDTerm, TeacherProbe, TermModule
from distill.kd.combine import combine, distill_terms, kd_scale
from distill.kd.features import KINDS, FeatureKind, register_kind, unregister_kind
from distill.kd.registry import (
    TERMS,
    kd_terms,
    kd_weights,
    needs_teacher,
    register_term,
    unregister_term,
    weight_keys,
)

__all__ = [
    "FAIL",
    "KINDS",
    "OK",
    "SKIP",
    "TERMS",
    "WARN",
    "Batch",
    "FeatureKind",
    "Finding",
    "KDTerm",
    "TeacherProbe",
    "TermModule",
    "combine",
    "distill_terms",
    "kd_scale",
    "kd_terms",
    "kd_weights",
    "needs_teacher",
    "register_kind",
    "register_term",
    "unregister_kind",
    "unregister_term",
    "weight_keys",
]
