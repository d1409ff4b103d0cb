"""``distill check``: what makes distillation fail on a user's own data, found before a run.

Most "distillation made my student worse" reports come from a setup error found after a full
run: a teacher not trained on this data (or not loaded at all), classes in another order,
anchors or widths that do not match, a KD weight orders of magnitude off. ``check_setup`` looks
for each, in minutes on a CPU, and returns one ``Finding`` per check:

    teacher      the teacher loads with the config's settings (weights, anchors, resize)
    classes      the teacher's classes (its card, or torchvision's COCO names) are the
                 dataset's, label by label: ids and names
    teacher mAP  on the first ``sample`` validation images (skipped with ``sample=0``); near
                 zero means the teacher was not trained on this data
    shapes       feature widths, anchors per location, strides of teacher and student
    kd/<term>    each KD term's weighted loss at full weight against the detection loss, on
                 the first training batch: orders of magnitude larger, or zero, is a warning
    kd/...       what each KD term says of its settings on that batch (``KDTerm.findings``;
                 FGD: the share of the finest level's pixels and channels its teacher
                 attention spreads over at its temperature, under 2% a warning)
    dry step     one forward and backward of the student (float32): every gradient finite

``distill run`` runs the cheap part (``check_setup(cfg, sample=0)``: no evaluation) before it
trains and refuses a failure (``--force`` trains anyway, ``--no-check`` skips the checks); the
findings go to ``check.json`` in the run directory once the run has started.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import RetinaNet

from distill.config import Config, replace
from distill.data import CocoDetection, build_dataset, collate
from distill.device import inference_accelerator
from distill.engine.build import build_models
from distill.engine.step import step_losses, teacher_forward
from distill.engine.trainable import TrainableModule
from distill.evaluation.evaluate import evaluate
from distill.kd import FAIL, OK, SKIP, WARN, Finding, needs_teacher
from distill.models.card import read_card
from distill.models.provenance import torchvision_categories
from distill.models.retinanet import build_transform, feature_strides, set_postprocess
from teachers import build_teacher

log = logging.getLogger(__name__)

# a teacher below this mAP on the sample was not trained on this data (or runs wrongly)
MIN_TEACHER_MAP = 0.01
# a weighted KD term this many times larger than the detection loss drowns it; this many times
# smaller does nothing
KD_RATIO_HIGH, KD_RATIO_LOW = 100.0, 1e-4


class CheckFailed(Exception):
    """``distill run`` refused: a check failed (the message lists the failures)."""


def check_setup(cfg: Config, sample: int = 50) -> list[Finding]:
    """Every check of the module docstring for a distillation config; ``sample`` validation
    images for the teacher's mAP (0: that check is skipped). Raises only for what stops the
    run before any model is built (a missing dataset: ``DatasetError``)."""
    if not needs_teacher(cfg.distill):
        return [Finding("kd terms", WARN, "every KD weight is 0: nothing is distilled")]
    train_set = build_dataset(cfg.data, "train", seed=cfg.train.seed)
    num_classes = train_set.num_categories + 1
    findings: list[Finding] = []

    try:  # with the config's settings: the same call the run makes
        teacher = build_teacher(cfg, num_classes, frozen=True)
    except Exception as err:  # whatever stops it is the finding
        findings.append(Finding("teacher", FAIL, f"{cfg.teacher.weights}: {err}"))
        return [*findings, Finding("the rest", SKIP, "needs the teacher")]
    findings.append(_teacher_finding(cfg))
    findings.append(_classes_finding(cfg, train_set))
    findings.append(_teacher_map_finding(cfg, teacher, sample))
    with torch.random.fork_rng(devices=[]):  # the run's RNG stays where it was
        torch.manual_seed(cfg.train.seed)  # the student the run starts from
        try:  # the student and the KD terms' parts, as the run builds them
            module, _ = build_models(cfg, "student", num_classes, teacher)
        except ValueError as err:  # check_compatible: anchors, classes, strides
            return [*findings, Finding("shapes", FAIL, " ".join(str(err).split()))]
        findings.append(_shapes_finding(teacher, module.detector))
        findings += _step_findings(cfg, teacher, module, train_set)
    return findings


def failures(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.status == FAIL]


def _teacher_finding(cfg: Config) -> Finding:
    if cfg.teacher.weights is None:
        return Finding(
            "teacher",
            WARN,
            "teacher.weights is null: a randomly initialised teacher; distilling it teaches "
            "noise (give the teacher's weights file, or a torchvision name such as COCO_V1)",
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
    found = teacher_classes(cfg)
    ours = {
        label: (cat_id, dataset.class_names[label - 1])
        for cat_id, label in dataset.cat_id_to_label.items()
    }
    if found is None:
        why = "no weights" if cfg.teacher.weights is None else "no card beside its weights"
        return Finding("classes", WARN, f"the teacher's classes are unknown ({why})")
    theirs, source = found
    wrong = []
    for label in sorted(ours):
        cat_id, name = ours[label]
        if label not in theirs:
            wrong.append(f"label {label}: dataset {name!r} (id {cat_id}), teacher: none")
        elif (theirs[label][0], theirs[label][1].lower()) != (cat_id, name.lower()):
            wrong.append(
                f"label {label}: dataset {name!r} (id {cat_id}), teacher {theirs[label][1]!r} "
                f"(id {theirs[label][0]})"
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
    return Finding("classes", OK, f"{len(ours)} classes, ids and names as in {source}")


def _teacher_map_finding(cfg: Config, teacher: nn.Module, sample: int) -> Finding:
    if sample <= 0:
        return Finding("teacher mAP", SKIP, "not evaluated (distill check evaluates it)")
    data = replace(cfg.data, max_val_images=sample)
    val_set = build_dataset(data, "val")
    accelerator = inference_accelerator()
    set_postprocess(teacher, cfg.eval)
    teacher.to(accelerator.device)
    metrics = evaluate(
        teacher,
        build_transform(cfg).to(accelerator.device),
        val_set,
        accelerator,
        cfg.eval.batch_size or cfg.data.batch_size,
        cfg.data.num_workers,
    )
    teacher.cpu()
    value = float(metrics["map"])
    where = f"on the first {len(val_set)} images of {val_set.ann_path}"
    if value < MIN_TEACHER_MAP:
        return Finding(
            "teacher mAP",
            FAIL,
            f"{value:.3f} {where}: the teacher was not trained on this data, or its classes, "
            "resize or anchors are not those it was trained with",
            value,
        )
    return Finding("teacher mAP", OK, f"{value:.3f} {where}", value)


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


def _step_findings(
    cfg: Config, teacher: nn.Module, module: TrainableModule, train_set: CocoDetection
) -> list[Finding]:
    """The KD terms' magnitudes at full weight, what each term says of its settings, and one
    backward, on the first training batch (two images, in order), in float32, on the device a
    run would use: the training step's own forward and losses (``step_losses``)."""
    accelerator = inference_accelerator()  # float32
    module.to(accelerator.device).train()
    teacher.to(accelerator.device)
    images, targets = collate([train_set[i] for i in range(min(len(train_set), 2))])
    images = [image.to(accelerator.device) for image in images]
    targets = [
        {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    image_list, moved = build_transform(cfg).to(accelerator.device)(images, targets)
    terms = module.terms
    teacher_out = teacher_forward(accelerator, teacher, image_list, [terms])  # with its probes
    # at full weight: the warm-up's and the stop epoch's scale left out
    total, logs = step_losses(module, module.detector, terms, image_list, moved, teacher_out, 1.0)
    det_total = sum(
        float(v) for k, v in logs.items() if k.startswith("loss/") and k != "loss/total"
    )
    kd = [k.removeprefix("kd_weighted/") for k in logs if k.startswith("kd_weighted/")]
    findings = [
        _magnitude_finding(name, float(logs[f"kd_weighted/{name}"]), det_total) for name in kd
    ]
    for term in terms.values():
        findings += term.findings(teacher_out)
    total.backward()
    loss = float(total.detach())
    bad = [
        name
        for name, p in module.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    if bad or not math.isfinite(loss):
        first = bad[0] if bad else "the loss"
        why = f"non-finite gradient ({len(bad)} tensors), first: {first}"
        return [*findings, Finding("dry step", FAIL, why)]
    why = f"loss {loss:.3g}, every gradient finite (float32)"
    return [*findings, Finding("dry step", OK, why)]


def _magnitude_finding(name: str, weighted: float, detection: float) -> Finding:
    check = f"kd/{name}"
    if not math.isfinite(weighted):
        return Finding(check, FAIL, f"weighted loss {weighted} at step 0")
    ratio = weighted / detection if detection > 0 else math.inf
    text = f"weighted {weighted:.3g} vs detection loss {detection:.3g} (x{ratio:.3g})"
    if weighted == 0:
        return Finding(check, WARN, f"{text}: zero, this term teaches nothing", ratio)
    if ratio > KD_RATIO_HIGH:
        return Finding(
            check,
            WARN,
            f"{text}: over {KD_RATIO_HIGH:g}x the detection loss, it drowns it; lower its weight",
            ratio,
        )
    if ratio < KD_RATIO_LOW:
        return Finding(check, WARN, f"{text}: too small to matter; raise its weight", ratio)
    return Finding(check, OK, text, ratio)


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
