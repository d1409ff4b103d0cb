"""The report's charts (matplotlib): per-class and per-size AP, PR curves, training curves.

Every function takes plain numbers (model label -> metrics) and writes one PNG, so that
``scripts/bench_kd.py`` draws its summary figure from ``results/bench_kd.json`` with the same
code as the report. Names (classes, runs) are shown as given: every drawing function runs under
``literal_text`` (no mathtext) and legend entries go through ``legend_label``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator
from pycocotools.cocoeval import COCOeval

from distill.kd.registry import TERMS

# One colour per model, in every figure: the teacher dark, the baseline grey, students in colour.
TEACHER_COLOR, BASELINE_COLOR = "#333333", "#a6a6a6"
STUDENT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22")
SIZE_LABELS = {"aps": "small", "apm": "medium", "apl": "large"}

# Training-curve panels: TensorBoard tag -> title (the tags distill.engine.loop writes). Between
# the detection losses and the total come the KD losses the runs logged (``curve_panels``).
DETECTION_CURVES = {
    "loss/classification": "focal loss (classification)",
    "loss/bbox_regression": "box regression loss",
}
KD_CURVE_PREFIX = "kd_weighted/"  # + a KD loss's name (distill.kd.combine): what enters the total
LATER_CURVES = {
    "loss/total": "total loss",
    "train/lr": "learning rate",
    "eval/map": "validation mAP",
}

Series = tuple[str, str, dict[str, float]]  # (label, colour, {key: value})
P = ParamSpec("P")
R = TypeVar("R")


def literal_text(draw: Callable[P, R]) -> Callable[P, R]:
    r"""``draw`` with matplotlib's mathtext off (``text.parse_math``): its text, class and run
    names among it, is shown as given. With mathtext on, a name with two ``$`` is read as math
    and one like ``a$^$b`` stops the figure, after the whole evaluation; ``_``, ``^`` and ``\``
    are plain characters either way, outside ``$``."""

    @functools.wraps(draw)
    def drawn(*args: P.args, **kwargs: P.kwargs) -> R:
        with plt.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


def legend_label(name: str) -> str:
    """``name`` as a legend entry: matplotlib leaves out labels that start with ``_``; a
    zero-width space in front keeps them (it draws nothing)."""
    return "\u200b" + name if name.startswith("_") else name


def role_colors(roles: Sequence[str]) -> list[str]:
    """Colours for models with these roles ("teacher", "baseline", "student"), in order."""
    colors, k = [], 0
    for role in roles:
        if role == "teacher":
            colors.append(TEACHER_COLOR)
        elif role == "baseline":
            colors.append(BASELINE_COLOR)
        else:
            colors.append(STUDENT_COLORS[k % len(STUDENT_COLORS)])
            k += 1
    return colors


def _grouped_bars(
    ax: Axes, groups: Sequence[str], series: Sequence[Series], horizontal: bool = False
) -> None:
    """One group of bars per entry of ``groups``, one bar per series (missing: no bar)."""
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(groups))
    for i, (label, color, values) in enumerate(series):
        heights = [values.get(g, math.nan) for g in groups]
        offsets = positions - 0.4 + width * (i + 0.5)
        if horizontal:
            ax.barh(offsets, heights, height=width, color=color, label=legend_label(label))
        else:
            ax.bar(offsets, heights, width=width, color=color, label=legend_label(label))
    if horizontal:
        ax.set_yticks(positions, list(groups))
        ax.invert_yaxis()  # the first group on top
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(positions, list(groups))
        ax.grid(axis="y", alpha=0.3)


def per_class_axes(ax: Axes, classes: Sequence[str], series: Sequence[Series]) -> None:
    """Horizontal grouped bars of per-class AP, classes top to bottom in the given order."""
    _grouped_bars(ax, classes, series, horizontal=True)
    ax.set_xlabel("AP (COCO, IoU 0.50:0.95)")
    ax.set_xlim(0, 1)


@literal_text
def per_class_figure(
    path: Path, classes: Sequence[str], series: Sequence[Series], title: str
) -> None:
    """Per-class AP of each model; ``classes`` in the order to show (most helped first)."""
    height = 1.2 + 0.12 * len(classes) * max(2, len(series))
    fig, ax = plt.subplots(figsize=(8, min(max(3.5, height), 40)))
    per_class_axes(ax, classes, series)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def per_size_axes(ax: Axes, series: Sequence[Series]) -> None:
    """APs/m/l of each model as grouped bars."""
    _grouped_bars(ax, list(SIZE_LABELS), series)
    ax.set_xticks(range(len(SIZE_LABELS)), [f"AP{k[-1]} ({v})" for k, v in SIZE_LABELS.items()])
    ax.set_ylabel("AP")
    ax.set_ylim(0, 1)


@literal_text
def per_size_figure(path: Path, series: Sequence[Series], gap: Sequence[Series]) -> None:
    """Left: APs/m/l of each model. Right: the share of the teacher-baseline gap each student
    closes per size (1 = as good as the teacher), if there is a teacher and a baseline."""
    fig, axes = plt.subplots(1, 2 if gap else 1, figsize=(11 if gap else 6, 4), squeeze=False)
    per_size_axes(axes[0, 0], series)
    axes[0, 0].set_title("AP per object size", fontsize=10)
    axes[0, 0].legend(fontsize=8)
    if gap:
        ax = axes[0, 1]
        _grouped_bars(ax, list(SIZE_LABELS), gap)
        ax.set_xticks(range(len(SIZE_LABELS)), list(SIZE_LABELS.values()))
        ax.axhline(1.0, color=TEACHER_COLOR, linestyle="--", linewidth=1, label="teacher")
        ax.axhline(0.0, color=BASELINE_COLOR, linewidth=1, label="baseline")
        ax.set_ylabel("gap closed = (student − baseline) / (teacher − baseline)")
        ax.set_title("share of the teacher–baseline gap closed", fontsize=10)
        ax.legend(fontsize=8)
    _save(fig, path)


def pr_curve(evaluator: COCOeval, iou: float) -> tuple[np.ndarray, np.ndarray]:
    """(recall points (R,), precision (R,)) at IoU ``iou``, all sizes, 100 detections, averaged
    over the classes that have ground truth (COCOeval marks the others -1)."""
    t = int(np.argmin(np.abs(evaluator.params.iouThrs - iou)))
    # precision: (T iou thresholds, R recall points, K classes, A area ranges, M max dets)
    p = evaluator.eval["precision"][t, :, :, 0, -1]  # (R, K)
    valid = (p > -1).all(axis=0)
    curve = p[:, valid].mean(axis=1) if valid.any() else np.zeros(len(p))
    return np.asarray(evaluator.params.recThrs), curve


@literal_text
def pr_figure(
    path: Path, curves: Sequence[tuple[str, str, COCOeval | None]], ious: Sequence[float]
) -> None:
    """One panel per IoU threshold, one precision-recall line per model (legend: its AP there).
    A model without detections is a line at precision 0."""
    fig, axes = plt.subplots(1, len(ious), figsize=(5.5 * len(ious), 4.2), squeeze=False)
    for ax, iou in zip(axes[0], ious):
        for label, color, evaluator in curves:
            if evaluator is None:
                recall, precision = np.linspace(0, 1, 101), np.zeros(101)
            else:
                recall, precision = pr_curve(evaluator, iou)
            ap = precision.mean()
            ax.plot(recall, precision, color=color, label=legend_label(f"{label} (AP {ap:.3f})"))
        ax.set_title(f"IoU {iou:.2f}", fontsize=10)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def read_scalars(tb_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (steps, values)} of every scalar in a TensorBoard log folder (all points)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep all
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        scalars[tag] = ([e.step for e in events], [e.value for e in events])
    return scalars


def curve_panels(tags: set[str]) -> dict[str, str]:
    """TensorBoard tag -> panel title of the logged ``tags`` that the training figure draws:
    the detection losses, each KD loss logged (``kd_weighted/<loss>``: whatever terms the runs
    had, in the order of ``distill.kd.registry.TERMS``, then any other by name), the total
    loss, the learning rate and the validation mAP."""

    def term_order(loss: str) -> tuple[int, str]:
        owner = (i for i, term in enumerate(TERMS) if loss == term or loss.startswith(f"{term}_"))
        return next(owner, len(TERMS)), loss

    kd = sorted(
        (t.removeprefix(KD_CURVE_PREFIX) for t in tags if t.startswith(KD_CURVE_PREFIX)),
        key=term_order,
    )
    panels = {t: title for t, title in DETECTION_CURVES.items() if t in tags}
    panels.update({f"{KD_CURVE_PREFIX}{loss}": f"{loss} KD (weighted)" for loss in kd})
    panels.update({t: title for t, title in LATER_CURVES.items() if t in tags})
    return panels


@literal_text
def training_figure(
    path: Path, runs: Sequence[tuple[str, str, dict[str, tuple[list[int], list[float]]]]]
) -> list[str]:
    """One panel per quantity of ``curve_panels`` that some run logged, every run in it.

    runs: (label, colour, ``read_scalars`` of its logs). Returns the titles drawn.
    """
    panels = curve_panels({tag for _, _, scalars in runs for tag in scalars})
    tags = list(panels)
    if not tags:
        return []
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for label, color, scalars in runs:
            if tag in scalars:
                steps, values = scalars[tag]
                style = "o-" if len(steps) < 20 else "-"  # evaluations: a few points
                ax.plot(
                    steps,
                    values,
                    style,
                    color=color,
                    label=legend_label(label),
                    linewidth=1,
                    markersize=3,
                )
        ax.set_title(panels[tag], fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 0.96, 1.04
        ax.grid(alpha=0.3)
        values = [v for *_, s in runs for v in s.get(tag, ([], []))[1]]
        if min(values) > 0 and max(values) > 20 * min(values):  # losses falling by decades
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(tags) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    _save(fig, path)
    return list(panels.values())


@literal_text
def bench_figure(result: dict[str, Any], path: Path) -> None:
    """``results/bench_kd.png``: per-class and per-size AP of the teacher, the plain student
    and the distilled student, from ``scripts/bench_kd.py``'s result (seed means)."""
    names = {"teacher": "teacher", "student": "plain student", "student + KD": "student + KD"}
    models = {k: result["models"][k] for k in names if k in result["models"]}
    missing = [k for k, m in models.items() if "per_class" not in m]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} have no per-class AP in the result: run scripts/bench_kd.py "
            "again (results written before the report existed have none)"
        )
    roles = ["teacher" if k == "teacher" else "baseline" if k == "student" else "student"
             for k in models]  # fmt: skip
    colors = role_colors(roles)
    kd = models.get("student + KD", {}).get("per_class", {})
    plain = models.get("student", {}).get("per_class", {})
    classes = sorted(kd, key=lambda c: kd[c] - plain.get(c, 0.0), reverse=True)
    per_class = [(names[k], c, _known(m["per_class"])) for (k, m), c in zip(models.items(), colors)]
    per_size = [(names[k], c, _known({s: m[s] for s in SIZE_LABELS})) for (k, m), c in
                zip(models.items(), colors)]  # fmt: skip
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]}
    )
    _grouped_bars(left, classes, per_class)
    left.set_ylabel("AP (IoU 0.50:0.95)")
    left.set_ylim(0, 1)
    left.tick_params(axis="x", labelrotation=30)
    left.set_title("AP per class (sorted by the gain of KD)", fontsize=10)
    per_size_axes(right, per_size)
    right.set_title("AP per object size", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(f"Distillation on shapes ({result.get('date', '')[:10]})", fontsize=11)
    _save(fig, path)


def _known(values: dict[str, float]) -> dict[str, float]:
    """COCO's -1 (no ground truth of that class or size) as nan: no bar rather than a negative."""
    return {k: v if v >= 0 else math.nan for k, v in values.items()}


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
