"""``distill check``: what makes distillation fail on a user's own data, found before a run.

Most "distillation made my student worse" reports come from a setup error found after a full
run: a teacher not trained on this data (or not loaded at all), classes in another order,
anchors or widths that do not match, a KD weight orders of magnitude off. ``check_setup`` looks
for each, in minutes on a CPU, and returns one ``Finding`` per check:

    teacher      the teacher loads with the config's settings (weights, anchors, resize); a
                 random teacher (``teacher.weights: null``) fails unless ``teacher.allow_random``
                 (smoke runs and tests: it and the teacher's mAP only warn then)
    classes      the teacher's classes (its card, or torchvision's COCO names) are the
                 dataset's as the model sees them: names in label order, and the category ids
                 too where the ids are the labels (``data.category_ids_as_labels``)
    teacher mAP  on ``sample`` validation images that hold boxes (seeded, every class present
                 in at least one), at score threshold 0, judged against chance (the same
                 detections with their labels shuffled), against its class-agnostic mAP (a
                 large gap: its classes are permuted) and against the mAP its card records on
                 its own validation set (under 0.5x: a failure, under 0.8x: a warning; another
                 resize, anchors or data)
    shapes       feature widths, anchors per location, strides of teacher and student
    kd/<loss>    each KD loss's balance: the norm of its weighted gradient on the student's
                 shared parameters (backbone and FPN) against the detection loss's, averaged
                 over ``BALANCE_BATCHES`` training batches, inside [BALANCE_LOW, BALANCE_HIGH];
                 the weight that would put it at 1 is printed for each (``suggested``)
    kd/...       what each KD term says of its settings on that batch (``KDTerm.findings``)
    dry step     one forward and backward of the student (float32): every gradient finite,
                 and every trainable parameter of the KD terms' parts reached by one

``distill run`` runs them before it trains (the teacher's mAP on ``RUN_SAMPLE`` images, or the
verdict a ``distill check`` recorded in the run directory for the same teacher and data) and
refuses a failure (``--force`` trains anyway, ``--no-check`` skips the checks); the findings go
to ``check.json`` in the run directory once the run has started. Under several processes the
checks run once, on the main process; the others wait for its verdict (``check_once``).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import RetinaNet

from distill.config import Config, replace, resize_bounds, to_dict
from distill.data import CocoDetection, build_dataset, collate
from distill.data.coco import make_coco
from distill.device import process_state, share
from distill.engine.build import build_models
from distill.engine.step import step_parts, teacher_forward
from distill.engine.trainable import TrainableModule
from distill.evaluation.evaluate import category_names, coco_metrics, predict
from distill.fileio import read_json
from distill.kd import FAIL, OK, SKIP, WARN, Finding, kd_weights, needs_teacher
from distill.models.card import read_card
from distill.models.provenance import torchvision_categories
from distill.models.retinanet import build_transform, feature_strides, set_postprocess
from teachers import build_teacher

log = logging.getLogger(__name__)

# validation images ``distill run`` evaluates the teacher on (``distill check --sample``: 50)
RUN_SAMPLE = 16
# the teacher's mAP on the sample must be at least this many times chance's (its detections
# with their labels shuffled) and this much above it
CHANCE_FACTOR, CHANCE_MARGIN = 2.0, 0.02
# class-aware mAP under this share of the class-agnostic mAP: the classes are permuted
AGNOSTIC_SHARE = 0.5
# mAP on the sample under these shares of the mAP the teacher's card records on its own data:
# a failure, a warning (a 50-image sample of the same data scores within ~15% of the card)
CARD_SHARE, CARD_WARN_SHARE = 0.5, 0.8
# a KD loss's gradient norm on the student's backbone and FPN, over the detection loss's
BALANCE_LOW, BALANCE_HIGH = 0.1, 10.0
BALANCE_BATCHES, BALANCE_IMAGES = 2, 2  # training batches, images in each


class CheckFailed(Exception):
    """``distill run`` refused: a check failed (the message lists the failures)."""


def check_setup(cfg: Config, sample: int = 50, recorded: Finding | None = None) -> list[Finding]:
    """Every check of the module docstring for a distillation config; ``sample`` validation
    images for the teacher's mAP (0: that check is skipped), or ``recorded``, that check's
    finding from an earlier check of the same teacher and data. Raises only for what stops the
    run before any model is built (a missing dataset: ``DatasetError``)."""
    if not needs_teacher(cfg.distill):
        return [Finding("kd terms", WARN, "no KD term is on: nothing is distilled")]
    train_set = build_dataset(cfg.data, "train", seed=cfg.train.seed)
    num_classes = train_set.num_categories + 1
    findings: list[Finding] = []
    device = _device()
    try:  # with the config's settings: the same call the run makes
        teacher = build_teacher(cfg, num_classes, frozen=True)
    except Exception as err:  # whatever stops it is the finding
        findings.append(Finding("teacher", FAIL, f"{cfg.teacher.weights}: {err}"))
        return [*findings, Finding("the rest", SKIP, "needs the teacher")]
    findings.append(_teacher_finding(cfg))
    findings.append(_classes_finding(cfg, train_set))
    if cfg.teacher.weights is None:
        findings.append(Finding("teacher mAP", SKIP, "not evaluated: a random teacher"))
    else:
        found = recorded or _teacher_map_finding(cfg, teacher, sample, device)
        if found.status == FAIL and cfg.teacher.allow_random:  # untrained on purpose
            found = Finding(
                found.check, WARN, f"{found.detail} (teacher.allow_random)", found.value
            )
        findings.append(found)
    with torch.random.fork_rng(devices=[]):  # the run's RNG stays where it was
        torch.manual_seed(cfg.train.seed)  # the student the run starts from
        try:  # the student and the KD terms' parts, as the run builds them
            module, _ = build_models(cfg, "student", num_classes, teacher)
        except ValueError as err:  # check_compatible: anchors, classes, strides
            return [*findings, Finding("shapes", FAIL, " ".join(str(err).split()))]
        findings.append(_shapes_finding(teacher, module.detector))
        findings += _step_findings(cfg, teacher, module, train_set, device)
    return findings


def failures(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.status == FAIL]


def _device() -> torch.device:
    """This process's device; no process group is used (``check_once``)."""
    return process_state().device


# --------------------------------------------------------------------------------------------
# Once under several processes, and the verdict a run may reuse
# --------------------------------------------------------------------------------------------


def check_once(cfg: Config, sample: int, reuse: Path | None = None) -> dict[str, Any]:
    """``check_report`` computed on the main process alone; under several processes the others
    wait for it and receive it (one broadcast)."""
    main = process_state().is_main_process
    report: dict[str, Any] = share(check_report(cfg, sample, reuse) if main else None)
    return report


def check_report(cfg: Config, sample: int, reuse: Path | None = None) -> dict[str, Any]:
    """The checks as ``check.json`` holds them: findings, the failed checks' names, the sample
    and the teacher and data they judged (``teacher_fingerprint``). ``reuse``: an earlier
    ``check.json``, whose teacher-mAP verdict stands for the same teacher and data."""
    fingerprint = teacher_fingerprint(cfg)
    recorded = recorded_map(reuse, fingerprint) if reuse is not None else None
    findings = check_setup(cfg, sample, recorded)
    return {
        "findings": [dict(vars(f)) for f in findings],
        "failed": [f.check for f in failures(findings)],
        "sample": sample,
        "teacher": fingerprint,
    }


def teacher_fingerprint(cfg: Config) -> dict[str, Any]:
    """What the teacher's mAP depends on: its section, anchors, resize, the label space, and
    the weights and validation files (path, size, modification time)."""
    val = Path(cfg.data.root) / cfg.data.val
    return {
        "teacher": to_dict(cfg.teacher),
        "anchors": to_dict(cfg.anchors),
        "resize": list(resize_bounds(cfg.data)),
        "category_ids_as_labels": cfg.data.category_ids_as_labels,
        "weights_file": _file_stamp(cfg.teacher.weights),
        "val_file": _file_stamp(str(val)),
    }


def _file_stamp(path: str | None) -> list[Any] | None:
    if path is None or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def recorded_map(path: Path, fingerprint: Mapping[str, Any]) -> Finding | None:
    """The teacher-mAP finding of the ``check.json`` at ``path`` when it judged the same teacher
    and data (``fingerprint``) on a sample, else None."""
    try:
        report = read_json(path) if path.is_file() else None
    except Exception:  # an unreadable earlier report is no verdict: the check runs again
        return None
    if not isinstance(report, dict) or report.get("teacher") != dict(fingerprint):
        return None
    for found in report.get("findings", []):
        if found.get("check") == "teacher mAP" and found.get("status") in (OK, WARN, FAIL):
            detail = f"{found['detail']} (recorded in {path})"
            return Finding("teacher mAP", found["status"], detail, found.get("value"))
    return None


# --------------------------------------------------------------------------------------------
# The teacher and its classes
# --------------------------------------------------------------------------------------------


def _teacher_finding(cfg: Config) -> Finding:
    if cfg.teacher.weights is None:
        noise = "a randomly initialised teacher; distilling it teaches noise"
        if cfg.teacher.allow_random:
            return Finding("teacher", WARN, f"teacher.weights is null: {noise} (allow_random)")
        return Finding(
            "teacher",
            FAIL,
            f"teacher.weights is null: {noise} (give the teacher's weights file or a "
            "torchvision name such as COCO_V1; teacher.allow_random: true for a smoke run)",
        )
    return Finding("teacher", OK, f"{cfg.teacher.arch} loads {cfg.teacher.weights}")


def teacher_classes(cfg: Config) -> tuple[dict[int, tuple[int, str]], str] | None:
    """{label: (category id, name)} the teacher was trained with and where that is read from:
    its weights' card, or torchvision's COCO names for torchvision's weights; None if unknown."""
    weights = cfg.teacher.weights
    if weights is None:
        return None
    card = read_card(Path(weights)) if Path(weights).is_file() else None
    if card is not None:
        by_label = {int(c["label"]): (int(c["id"]), str(c["name"])) for c in card["categories"]}
        return by_label, f"the card of {weights}"
    names = torchvision_categories(cfg, weights)
    if names is not None:
        by_label = {i: (i, n) for i, n in enumerate(names) if i > 0 and n != "N/A"}
        if not cfg.data.category_ids_as_labels:  # labels 1..K in sorted id order
            by_label = {k + 1: v for k, v in enumerate(sorted(by_label.values()))}
        return by_label, "torchvision's COCO categories"
    return None


def _classes_finding(cfg: Config, dataset: CocoDetection) -> Finding:
    """The classes as the model sees them: the name of each label; the category id of each
    label only where the ids are the labels (otherwise ids are the dataset's own business)."""
    found = teacher_classes(cfg)
    ours = {
        label: (cat_id, dataset.class_names[label - 1])
        for cat_id, label in dataset.cat_id_to_label.items()
    }
    if found is None:
        why = "no weights" if cfg.teacher.weights is None else "no card beside its weights"
        return Finding("classes", WARN, f"the teacher's classes are unknown ({why})")
    theirs, source = found
    with_ids = cfg.data.category_ids_as_labels
    wrong = []
    for label in sorted(ours):
        cat_id, name = ours[label]
        ours_seen = (cat_id if with_ids else None, name.lower())
        if label not in theirs:
            wrong.append(f"label {label}: dataset {name!r} (id {cat_id}), teacher: none")
        elif (theirs[label][0] if with_ids else None, theirs[label][1].lower()) != ours_seen:
            ids = f" (id {cat_id})" if with_ids else ""
            their_ids = f" (id {theirs[label][0]})" if with_ids else ""
            wrong.append(
                f"label {label}: dataset {name!r}{ids}, teacher {theirs[label][1]!r}{their_ids}"
            )
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        return Finding(
            "classes",
            FAIL,
            f"{len(wrong)} of the dataset's {len(ours)} classes are not the teacher's ({source}): "
            + "; ".join(wrong[:3])
            + more,
            float(len(wrong)),
        )
    what = "ids and names" if with_ids else "names in label order"
    return Finding("classes", OK, f"{len(ours)} classes, {what} as in {source}")


# --------------------------------------------------------------------------------------------
# The teacher's mAP, against chance, its class-agnostic mAP and its card
# --------------------------------------------------------------------------------------------


def sample_images(dataset: CocoDetection, size: int, seed: int) -> list[int]:
    """Indices of about ``size`` images of ``dataset`` that hold boxes, drawn with ``seed``:
    first one image of each class present (so every class is scored; more than ``size`` when
    the classes need more), then others at random."""
    rng = random.Random(seed)
    with_boxes = [i for i in range(len(dataset)) if len(dataset.labels_of(i))]
    rng.shuffle(with_boxes)
    chosen: list[int] = []
    covered: set[int] = set()
    for i in with_boxes:
        new = set(dataset.labels_of(i).tolist()) - covered
        if new:
            chosen.append(i)
            covered |= new
    taken = set(chosen)
    chosen += [i for i in with_boxes if i not in taken][: max(0, size - len(chosen))]
    return sorted(chosen)


def _teacher_map_finding(
    cfg: Config, teacher: nn.Module, sample: int, device: torch.device
) -> Finding:
    if sample <= 0:
        return Finding("teacher mAP", SKIP, "not evaluated (distill check evaluates it)")
    val_set = build_dataset(replace(cfg.data, max_val_images=None), "val")
    indices = sample_images(val_set, sample, cfg.train.seed)
    if not indices:
        return Finding("teacher mAP", SKIP, f"{val_set.ann_path} holds no boxes to score")
    # score threshold 0: a random teacher's scores sit under the usual 0.05, which would score
    # it 0 for the wrong reason; chance is measured on the same detections
    set_postprocess(teacher, replace(cfg.eval, score_threshold=0.0))
    teacher.to(device)
    batch = cfg.eval.batch_size or cfg.data.batch_size
    results = predict(teacher, build_transform(cfg).to(device), val_set, device, batch, 0, indices)
    teacher.cpu()
    set_postprocess(teacher, cfg.eval)
    scores = teacher_scores(val_set, results, [val_set.image_ids[i] for i in indices], cfg)
    where = f"{len(indices)} images of {val_set.ann_path} with boxes"
    return judge_teacher(scores, teacher_card_map(cfg), where)


def teacher_scores(
    dataset: CocoDetection, results: list[dict[str, Any]], image_ids: list[int], cfg: Config
) -> dict[str, float]:
    """mAP of ``results`` over ``image_ids``: ``map`` (as COCO scores it), ``chance`` (the same
    detections, their labels shuffled among them) and ``agnostic`` (every class one)."""
    names = category_names(dataset)
    scored = coco_metrics(dataset.coco, results, image_ids, names)["map"]
    labels = [r["category_id"] for r in results]
    random.Random(cfg.train.seed).shuffle(labels)
    shuffled = [{**r, "category_id": c} for r, c in zip(results, labels)]
    chance = coco_metrics(dataset.coco, shuffled, image_ids, names)["map"]
    wanted = set(image_ids)
    one_class = make_coco(
        {
            "images": [im for im in dataset.coco.dataset["images"] if im["id"] in wanted],
            "annotations": [
                {**a, "category_id": 1}
                for a in dataset.coco.dataset["annotations"]
                if a["image_id"] in wanted
            ],
            "categories": [{"id": 1, "name": "object"}],
        }
    )
    agnostic_results = [{**r, "category_id": 1} for r in results]
    agnostic = coco_metrics(one_class, agnostic_results, image_ids, {1: "object"})["map"]
    return {"map": max(scored, 0.0), "chance": max(chance, 0.0), "agnostic": max(agnostic, 0.0)}


def teacher_card_map(cfg: Config) -> tuple[float, str] | None:
    """The mAP the teacher's card records on its own validation set, and where; None without
    a card or a recorded evaluation."""
    weights = cfg.teacher.weights
    if weights is None or not Path(weights).is_file():
        return None
    card = read_card(Path(weights))
    if card is None or "evaluation" not in card:
        return None
    record = card["evaluation"]
    return float(record["map"]), f"{record['images']} images of {record.get('annotations', '?')}"


def judge_teacher(
    scores: Mapping[str, float], card: tuple[float, str] | None, where: str
) -> Finding:
    """The teacher-mAP verdict of ``teacher_scores`` (and the card's mAP): fail when it is no
    better than chance, when its classes look permuted, or when it scores far under its card."""
    value, chance, agnostic = scores["map"], scores["chance"], scores["agnostic"]
    text = f"{value:.3f} on {where} (labels shuffled: {chance:.3f}, class-agnostic: {agnostic:.3f})"
    if value < AGNOSTIC_SHARE * agnostic and agnostic >= CHANCE_FACTOR * chance + CHANCE_MARGIN:
        return Finding(
            "teacher mAP",
            FAIL,
            f"{text}: it finds the objects but names them wrongly: its classes are not in the "
            "dataset's order (permuted in its card or training?)",
            value,
        )
    if value < CHANCE_FACTOR * chance or value < chance + CHANCE_MARGIN:
        return Finding(
            "teacher mAP",
            FAIL,
            f"{text}: no better than chance: the teacher was not trained on this data, or its "
            "resize or anchors are not those it was trained with",
            value,
        )
    if card is None:
        return Finding(
            "teacher mAP",
            OK,
            f"{text}; judged on this data alone (no card records its mAP on its own data)",
            value,
        )
    recorded, on = card
    if value < CARD_SHARE * recorded:
        return Finding(
            "teacher mAP",
            FAIL,
            f"{text}: under {CARD_SHARE:g}x the {recorded:.3f} its card records on {on}: "
            "another resize, anchors or data than it was trained on",
            value,
        )
    if value < CARD_WARN_SHARE * recorded:
        return Finding(
            "teacher mAP",
            WARN,
            f"{text}: x{value / recorded:.2f} the {recorded:.3f} its card records on {on}: "
            "other data, or another resize or anchors than it was trained with?",
            value,
        )
    return Finding("teacher mAP", OK, f"{text}; its card records {recorded:.3f} on {on}", value)


def _shapes_finding(teacher: RetinaNet, student: RetinaNet) -> Finding:
    widths = [getattr(model.backbone, "out_channels", "?") for model in (teacher, student)]
    anchors = teacher.anchor_generator.num_anchors_per_location()[0]
    strides = feature_strides(student)
    return Finding(
        "shapes",
        OK,
        f"FPN widths teacher {widths[0]}, student {widths[1]}; {anchors} anchors per "
        f"location, strides {'/'.join(map(str, strides))} on both",
    )


# --------------------------------------------------------------------------------------------
# The KD terms' balance, their own findings, and the dry step
# --------------------------------------------------------------------------------------------


def _step_findings(
    cfg: Config,
    teacher: nn.Module,
    module: TrainableModule,
    train_set: CocoDetection,
    device: torch.device,
) -> list[Finding]:
    """The KD losses' gradient balance over ``BALANCE_BATCHES`` training batches drawn with the
    run's seed, what each term says of its settings on the first, and one backward, in float32:
    the training step's own forward and losses (``step_parts``)."""
    module.to(device).train()
    teacher.to(device)
    transform = build_transform(cfg).to(device)
    terms, weights = module.terms, kd_weights(module.terms)
    shared = [p for p in module.detector.backbone.parameters() if p.requires_grad]
    order = sample_images(train_set, BALANCE_BATCHES * BALANCE_IMAGES, cfg.train.seed)
    order = order[: BALANCE_BATCHES * BALANCE_IMAGES] or [0]
    ratios: dict[str, list[float]] = {name: [] for name in weights}
    findings: list[Finding] = []
    total = torch.zeros(())
    for first in range(0, len(order), BALANCE_IMAGES):
        images, targets = collate([train_set[i] for i in order[first : first + BALANCE_IMAGES]])
        images = [image.to(device) for image in images]
        targets = [
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets
        ]
        image_list, moved = transform(images, targets)
        teacher_out = teacher_forward(None, teacher, image_list, [terms])  # with its probes
        det, kd = step_parts(module, module.detector, terms, image_list, moved, teacher_out)
        det_total = sum(det.values(), torch.zeros((), device=device))
        det_norm = _grad_norm(det_total, shared)
        for name, value in kd.items():
            ratios[name].append(_grad_norm(weights[name] * value, shared) / max(det_norm, 1e-12))
        if first == 0:
            for term in terms.values():
                findings += term.findings(teacher_out)
        total = det_total + sum(weights[n] * v for n, v in kd.items())
    balance = [
        _balance_finding(name, sum(r) / len(r), weights[name], _weight_key(module, name))
        for name, r in ratios.items()
    ]
    return [*balance, *findings, _dry_step(module, total)]


def _grad_norm(loss: torch.Tensor, params: list[nn.Parameter]) -> float:
    """The norm of ``loss``'s gradient on ``params`` (the graph is kept for the next)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return math.sqrt(float(sum(squares, torch.zeros(())))) if squares else 0.0


def _weight_key(module: TrainableModule, loss: str) -> str:
    for term in module.terms.values():
        if loss in term.weights():
            return term.weight_key(loss)
    return loss


def _balance_finding(name: str, ratio: float, weight: float, key: str) -> Finding:
    """A KD loss's gradient norm on the shared parameters over the detection loss's: inside
    [BALANCE_LOW, BALANCE_HIGH], and the weight that would make it 1."""
    check = f"kd/{name}"
    if not math.isfinite(ratio):
        return Finding(check, FAIL, f"its gradient is {ratio} at step 0 ({key}={weight:g})")
    if ratio == 0:
        return Finding(
            check,
            SKIP,
            f"no signal on these images (its loss sends no gradient to the student's backbone "
            f"and FPN); its balance cannot be measured here ({key}={weight:g})",
            ratio,
        )
    suggested = f"{weight / ratio:.3g}"
    text = (
        f"gradient on the student's backbone and FPN x{ratio:.3g} the detection loss's "
        f"({key}={weight:g}; suggested {key}={suggested})"
    )
    if ratio > BALANCE_HIGH:
        return Finding(check, WARN, f"{text}: it drowns the detection loss", ratio)
    if ratio < BALANCE_LOW:
        return Finding(check, WARN, f"{text}: too small to move the student", ratio)
    return Finding(check, OK, text, ratio)


def _dry_step(module: TrainableModule, total: torch.Tensor) -> Finding:
    """One backward: every gradient finite, every trainable parameter of the KD parts reached."""
    module.zero_grad(set_to_none=True)
    total.backward()
    loss = float(total.detach())
    bad = [
        name
        for name, p in module.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    if bad or not math.isfinite(loss):
        first = bad[0] if bad else "the loss"
        return Finding(
            "dry step", FAIL, f"non-finite gradient ({len(bad)} tensors), first: {first}"
        )
    unreached = [
        f"kd.{name}"
        for name, p in module.kd.named_parameters()
        if p.requires_grad and p.grad is None
    ]
    if unreached:
        return Finding(
            "dry step",
            FAIL,
            f"{len(unreached)} trainable parameters of the KD parts get no gradient (left out "
            f"of the loss), first: {unreached[0]}",
        )
    return Finding("dry step", OK, f"loss {loss:.3g}, every gradient finite (float32)")


def format_findings(findings: list[Finding]) -> str:
    """One table, readable at a glance: check, status, what was found."""
    width = max(len(f.check) for f in findings)
    lines = [f"{'check':<{width}}  status   detail", f"{'-' * width}  -------  ------"]
    for f in findings:
        lines.append(f"{f.check:<{width}}  {f.status.upper():<7}  {f.detail}")
    problems = failures(findings)
    warnings = [f for f in findings if f.status == WARN]
    lines.append(
        f"{len(problems)} failed, {len(warnings)} warnings"
        + ("" if problems else " -- the setup looks right")
    )
    return "\n".join(lines)
