"""The report page: seven sections of tables and figures in one HTML file (no JavaScript), and
an eighth, the gain over seeds, where a recipe was run on several seeds.

Figures are written as PNG files into the output folder and embedded in the page as base64
``data:`` URIs, so the page opens anywhere without a network or the PNG files. Every number of
a table cell taken from a ``metrics.json`` carries its exact value in ``data-value``.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from distill.data import CocoDetection
from distill.evaluation.evaluate import category_names
from distill.evaluation.intervals import CLASS, Interval, format_interval
from distill.report.detections import FP_COLOR, MISS_COLOR, detection_rows, detections_figure
from distill.report.figures import (
    SIZE_LABELS,
    per_class_figure,
    per_size_figure,
    pr_figure,
    read_scalars,
    role_colors,
    training_figure,
)
from distill.report.model import SIZES, Lineup, Model, gain_and_gap, metric
from distill.report.seeds import SeedGroup, gain_over_seeds, seed_of

SUMMARY_KEYS = {"map": "mAP", "ap50": "AP50", "ap75": "AP75", "aps": "APs", "apm": "APm",
                "apl": "APl", "ar100": "AR@100"}  # fmt: skip
LEAST_HELPED = 3  # classes named in words

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; } td.n { text-align: right; }
th { background: #f3f3f3; } tr.teacher td { color: #555; } tr.baseline td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #8a5300; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle; }
"""


def build_page(
    lineup: Lineup,
    dataset: CocoDetection,
    out: Path,
    *,
    num_differ: int,
    num_random: int,
    min_score: float,
    resamples: int = 1000,
) -> str:
    """The whole page; figures are written into ``out`` as they are drawn. resamples: of the
    bootstrap over images of a recipe run on several seeds (0: no interval over images)."""

    colors = dict(
        zip((m.name for m in lineup.models), role_colors([m.role for m in lineup.models]))
    )
    class_names = category_names(dataset)
    groups = gain_over_seeds(lineup, dataset, resamples)
    sections = [
        ("Summary", _summary(lineup)),
        *([("Gain over seeds", _seeds(groups, resamples))] if groups else []),
        ("Per class", _per_class(lineup, colors, out)),
        ("Per object size", _per_size(lineup, colors, out)),
        ("Precision–recall curves", _pr_curves(lineup, colors, out)),
        ("Training curves", training_section(lineup, colors, out)),
        ("Detections side by side", _detections(
            lineup, dataset, class_names, out, num_differ, num_random, min_score)),
    ]  # fmt: skip
    if lineup.sweeps:
        sections.append(("Sweep", _sweeps(lineup)))
    title = f"Distillation report: {lineup.distilled.name}"
    body = "\n".join(
        f'<h2 id="s{i}">{i}. {html.escape(name)}</h2>\n{content}'
        for i, (name, content) in enumerate(sections, 1)
    )
    toc = " · ".join(
        f'<a href="#s{i}">{html.escape(n)}</a>' for i, (n, _) in enumerate(sections, 1)
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>Validation set: {html.escape(str(dataset.ann_path))} "
        f"({len(dataset)} images). {toc}</p>\n{body}\n</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _summary(lineup: Lineup) -> str:
    header = ["model", "role", *SUMMARY_KEYS.values(), "params (M)", "GFLOPs", "latency (ms)",
              "train (min)", "mAP gain", "gap closed"]  # fmt: skip
    rows = []
    for m in lineup.models:
        cells = [_text(m.name), _text(m.role)]
        cells += [_value(m, k) for k in SUMMARY_KEYS]
        cells += [
            _number(m.cost.get("params", math.nan) / 1e6, 2),
            _number(m.cost.get("gflops", math.nan), 2),
            _number(m.cost.get("latency_ms", math.nan), 1),
            _value(m, "train_minutes", 1),
        ]
        gain, closed = (
            gain_and_gap(m, lineup.baseline_of(m), lineup.teacher, "map")
            if m.role == "student"
            else (math.nan, math.nan)
        )
        cells += [_number(gain, 3, signed=True), _percent(closed)]
        rows.append((m.role, cells))
    notes = [*lineup.notes, *(n for m in lineup.models for n in m.notes)]
    return (
        _table(header, rows)
        + "<p>Metrics: COCO box AP from each run's <code>metrics.json</code> (AP over IoU "
        "0.50:0.95; APs/m/l: objects under 32², up to 96², above 96² pixels). Gain: mAP − the "
        "baseline's; gap closed: gain / (teacher mAP − baseline mAP). Params, GFLOPs (backbone + "
        "FPN + head, one image at the config's size) and latency (median CPU forward, batch 1) "
        "measured here, while the report ran (a busy machine gives larger times); training "
        "minutes are those of the run's lockstep group.</p>"
        + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    )


def class_order(lineup: Lineup) -> tuple[list[str], dict[str, float]]:
    """The classes sorted by the distilled student's AP gain over the baseline (largest first),
    and those gains (empty without a baseline: then sorted by the student's AP)."""
    distilled, baseline = lineup.distilled, lineup.baseline
    classes = list((distilled.metrics or {}).get("per_class", {}))
    ap = {c: metric(distilled, "per_class", c) for c in classes}
    if baseline is None:
        return sorted(classes, key=lambda c: (_last_if_nan(-ap[c]), c)), {}
    gains = {c: ap[c] - metric(baseline, "per_class", c) for c in classes}
    return sorted(classes, key=lambda c: (_last_if_nan(-gains[c]), c)), gains


def _last_if_nan(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _per_class(lineup: Lineup, colors: dict[str, str], out: Path) -> str:

    classes, gains = class_order(lineup)
    distilled = lineup.distilled
    series = [
        (m.name, colors[m.name], {c: metric(m, "per_class", c) for c in classes})
        for m in lineup.models
    ]
    per_class_figure(
        out / "per_class.png",
        classes,
        series,
        f"AP per class, sorted by the gain of {distilled.name}" if gains else "AP per class",
    )
    known = [c for c in classes if not math.isnan(gains.get(c, math.nan))]
    if known and gains[known[0]] == gains[known[-1]]:
        text = (
            f"<p>{html.escape(distilled.name)}'s AP differs from the baseline's by the same "
            f"{gains[known[0]]:+.3f} on every class: no class was helped more than another.</p>"
        )
    elif known:
        least = sorted(known, key=lambda c: (gains[c], c))[:LEAST_HELPED]
        words = ", ".join(f"{html.escape(c)} ({gains[c]:+.3f} AP)" for c in least)
        text = (
            f"<p>Distillation helped <b>{html.escape(distilled.name)}</b> least on: "
            f"<b>{words}</b>. It helped most on {html.escape(known[0])} "
            f"({gains[known[0]]:+.3f}).</p>"
        )
    else:
        text = '<p class="note">No baseline: classes are sorted by the student\'s AP.</p>'
    header = ["class", *(m.name for m in lineup.models), f"gain of {distilled.name}"]
    rows = [
        (
            "",
            [
                _text(c),
                *(_value(m, "per_class", key2=c) for m in lineup.models),
                _number(gains.get(c, math.nan), 3, signed=True),
            ],
        )
        for c in classes
    ]
    return text + _figure(out / "per_class.png", "AP per class") + _table(header, rows)


def _per_size(lineup: Lineup, colors: dict[str, str], out: Path) -> str:

    series = [(m.name, colors[m.name], {k: metric(m, k) for k in SIZES}) for m in lineup.models]
    have_gap = bool(lineup.baselines) and lineup.teacher is not None
    gap = []
    rows = []
    for m in lineup.students if have_gap else []:
        closed = {k: gain_and_gap(m, lineup.baseline_of(m), lineup.teacher, k)[1] for k in SIZES}
        gap.append((m.name, colors[m.name], closed))
        rows.append(("", [_text(m.name), *(_percent(closed[k]) for k in SIZES)]))
    drawable = [g for g in gap if any(not math.isnan(v) for v in g[2].values())]
    per_size_figure(out / "per_size.png", series, drawable)
    text = _figure(out / "per_size.png", "AP per object size")
    if have_gap:
        header = ["student", *(f"gap closed, {v}" for v in SIZE_LABELS.values())]
        text += _table(header, rows)
        if not drawable:
            text += (
                '<p class="note">The teacher is not ahead of the baseline at any size: '
                "there is no gap to close.</p>"
            )
    else:
        text += '<p class="note">The gap closed per size needs a teacher and a baseline.</p>'
    return text


def _pr_curves(lineup: Lineup, colors: dict[str, str], out: Path) -> str:
    models = [m for m in lineup.models if m.evaluated]
    if not models:
        return '<p class="note">No model has weights to evaluate: no curves.</p>'
    curves = [(m.name, colors[m.name], m.evaluator) for m in models]
    pr_figure(out / "pr_curves.png", curves, [0.5, 0.75])
    return (
        "<p>COCOeval's precision at its 101 recall points, all object sizes, up to 100 "
        "detections per image, averaged over the classes with ground truth (the legend gives "
        "the area under each curve: the AP at that IoU). Evaluated here on the validation set."
        "</p>" + _figure(out / "pr_curves.png", "precision-recall curves")
    )


def training_section(lineup: Lineup, colors: dict[str, str], out: Path) -> str:
    """Section 5: every run's TensorBoard scalars; runs without logs are named in a note."""
    runs = [m for m in lineup.models if m.role != "teacher"]
    notes = [
        f"{m.run_dir} has no TensorBoard logs (tb/): its curves are left out"
        for m in runs
        if m.tb_dir is None
    ]
    logged = [(m.name, colors[m.name], read_scalars(m.tb_dir)) for m in runs if m.tb_dir]
    drawn = training_figure(out / "training_curves.png", logged) if logged else []
    text = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    if not drawn:
        return text + '<p class="note">No training curves to draw.</p>'
    return (
        text + f"<p>From each run's <code>tb/</code> logs: {html.escape(', '.join(drawn))}. The "
        "teacher's own curves are in its run's logs (its schedule is much longer).</p>"
        + _figure(out / "training_curves.png", "training curves")
    )


def _detections(
    lineup: Lineup,
    dataset: CocoDetection,
    class_names: dict[int, str],
    out: Path,
    num_differ: int,
    num_random: int,
    min_score: float,
) -> str:

    distilled = lineup.distilled
    if not distilled.evaluated:
        return f'<p class="note">{html.escape(distilled.name)} has no weights: no detections.</p>'
    reference = next((m for m in (lineup.baseline, lineup.teacher) if m and m.evaluated), None)
    shown = [m for m in (lineup.teacher, lineup.baseline, distilled) if m and m.evaluated]
    differ = num_differ if reference is not None else 0
    columns, images = detection_rows(
        shown, distilled, reference or distilled, dataset, min_score, differ, num_random
    )
    if not images:
        return '<p class="note">No images chosen (--images 0 --random-images 0).</p>'
    detections_figure(out / "detections.png", dataset, columns, images, class_names)
    versus = f"the {reference.role} ({html.escape(reference.name)})" if reference else "nothing"
    return (
        f"<p>Rows: the images where {html.escape(distilled.name)} and {versus} differ most in "
        f"errors (false positives + missed objects at IoU 0.5, detections scoring at least "
        f"{min_score:g}), then {num_random} at random. Boxes are coloured by class with label "
        f"and score; {_swatch(FP_COLOR)} <b>FP</b>: false positive; {_swatch(MISS_COLOR)} "
        "<b>miss</b>: a ground-truth object the model did not find. Matches are COCOeval's.</p>"
        + _figure(out / "detections.png", "detections side by side")
    )


def _seeds(groups: list[SeedGroup], resamples: int) -> str:
    parts = []
    for group in groups:
        seeds = ", ".join(str(seed_of(student)) for student, _ in group.pairs)
        drawn = next(iter(group.images.values()), None)  # any: each says how many images
        over_images = (
            f"over images: a paired bootstrap, {resamples} resamples of the {drawn.n} "
            "validation images (the same images for both models of every seed), evaluated here"
            if drawn is not None
            else "no interval over images"
        )
        parts.append(
            f"<p><b>{html.escape(group.name)}</b> against the plain student of the same seed "
            f"(seeds {seeds}): the gain (distilled − plain, mean over the seeds) with its 95% "
            f"interval over seeds (Student t of the per-seed gains in the runs' "
            f"<code>metrics.json</code>) and {over_images}.</p>"
            + "".join(f'<p class="note">{html.escape(n)}</p>' for n in group.notes)
        )
        keys = [(label, key) for key, label in SUMMARY_KEYS.items() if key in group.seeds]
        classes = sorted(
            (k for k in group.seeds if k.startswith(CLASS)),
            key=lambda k: (_last_if_nan(-group.seeds[k].estimate), k),
        )
        keys += [(k.removeprefix(CLASS), k) for k in classes]
        header = ["metric / class", "gain, over seeds", "gain, over images"]
        rows = [
            ("", [_text(label), _interval(group.seeds[key]), _interval(group.images.get(key))])
            for label, key in keys
        ]
        parts.append(_table(header, rows))
    return "".join(parts)


def _sweeps(lineup: Lineup) -> str:
    parts = []
    for path, rows in lineup.sweeps:
        header = list(rows[0]) if rows else []
        body = [("", [_text(r[k]) if not _is_float(r[k]) else _number(float(r[k]), 3)
                      for k in header]) for r in rows]  # fmt: skip
        parts.append(
            f"<p>Sweep <code>{html.escape(str(path))}</code> (its <code>sweep.csv</code>); its "
            "points are the students above.</p>" + _table(header, body)
        )
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------


def _figure(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><br>'
        f"<small>{html.escape(path.name)}</small></p>"
    )


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f'<tr class="{cls}">{"".join(cells)}</tr>' for cls, cells in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _text(value: Any) -> str:
    return f"<td>{html.escape(str(value))}</td>"


def _value(model: Model, key: str, digits: int = 3, key2: str | None = None) -> str:
    """A metrics.json number of ``model``, with its exact value in ``data-value``."""
    value = (model.metrics or {}).get(key)
    if key2 is not None:
        value = value.get(key2) if isinstance(value, dict) else None
    if not isinstance(value, int | float):
        return '<td class="n">–</td>'
    attrs = f'data-model="{html.escape(model.name)}" data-key="{html.escape(key2 or key)}"'
    text = f"{value:.{digits}f}" if value >= 0 else "–"  # COCO's -1: no ground truth there
    return f'<td class="n" {attrs} data-value="{value!r}">{text}</td>'


def _number(value: float, digits: int, signed: bool = False) -> str:
    if math.isnan(value):
        return '<td class="n">–</td>'
    return f'<td class="n">{value:{"+" if signed else ""}.{digits}f}</td>'


def _interval(interval: Interval | None) -> str:
    """A gain and its interval, with its numbers in ``data-*`` (no interval: nan)."""
    if interval is None:
        return '<td class="n">–</td>'
    numbers = {"estimate": interval.estimate, "low": interval.low, "high": interval.high}
    attrs = " ".join(f'data-{k}="{v!r}"' for k, v in numbers.items())
    return (
        f'<td class="n" data-interval="{html.escape(interval.method)}" {attrs}>'
        f"{html.escape(format_interval(interval))}</td>"
    )


def _percent(value: float) -> str:
    return '<td class="n">–</td>' if math.isnan(value) else f'<td class="n">{value:.0%}</td>'


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{color}"></span>'


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "." in text or "e" in text.lower() or text.lower() == "nan"
