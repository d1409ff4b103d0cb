"""distill: knowledge distillation for dense object detectors."""

__version__ = "0.1.0"

# The registries declare the names their config keys accept (``distill.config.register_choices``)
# when imported: importing them with the package makes every config read check every name, while
# distill.config itself imports nothing of the project.
import distill.kd  # noqa: F401
import students  # noqa: F401
import teachers  # noqa: F401
