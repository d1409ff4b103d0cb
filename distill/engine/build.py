"""Building a training run: the Accelerator, the data loader, the models, optimizer and schedule,
and the prepared ``Trainee`` that the loop in ``distill.engine.loop`` steps."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    set_seed,
)
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from distill.config import Config, ConfigError, TrainConfig
from distill.data import CocoDetection, build_dataset, collate, seed_worker
from distill.device import make_accelerator
from distill.engine.trainable import TrainableModule
from distill.kd import KDTerm, kd_terms
from distill.models.retinanet import check_compatible, set_postprocess
from distill.models.weights import init_from_teacher
from students import build_student
from teachers import build_teacher

log = logging.getLogger(__name__)


def build_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator of a training run."""
    return make_accelerator(
        cfg,
        gradient_accumulation_steps=cfg.train.grad_accum,
        # the shuffle order of epoch e depends only on (seed, e): resumable and equal on all ranks
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.train.seed
        ),
        step_scheduler_with_optimizer=False,
    )


def build_train_loader(accelerator: Accelerator, cfg: Config) -> tuple[CocoDetection, Any]:
    """The training set and its prepared (sharded, seeded) DataLoader."""
    train_set = build_dataset(cfg.data, "train", seed=cfg.train.seed)
    loader = DataLoader(
        train_set,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,  # equal batches on every process and every step
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        worker_init_fn=seed_worker,
    )
    return train_set, accelerator.prepare(loader)


def build_models(
    cfg: Config, job: str, num_classes: int, teacher: nn.Module | None = None
) -> tuple[TrainableModule, nn.Module | None]:
    """The trainable module and the frozen teacher (None when not needed; ``teacher`` is reused
    when given). The student is built first, so its initial weights depend only on the seed;
    then, with a KD term on, ``student.init_from_teacher`` copies the teacher's neck and/or
    head into it (``init_from_teacher``; a plain student never sees the teacher), then the
    trainable parts of the configured KD terms are built, in their registry's order. A resumed
    run loads its checkpoint over all of this: the checkpoint wins."""
    if job == "teacher":
        return TrainableModule(build_teacher(cfg, num_classes, frozen=False)), None
    if job != "student":
        raise ValueError(f"unknown job {job!r}: teacher | student")
    student = build_student(cfg, num_classes)
    terms = kd_terms(cfg.distill)
    if not terms:
        return TrainableModule(student), teacher
    if teacher is None:
        # The teacher's (random) init must not consume the global RNG: the KD parts built below
        # then get the same init whether the teacher is built here or shared (lockstep sweeps).
        with torch.random.fork_rng(devices=[]):
            teacher = build_teacher(cfg, num_classes, frozen=True)
    check_compatible(teacher, student)
    if cfg.student.init_from_teacher:  # a resumed run then loads its checkpoint over it
        copied = init_from_teacher(student, teacher, cfg.student.init_from_teacher)
        log.info("student: %d tensors of its %s copied from the teacher", copied,
                 " and ".join(cfg.student.init_from_teacher))  # fmt: skip
    parts = {name: term.build(student, teacher, cfg.train.seed) for name, term in terms.items()}
    kd = {name: part for name, part in parts.items() if part is not None}
    return TrainableModule(student, kd, terms), teacher


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and normalisation weights (1-D parameters)
    unless ``cfg.decay_norms_and_biases``. Two groups either way (multi-dimensional, then 1-D
    parameters), so that the optimizer's state has one layout.

    ``fused=True``: one kernel per step on CPU and CUDA. The default per-parameter loop took
    0.12 s of an R50-FPN teacher's 0.8 s step on 2 CPU cores, the fused AdamW 0.03 s.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    flat_decay = cfg.weight_decay if cfg.decay_norms_and_biases else 0.0
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": flat_decay},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    raise ConfigError(f"train.optimizer: unknown optimizer {cfg.optimizer!r} (sgd | adamw)")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_steps``, then cosine / step / constant, per optimizer step."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warmup, 1)
    after: torch.optim.lr_scheduler.LRScheduler
    if cfg.schedule == "cosine":
        after = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=rest, eta_min=cfg.lr * 0.01
        )
    elif cfg.schedule == "step":
        milestones = [max(1, round(f * total_steps) - warmup) for f in cfg.step_milestones]
        after = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.step_gamma)
    elif cfg.schedule == "constant":
        after = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise ConfigError(
            f"train.schedule: unknown schedule {cfg.schedule!r} (cosine | step | constant)"
        )
    if warmup == 0:
        return after
    ramp = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=0.001, end_factor=1.0, total_iters=warmup
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, after], milestones=[warmup])


# ---------------------------------------------------------------------------------------------
# A model to train
# ---------------------------------------------------------------------------------------------


@dataclass
class Trainee:
    """One model being trained: its config, its prepared module, optimizer and scheduler, and
    what its last steps and evaluation left for the loop to log."""

    cfg: Config
    run_dir: Path
    module: nn.Module  # prepared TrainableModule (DDP-wrapped under several processes)
    optimizer: Any  # AcceleratedOptimizer
    scheduler: Any  # AcceleratedScheduler
    detector: nn.Module  # the unwrapped torchvision RetinaNet inside ``module``
    terms: dict[str, KDTerm]  # the KD terms it trains with (``kd_terms``, built once)
    writer: SummaryWriter | None  # TensorBoard, on the main process only
    # windows skipped in a row for a non-finite loss (the loop stops at train.max_nonfinite)
    nonfinite_in_a_row: int = 0
    # the total gradient norm (before clipping, a device scalar) of the last window if it
    # stepped; None after an fp16 overflow or a skip
    grad_norm: torch.Tensor | None = None
    # the loss terms of the last window that was not skipped (device scalars), logged by name
    last_logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    # COCO metrics of the last evaluation (``evaluate``'s dict); None until one ran
    last_eval: dict[str, Any] | None = None
    # within an accumulation window (set by train_step, cleared by end_window):
    saved_buffers: list[torch.Tensor] | None = None  # BatchNorm state at the window's start
    window_bad: torch.Tensor | None = None  # (bool) a non-finite loss in the current window


def build_trainee(
    accelerator: Accelerator,
    cfg: Config,
    job: str,
    num_classes: int,
    total_steps: int,
    teacher: nn.Module | None = None,
) -> tuple[Trainee, nn.Module | None]:
    """A prepared model to train (built right after ``set_seed``) and the (shared) teacher."""
    set_seed(cfg.train.seed)
    module, teacher = build_models(cfg, job, num_classes, teacher)
    optimizer = build_optimizer(module, cfg.train)
    module, optimizer = accelerator.prepare(module, optimizer)
    scheduler = accelerator.prepare(build_scheduler(optimizer, cfg.train, total_steps))
    unwrapped = accelerator.unwrap_model(module)
    detector, terms = unwrapped.detector, unwrapped.terms
    set_postprocess(detector, cfg.eval)
    run_dir = Path(cfg.output.dir)
    writer = SummaryWriter(str(run_dir / "tb")) if accelerator.is_main_process else None
    trainee = Trainee(cfg, run_dir, module, optimizer, scheduler, detector, terms, writer)
    return trainee, teacher


def check_lockstep(cfgs: list[Config]) -> None:
    """Models trained in lockstep share everything but their ``distill`` and ``output``."""
    first = cfgs[0]
    for other in cfgs[1:]:
        for section in ("data", "anchors", "teacher", "student", "train", "eval"):
            if getattr(other, section) != getattr(first, section):
                raise ConfigError(
                    f"lockstep training needs the same {section} section for every model "
                    f"({first.output.dir} vs {other.output.dir}); use sequential mode"
                )
    if len(cfgs) > 1 and first.train.mixed_precision == "fp16":
        raise ConfigError(
            "lockstep training with train.mixed_precision=fp16 is not supported: the models "
            "would share one grad scaler (one's overflow shrinks the others' loss scale); use "
            "sequential mode"
        )
    dirs = [c.output.dir for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"two models share an output.dir: {dirs}")


def check_not_optimized(teacher: nn.Module, trainees: list[Trainee]) -> None:
    """The frozen teacher has no parameter in any trainee's optimizer."""
    teacher_params = {id(p) for p in teacher.parameters()}
    for t in trainees:
        for group in t.optimizer.param_groups:
            if any(id(p) in teacher_params for p in group["params"]):
                raise RuntimeError(
                    "a teacher parameter is in an optimizer: the teacher must stay frozen"
                )
