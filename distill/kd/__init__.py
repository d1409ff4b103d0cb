"""The KD terms: one file per term, each saying whether it is on and with what weights, what
trainable part it adds, what it needs from the teacher's forward, and its losses.

- ``base``: the interface (``KDTerm``, ``TermModule``, ``TeacherProbe``)
- ``feature``: feature KD (mse, cwd, pkd, fgd, mgd) and its learnable blocks
- ``logit``: soft-label logit KD; ``box``: box KD
- ``crosskd``: CrossKD, through the teacher's head
- ``registry``: ``TERMS``, the terms by name, and which of them a config turns on
- ``combine``: the terms' losses, their warmup/stop schedule and the total loss

    terms = kd_terms(cfg.distill)        # {"feature": FeatureKD(...), ...}, weight > 0 only
    kd = distill_terms(student_out, teacher_out, targets, image_size, cfg.distill)
    total, log = combine(det_losses, kd, cfg.distill, step, epoch)
"""

from distill.kd.base import KDTerm, TeacherProbe, TermModule
from distill.kd.combine import combine, distill_terms, kd_scale
from distill.kd.registry import TERMS, kd_terms, kd_weights, needs_teacher

__all__ = [
    "TERMS",
    "KDTerm",
    "TeacherProbe",
    "TermModule",
    "combine",
    "distill_terms",
    "kd_scale",
    "kd_terms",
    "kd_weights",
    "needs_teacher",
]
