"""What a resumed run may change, and the check that it changed nothing else."""

from __future__ import annotations

from pathlib import Path

from distill.config.load import flatten, load_config
from distill.config.schema import Config, ConfigError, walk_sections

# What a resumed run may change: where things are, how it is logged or evaluated, and how long
# it trains (a finished run resumed with more epochs goes on), not what it trains. Keys ending
# in "." cover a section.
RESUME_MAY_CHANGE = (
    "output.", "eval.", "data.root", "data.train", "data.val", "data.images", "data.val_images",
    "data.num_workers", "teacher.weights", "teacher.backbone_weights", "student.weights",
    "student.backbone_weights", "teacher.weights_settings", "student.weights_settings",
    "train.epochs", "train.max_steps", "train.log_every",
    "train.checkpoint_every_steps", "train.max_nonfinite", "train.trace_batches",
)  # fmt: skip


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """A resumed run trains with the config it started with (its ``config.yaml``): same
    model, data and schedule, so that it does not silently change course halfway."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    started = load_config(saved)
    before, now = flatten(started), flatten(cfg)
    unused = unused_keys(started) & unused_keys(cfg)
    changed = [
        f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
        and not key.startswith(RESUME_MAY_CHANGE)
        and key not in unused
    ]
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from the one the run started with "
            f"({saved}) in {'; '.join(changed)}. Resume with the config and --set overrides it "
            f"started with (all of them are in {saved}; for a single run, pass that file as the "
            "CONFIG)"
        )


def unused_keys(cfg: Config) -> set[str]:
    """The keys of a config that change nothing in its run, as the registered sections declare
    them (``Section.unused``: the settings of a KD term that is off, of another feature kind's
    loss). A resumed run may differ from its start there (a default changed since)."""
    flat = flatten(cfg)
    unused = set()
    for at, section, value in walk_sections(cfg):
        if section.unused is None:
            continue
        for key in section.unused(value):
            prefix = f"{at}.{key}"
            unused |= {k for k in flat if k == prefix or k.startswith(prefix + ".")}
    return unused
