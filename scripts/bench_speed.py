"""Speed of a distillation step, of a lockstep sweep step and of the data loader.

    python scripts/bench_speed.py            # 128 px, batch 8, K=4, fp32 and bf16 (minutes)
                                             # (bf16 only where native: --precisions fp32,bf16)
    python scripts/bench_speed.py --quick    # 64 px, 2 iterations, batch 2, K=2: a smoke run

Everything runs in one process through the code that training runs: ``make_accelerator``,
``build_models``, ``build_optimizer``, ``build_scheduler``, ``accelerator.prepare``, the shared
transform, ``dense_forward``, ``detection_loss``, ``distill_terms``, ``combine``. The timed
variants, each on the same batch within an iteration:

  transform        the shared resize + normalise of one batch
  teacher_forward  the frozen teacher's ``dense_forward`` (no_grad, autocast) on a transformed batch
  plain_step       transform + a plain student's step (KD weights 0, no teacher)
  student_kd_step  one student's KD step given the teacher's outputs (no transform, no teacher)
  kd_step          transform + teacher forward + student KD step: a ``distill run`` step
  sweep_step       transform + teacher forward + K student KD steps, each with its own module,
                   optimizer and scheduler: a ``distill sweep`` lockstep step

A student step is the body of the loop in ``distill.engine.loop.train_group`` for one trainee:
forward, detection loss, KD terms, combine, the non-finite check, backward, clip, optimizer
step, scheduler step. Iterations are round-robin: each runs one timed step of every variant,
starting one variant later than the iteration before, so that machine noise (and the order)
hits all variants alike; the first ``--warmup`` iterations are not counted and every number
is a median. The data loader (``DataLoader`` built as ``train_group`` builds it, prepared by
the accelerator) is timed alone over whole epochs: its steady-state images/s after the first
batch, and the first batch's delay (worker start-up, paid every epoch) on its own.

The teacher has random weights (``teacher.weights=null``): its cost does not depend on them.
Steps with a non-finite loss (skipped, as the loop skips them) or gradient norm are counted in
the result, since they change what a step costs.

Ratios and goals (``GOALS``):

  kd_step_ratio    = kd_step / (plain_step + teacher_forward)                      <= 1.05
  sweep_step_ratio = sweep_step / (transform + teacher_forward + K student_kd_step) <= 1.10
  sweep_speedup    = K kd_step / sweep_step                                          >= 1.7
  loader_over_kd   = loader_images_per_s / kd_images_per_s                           >= 3

The transform is in the sweep's denominator because the sweep runs it once as well; it is a
fraction of a percent of a step.

Host syncs per step (``host_syncs_per_step``): one more, untimed call of the plain, KD and
sweep steps counts ``aten::_local_scalar_dense`` (``.item()``, ``float()``, ``bool()`` of a
tensor), split into this project's and torchvision's. torchvision's are, per image, the
training transform's size draw (a CPU tensor: no device sync on a GPU) and the focal loss's
``max(1, num_foreground)``.
Paths in the JSON are relative to the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection.image_list import ImageList

from distill.config import Config, load_config, override, replace
from distill.device import native_bf16
from distill.engine.build import Trainee, build_accelerator, build_train_loader, build_trainee
from distill.engine.step import StepOutcome, teacher_forward, train_step
from distill.experiments.machine import machine
from distill.kd import weight_keys
from distill.models.retinanet import DenseOutputs, build_transform

log = logging.getLogger("bench_speed")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "shapes" / "distill.yaml"
DEFAULT_OUT = REPO / "results" / "bench_speed.json"
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # result key -> train.mixed_precision
VARIANTS = (
    "transform",
    "teacher_forward",
    "plain_step",
    "student_kd_step",
    "kd_step",
    "sweep_step",
)
# metric -> (comparison, bound); "met" when ``value <= bound`` or ``value >= bound``.
GOALS: dict[str, tuple[str, float]] = {
    "kd_step_ratio": ("<=", 1.05),
    "sweep_step_ratio": ("<=", 1.10),
    "sweep_speedup": (">=", 1.7),
    "loader_over_kd": (">=", 3.0),  # "several times" the KD step's images/s
}
NOT_NATIVE = "no native bf16 on this device; pass --precisions fp32,bf16 to time the emulation"
BATCH_POOL = 4  # distinct batches cycled through the iterations
SYNC_VARIANTS = ("plain_step", "kd_step", "sweep_step")  # whose host syncs are counted


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures; ``--quick`` changes the defaults."""

    config: Path
    overrides: tuple[str, ...]
    size: int
    batch: int
    iters: int
    warmup: int
    sweep_k: int
    loader_epochs: int
    data: Path
    data_images: int  # training images generated when ``data`` holds no dataset
    threads: int | None  # torch intra-op threads; None: torch's default (one per core)
    out: Path
    precisions: tuple[str, ...] = tuple(PRECISIONS)  # keys of PRECISIONS to measure


@dataclass
class Health:
    """Steps per trainee that the loop skipped (non-finite loss or gradient norm)."""

    skipped: dict[str, int] = field(default_factory=dict)

    def count(self, t: Trainee, outcome: StepOutcome | None, logs: Mapping[str, Any]) -> None:
        if outcome is StepOutcome.SKIPPED:
            name = t.run_dir.name
            self.skipped[name] = self.skipped.get(name, 0) + 1
            log.warning("%s: non-finite loss or gradient norm, step skipped: %s", name, logs)


@dataclass
class Batch:
    """One loader batch and what the steps that do not time them start from."""

    images: list[Tensor]  # (3, H, W) each, as the loader gives them
    targets: list[dict[str, Any]]
    image_list: ImageList  # after the shared transform
    transformed_targets: list[dict[str, Any]]
    teacher_out: DenseOutputs  # the teacher's outputs on ``image_list``


# ---------------------------------------------------------------------------------------------
# The step, as train_group runs it
# ---------------------------------------------------------------------------------------------


def student_step(
    accelerator: Accelerator,
    t: Trainee,
    image_list: ImageList,
    targets: list[dict[str, Any]],
    teacher_out: DenseOutputs | None,
    health: Health,
) -> None:
    """One trainee's step, exactly the loop's ``train_step`` (at step 0 of epoch 0), without
    its bookkeeping (``_after_step`` would stop the benchmark after a few skipped steps)."""
    outcome, logs = train_step(accelerator, t, image_list, targets, teacher_out, 0, 0)
    health.count(t, outcome, logs)


def build_bench_trainee(
    accelerator: Accelerator,
    cfg: Config,
    num_classes: int,
    teacher: nn.Module | None,
    name: str,
    total_steps: int,
    scratch: Path,
) -> tuple[Trainee, nn.Module | None]:
    """A prepared trainee built as ``train_group`` builds one (seeded, shared teacher); its run
    directory is a scratch folder and it writes no TensorBoard logs."""
    cfg = replace(cfg, **{"output.dir": str(scratch / name)})
    trainee, teacher = build_trainee(accelerator, cfg, "student", num_classes, total_steps, teacher)
    if trainee.writer is not None:
        trainee.writer.close()
        trainee.writer = None
    trainee.module.train()
    return trainee, teacher


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


class HostSyncs(TorchDispatchMode):
    """Counts ``aten::_local_scalar_dense`` (``.item()``, ``float()``, ``bool()`` of a tensor:
    on a GPU each waits for the device), as "torchvision" when torchvision's code asked for it
    and "distill" otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = {"distill": 0, "torchvision": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frame, owner = sys._getframe(1), "distill"
            while frame is not None:
                if f"{os.sep}torchvision{os.sep}" in frame.f_code.co_filename:
                    owner = "torchvision"
                    break
                frame = frame.f_back  # type: ignore[assignment]
            self.counts[owner] += 1
        return func(*args, **(kwargs or {}))


def count_host_syncs(
    variants: Mapping[str, Callable[[int], None]], i: int
) -> dict[str, dict[str, int]]:
    """Host syncs of one untimed call of each variant, split by whose code asked for them."""
    counts = {}
    for name, variant in variants.items():
        with HostSyncs() as counter:
            variant(i)
        counts[name] = dict(counter.counts)
    return counts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(
    variants: Mapping[str, Callable[[int], None]],
    iters: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Milliseconds of ``iters`` calls of each variant (after ``warmup`` uncounted ones).

    Iteration ``i`` calls every variant once with ``i``, starting at variant ``i mod n``, so
    that no variant always runs first or always follows the same one.
    """
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + iters):
        start = i % len(names)
        for name in names[start:] + names[:start]:
            synchronize(device)
            tic = time.perf_counter()
            variants[name](i)
            synchronize(device)
            elapsed_ms = (time.perf_counter() - tic) * 1e3
            if i >= warmup:
                samples[name].append(elapsed_ms)
        log.info("iteration %d/%d done", i + 1, warmup + iters)
    return samples


def time_loader(train_set: Any, loader: Any, epochs: int) -> list[dict[str, float]]:
    """One record per epoch of ``loader``, whose batches are only counted:

    first_batch_ms: from the start of the epoch to the first batch (worker start-up, which
        training pays every epoch: the workers are not persistent);
    images_per_s: images after the first batch / time after it (the steady state, what the
        workers deliver while the model computes);
    images_per_s_with_startup: all images / the whole epoch.
    """
    records = []
    for epoch in range(epochs):
        train_set.set_epoch(epoch)
        loader.set_epoch(epoch)
        images = after_first = 0
        tic = time.perf_counter()
        first = tic
        for batch_images, _ in loader:
            if images == 0:
                first = time.perf_counter()
            else:
                after_first += len(batch_images)
            images += len(batch_images)
        toc = time.perf_counter()
        records.append(
            {
                "first_batch_ms": (first - tic) * 1e3,
                "images_per_s": after_first / max(toc - first, 1e-9),
                "images_per_s_with_startup": images / max(toc - tic, 1e-9),
            }
        )
    return records


def measure_precision(
    settings: Settings, precision: str, teacher: nn.Module | None = None
) -> tuple[dict[str, Any], nn.Module]:
    """All variants and the loader under one mixed-precision mode (see the module docstring);
    returns the result and the frozen teacher, which the next precision can reuse (it is not
    prepared, so the accelerator does not change it)."""
    cfg = bench_config(settings, PRECISIONS[precision])
    plain_cfg = replace(cfg, **dict.fromkeys(weight_keys(), 0.0))
    accelerator = build_accelerator(cfg)
    device = accelerator.device
    train_set, loader = build_train_loader(accelerator, cfg)
    num_classes = train_set.num_categories + 1
    if len(loader) < 2:
        raise ValueError(
            f"{cfg.data.root} has {len(train_set)} training images: fewer than two batches of "
            f"{cfg.data.batch_size}"
        )

    # The learning-rate schedule of a real run on this data (train_group's total_steps): the
    # benchmark's steps are its first ones, at the small learning rates of the warm-up.
    total_steps = cfg.train.epochs * max(1, len(loader) // cfg.train.grad_accum)
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    log.info("%s: building the teacher and %d students", precision, settings.sweep_k + 3)
    scratch = Path(tempfile.mkdtemp(prefix="bench_speed_"))
    args = (num_classes, teacher)
    trainee, teacher = build_bench_trainee(accelerator, cfg, *args, "kd", total_steps, scratch)
    kd_only, _ = build_bench_trainee(accelerator, cfg, *args, "kd_only", total_steps, scratch)
    plain, _ = build_bench_trainee(
        accelerator, plain_cfg, num_classes, None, "plain", total_steps, scratch
    )
    sweep = [
        build_bench_trainee(accelerator, cfg, *args, f"sweep{k}", total_steps, scratch)[0]
        for k in range(settings.sweep_k)
    ]
    assert teacher is not None  # the config has KD terms, so build_models made a teacher
    teacher.to(device)
    transform = build_transform(cfg).to(device)

    batches = []
    train_set.set_epoch(0)
    loader.set_epoch(0)
    for images, targets in loader:
        image_list, transformed = transform(images, targets)
        out = teacher_forward(accelerator, teacher, image_list, [trainee.terms])
        batches.append(Batch(images, targets, image_list, transformed, out))
        if len(batches) == BATCH_POOL:
            break

    health = Health()

    def run_transform(i: int) -> None:
        b = batches[i % len(batches)]
        transform(b.images, b.targets)

    def run_teacher(i: int) -> None:
        teacher_forward(accelerator, teacher, batches[i % len(batches)].image_list, [trainee.terms])

    def run_plain(i: int) -> None:
        b = batches[i % len(batches)]
        image_list, targets = transform(b.images, b.targets)
        student_step(accelerator, plain, image_list, targets, None, health)

    def run_student_kd(i: int) -> None:
        b = batches[i % len(batches)]
        student_step(
            accelerator, kd_only, b.image_list, b.transformed_targets, b.teacher_out, health
        )

    def run_kd(i: int) -> None:
        b = batches[i % len(batches)]
        image_list, targets = transform(b.images, b.targets)
        out = teacher_forward(accelerator, teacher, image_list, [trainee.terms])
        student_step(accelerator, trainee, image_list, targets, out, health)

    def run_sweep(i: int) -> None:
        b = batches[i % len(batches)]
        image_list, targets = transform(b.images, b.targets)
        out = teacher_forward(accelerator, teacher, image_list, [trainee.terms])
        for t in sweep:
            student_step(accelerator, t, image_list, targets, out, health)

    variants = {
        "transform": run_transform,
        "teacher_forward": run_teacher,
        "plain_step": run_plain,
        "student_kd_step": run_student_kd,
        "kd_step": run_kd,
        "sweep_step": run_sweep,
    }
    assert tuple(variants) == VARIANTS
    log.info("%s: %d warm-up + %d timed iterations", precision, settings.warmup, settings.iters)
    samples = round_robin(variants, settings.iters, settings.warmup, device)
    counted = {name: variants[name] for name in SYNC_VARIANTS}
    host_syncs = count_host_syncs(counted, settings.warmup + settings.iters)
    log.info("%s: timing the data loader over %d epoch(s)", precision, settings.loader_epochs)
    loader_records = time_loader(train_set, loader, settings.loader_epochs)
    shutil.rmtree(scratch, ignore_errors=True)
    result = summarize(samples, loader_records, settings)
    result["skipped_steps"] = health.skipped
    result["host_syncs_per_step"] = host_syncs
    result["mixed_precision"] = accelerator.mixed_precision
    result["loader_epoch_images"] = len(loader) * cfg.data.batch_size
    return result, teacher


def summarize(
    samples: dict[str, list[float]], loader_records: list[dict[str, float]], settings: Settings
) -> dict[str, Any]:
    """Medians and the ratios of the module docstring from raw samples (ms) and the loader's
    per-epoch records (``time_loader``).

    The ratios come from the medians of the variants; ``paired`` also gives the median and
    quartiles of the same ratios taken within each iteration, which cancels slow drifts of the
    machine's speed (a measure of how far the medians can be trusted).
    """
    med = {name: statistics.median(values) for name, values in samples.items()}
    k = settings.sweep_k
    kd_images_per_s = settings.batch / (med["kd_step"] / 1e3)
    loader = statistics.median(r["images_per_s"] for r in loader_records)
    per_iteration = [
        step_ratios({name: values[i] for name, values in samples.items()}, k)
        for i in range(len(samples["kd_step"]))
    ]
    paired = {}
    for name in per_iteration[0]:
        values = [r[name] for r in per_iteration]
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        paired[name] = {"median": statistics.median(values), "quartiles": quartiles}
    shared = med["transform"] + med["teacher_forward"]
    return {
        **step_ratios(med, k),
        "loader_images_per_s": loader,
        "kd_images_per_s": kd_images_per_s,
        "loader_over_kd": loader / kd_images_per_s,
        # the teacher's share of a KD step bounds what a lockstep sweep can save: with no
        # overhead at all, K (T + S) / (T + K S) for shared work T and per-student work S
        "teacher_share_of_kd_step": med["teacher_forward"] / med["kd_step"],
        "sweep_speedup_bound": k
        * (shared + med["student_kd_step"])
        / (shared + k * med["student_kd_step"]),
        "paired": paired,
        "median_ms": med,
        "samples_ms": samples,
        "loader_first_batch_ms": statistics.median(r["first_batch_ms"] for r in loader_records),
        "loader_images_per_s_with_startup": statistics.median(
            r["images_per_s_with_startup"] for r in loader_records
        ),
        "loader_epochs": loader_records,
    }


def step_ratios(ms: Mapping[str, float], k: int) -> dict[str, float]:
    """The step ratios of the module docstring from one time (ms) per variant."""
    return {
        "kd_step_ratio": ms["kd_step"] / (ms["plain_step"] + ms["teacher_forward"]),
        "sweep_step_ratio": ms["sweep_step"]
        / (ms["transform"] + ms["teacher_forward"] + k * ms["student_kd_step"]),
        "sweep_speedup": k * ms["kd_step"] / ms["sweep_step"],
    }


# ---------------------------------------------------------------------------------------------
# Set-up, report
# ---------------------------------------------------------------------------------------------


def bench_config(settings: Settings, mixed_precision: str) -> Config:
    """The benchmark's config: ``settings.config`` with a random-weights teacher (timing does
    not depend on the weights), the benchmark's data, size, batch and precision."""
    overrides = [
        "teacher.weights=null",
        override("data.root", settings.data),
        f"data.image_size={settings.size}",
        f"data.batch_size={settings.batch}",
        *settings.overrides,
    ]
    cfg = load_config(settings.config, overrides)
    return replace(cfg, **{"train.mixed_precision": mixed_precision})


def ensure_data(settings: Settings) -> None:
    """Generate a shapes set at ``settings.data`` unless a dataset is already there."""
    cfg = bench_config(settings, "no")
    if (Path(cfg.data.root) / cfg.data.train).is_file():
        return
    from distill.data.shapes import generate_shapes

    log.info(
        "generating %d shapes images at %d px in %s",
        settings.data_images,
        settings.size,
        settings.data,
    )
    generate_shapes(settings.data, num_train=settings.data_images, num_val=0, size=settings.size)


def repo_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (results are committed: no machine's
    absolute paths), else as given."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def default_precisions() -> tuple[str, ...]:
    """fp32, and bf16 where the device computes it natively."""
    return tuple(PRECISIONS) if native_bf16() else ("fp32",)


def goal_met(metric: str, value: float) -> bool:
    op, bound = GOALS[metric]
    return value <= bound if op == "<=" else value >= bound


def format_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per metric, columns fp32 / bf16 / goal / met?."""
    precisions = [p for p in PRECISIONS if p in result]
    k = result["sweep_k"]
    rows = [
        ("kd_step_ratio", "KD step / (plain step + teacher fwd)", "{:.3f}"),
        (
            "sweep_step_ratio",
            f"K={k} sweep step / (transform + teacher fwd + {k} × student KD step)",
            "{:.3f}",
        ),
        ("sweep_speedup", f"sweep speed-up ({k} × KD step / sweep step)", "{:.2f}×"),
        ("sweep_speedup_bound", "sweep speed-up if lockstep added nothing", "{:.2f}×"),
        ("loader_images_per_s", "data loader images/s", "{:.0f}"),
        ("kd_images_per_s", "KD step images/s", "{:.1f}"),
        ("loader_over_kd", "loader images/s / KD step images/s", "{:.1f}×"),
        ("loader_first_batch_ms", "loader first batch of an epoch (ms)", "{:.0f}"),
        ("teacher_share_of_kd_step", "teacher forward / KD step", "{:.2f}"),
    ]
    lines = [
        "| metric | " + " | ".join(precisions) + " | goal | met? |",
        "|---" * (len(precisions) + 3) + "|",
    ]
    for key, label, fmt in rows:
        values = [fmt.format(result[p][key]) for p in precisions]
        goal = met = ""
        if key in GOALS:
            op, bound = GOALS[key]
            goal = f"{'≤' if op == '<=' else '≥'} {bound:g}"
            met = " / ".join(
                f"{p} {'yes' if goal_met(key, result[p][key]) else 'no'}" for p in precisions
            )
        lines.append(f"| {label} | " + " | ".join(values) + f" | {goal} | {met} |")
    for key, _, _ in rows[:3]:
        values = [
            "{:.3f} ({:.3f}–{:.3f})".format(
                result[p]["paired"][key]["median"], *result[p]["paired"][key]["quartiles"][::2]
            )
            for p in precisions
        ]
        lines.append(f"| {key} per iteration: median (q1–q3) | " + " | ".join(values) + " |  |  |")
    for name in VARIANTS:
        values = [f"{result[p]['median_ms'][name]:.1f}" for p in precisions]
        lines.append(f"| median ms: {name} | " + " | ".join(values) + " |  |  |")
    if all("host_syncs_per_step" in result[p] for p in precisions):  # runs since 2026-12-03
        for name in SYNC_VARIANTS:
            values = [
                "{distill} + {torchvision} torchvision".format(
                    **result[p]["host_syncs_per_step"][name]
                )
                for p in precisions
            ]
            lines.append(f"| host syncs: {name} | " + " | ".join(values) + " |  |  |")
    for p, why in result.get("not_measured", {}).items():
        lines.append(f"\n{p}: not measured ({why}).")
    for p in precisions:
        if result[p].get("skipped_steps"):
            lines.append(
                f"\n{p}: skipped (non-finite) steps per model: {result[p]['skipped_steps']}"
            )
    return "\n".join(lines)


def run(settings: Settings, argv: Sequence[str]) -> dict[str, Any]:
    """Measure every precision, return the result that ``main`` writes (see the docstring)."""
    ensure_data(settings)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "scripts/bench_speed.py", *argv]),
        "machine": machine(),
        "config": repo_path(settings.config),
        "overrides": list(settings.overrides),
        "data": repo_path(settings.data),
        "image_size": settings.size,
        "batch_size": settings.batch,
        "iterations": settings.iters,
        "warmup": settings.warmup,
        "sweep_k": settings.sweep_k,
        "loader_epochs": settings.loader_epochs,
        "load_average_before": load_average(),
        "goals": {name: f"{op} {bound:g}" for name, (op, bound) in GOALS.items()},
    }
    not_measured = [p for p in PRECISIONS if p not in settings.precisions]
    if not_measured:
        result["not_measured"] = {p: NOT_NATIVE for p in not_measured}
    teacher = None
    for precision in settings.precisions:
        result[precision], teacher = measure_precision(settings, precision, teacher)
        result[precision]["goals_met"] = {
            name: goal_met(name, result[precision][name]) for name in GOALS
        }
    result["load_average_after"] = load_average()
    result["seconds"] = time.perf_counter() - started
    return result


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(
        description="Time a KD step, a lockstep sweep step and the data loader (fp32 and bf16)."
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for `distill run`")  # fmt: skip
    parser.add_argument("--size", type=int, help="image side in px (default 128; quick: 64)")
    parser.add_argument("--batch", type=int, help="batch size (default 8; quick: 2)")
    parser.add_argument("--iters", type=int, help="timed iterations (default 20; quick: 2)")
    parser.add_argument("--warmup", type=int, help="uncounted iterations (default 3; quick: 1)")
    parser.add_argument("--sweep-k", type=int, help="students in the sweep (default 4; quick: 2)")
    parser.add_argument("--loader-epochs", type=int, help="loader epochs (default 3; quick: 1)")
    parser.add_argument("--data", type=Path, help="shapes set, generated when absent "
                        "(default data/bench-shapes/<size>px)")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's, one per core)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result")
    parser.add_argument(
        "--precisions",
        help="comma-separated, of fp32,bf16 (default: both where the device has native bf16, "
        "else fp32: emulated bf16 is 10-20x slower and says nothing about a real run)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="64 px, 2 iterations, batch 2, K=2: a smoke run"
    )
    parser.add_argument(
        "--no-deploy", action="store_true", help="skip the deployment latencies (also --quick)"
    )
    args = parser.parse_args(argv)

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else quick if args.quick else full

    size = pick(args.size, 128, 64)
    settings = Settings(
        config=args.config,
        overrides=tuple(args.set),
        size=size,
        batch=pick(args.batch, 8, 2),
        iters=pick(args.iters, 20, 2),
        warmup=pick(args.warmup, 3, 1),
        sweep_k=pick(args.sweep_k, 4, 2),
        loader_epochs=pick(args.loader_epochs, 3, 1),
        data=args.data if args.data is not None else REPO / "data" / "bench-shapes" / f"{size}px",
        data_images=16 if args.quick else 400,
        threads=args.threads,
        out=args.out,
        precisions=tuple(args.precisions.split(",")) if args.precisions else default_precisions(),
    )
    if not settings.precisions or any(p not in PRECISIONS for p in settings.precisions):
        parser.error(f"--precisions: a comma-separated list of {', '.join(PRECISIONS)}")
    if settings.iters < 1 or settings.warmup < 0 or settings.sweep_k < 1:
        parser.error("--iters and --sweep-k must be >= 1, --warmup >= 0")
    if settings.loader_epochs < 1 or (settings.threads is not None and settings.threads < 1):
        parser.error("--loader-epochs and --threads must be >= 1")
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = parse_args(argv)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    result = run(settings, argv)
    if "--quick" not in argv and "--no-deploy" not in argv:
        result["deployment"] = deployment(settings)
    out = settings.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"\nwrote {out}")
    return result


def deployment(settings: Settings) -> dict[str, Any]:
    """``distill summary``'s deployment numbers for the benchmark's config and size: per model
    {pytorch_ms, onnxruntime_ms, weights_mb, onnx_mb, threads} and student / teacher ratios
    (the deployed graph at batch 1 on the CPU, median of ``iters`` runs after ``warmup``)."""
    from distill.deploy.latency import summarize_deployed

    cfg = load_config(settings.config, [*settings.overrides, f"data.image_size={settings.size}"])
    result = summarize_deployed(cfg, warmup=settings.warmup, iterations=settings.iters)
    if "deploy" not in result["student"]:  # no onnx/onnxruntime: summarize warned
        return {}
    return {
        "image_size": result["image_size"],
        "teacher": result["teacher"]["deploy"],
        "student": result["student"]["deploy"],
        "ratio": result["ratio"]["deploy"],
    }


if __name__ == "__main__":
    main()
