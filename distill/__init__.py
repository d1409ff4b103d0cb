"""distill: knowledge distillation for dense object detectors."""

__version__ = "0.1.0"
