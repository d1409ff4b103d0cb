"""The training loop under HuggingFace Accelerate.

One loop serves three jobs:
  * ``job="teacher"``: train the teacher architecture on the dataset (no KD);
  * ``job="student"`` with every KD weight 0: the plain student baseline (the teacher is not run);
  * ``job="student"`` with KD weights: distillation from the frozen teacher.

Read ``train`` top to bottom: the batch goes through the shared transform once, into the frozen
teacher (no_grad, autocast, never prepared) and the one prepared student module, and the
detection and KD terms are summed in ``combine``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill.checkpoint import Progress, find_checkpoint, load_checkpoint, save_checkpoint
from distill.config import Config, ConfigError, TrainConfig, dump_config, replace
from distill.data import build_dataset, collate, seed_worker
from distill.dense import build_transform, check_compatible, dense_forward, detection_loss
from distill.evaluate import evaluate, write_json
from distill.losses import (
    build_adapters,
    build_global_blocks,
    combine,
    distill_terms,
    needs_teacher,
)
from distill.module import StudentModule, student_state_dict
from distill.visualize import log_detections
from distill.weights import save_state_dict_file
from students import build_student
from teachers import build_teacher

log = logging.getLogger("distill.train")


def train(cfg: Config, job: str = "student", resume: Path | None = None) -> dict[str, Any]:
    """Train and evaluate; returns the final COCO metrics (also in ``metrics.json``)."""
    checkpoint = None
    if resume is not None:  # fail before any work if there is nothing to resume from
        checkpoint = find_checkpoint(Path(resume))
        cfg = replace(cfg, **{"output.dir": str(resume)})
    run_dir = Path(cfg.output.dir)
    accelerator = make_accelerator(
        cfg,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="tensorboard",
        project_dir=str(run_dir),
        # the shuffle order of epoch e depends only on (seed, e): resumable and equal on all ranks
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.train.seed
        ),
        step_scheduler_with_optimizer=False,
    )
    _setup_logging(accelerator)
    set_seed(cfg.train.seed)

    # ---- data ---------------------------------------------------------------------------
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    num_classes = train_set.num_categories + 1  # + background (label 0), torchvision's convention
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,  # equal batches on every process and every step
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        worker_init_fn=seed_worker,
    )

    # ---- models -------------------------------------------------------------------------
    transform = build_transform(cfg)  # ONE resize + normalise for teacher and student
    module, teacher = build_models(cfg, job, num_classes)
    optimizer = build_optimizer(module, cfg.train)
    module, optimizer, train_loader = accelerator.prepare(module, optimizer, train_loader)
    steps_per_epoch = max(1, len(train_loader) // cfg.train.grad_accum)  # per-process batches
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    scheduler = accelerator.prepare(build_scheduler(optimizer, cfg.train, total_steps))
    transform.to(accelerator.device)
    if teacher is not None:
        teacher.to(accelerator.device)  # frozen: not prepared, not in the optimizer, not in DDP
    detector = accelerator.unwrap_model(module).detector
    detector.score_thresh = cfg.eval.score_threshold
    detector.detections_per_img = cfg.eval.detections_per_image

    progress = Progress()
    if checkpoint is not None:
        progress = load_checkpoint(accelerator, checkpoint)
        log.info("resumed from %s at epoch %d, step %d", checkpoint, progress.epoch, progress.step)
    if accelerator.is_main_process:
        dump_config(cfg, run_dir / "config.yaml")
    accelerator.init_trackers("tb")
    log.info(
        "job=%s processes=%d device=%s mixed_precision=%s steps=%d (%d per epoch)",
        job, accelerator.num_processes, accelerator.device, accelerator.mixed_precision,
        total_steps, steps_per_epoch,
    )  # fmt: skip

    # ---- loop ---------------------------------------------------------------------------
    metrics: dict[str, Any] = {}
    nonfinite_in_a_row = 0
    images_per_step = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
    for epoch in range(progress.epoch, cfg.train.epochs):
        if progress.step >= total_steps:
            break
        module.train()
        train_loader.set_epoch(epoch)
        loader = train_loader
        if progress.batch > 0:  # resuming mid-epoch: same order, skip what was consumed
            loader = accelerator.skip_first_batches(train_loader, progress.batch)
            loader.set_epoch(epoch)
        bar = tqdm(
            loader, desc=f"epoch {epoch}", disable=not accelerator.is_main_process, leave=False
        )
        tic = time.perf_counter()
        for images, targets in bar:
            with accelerator.accumulate(module):
                # Shared transform, once: teacher and student see the same ImageList and anchors.
                image_list, targets = transform(images, targets)
                teacher_out = None
                if teacher is not None:
                    with torch.no_grad(), accelerator.autocast():
                        teacher_out = dense_forward(teacher, image_list)
                student_out = module(
                    image_list.tensors,
                    image_list.image_sizes,
                    teacher_out.features if teacher_out is not None else None,
                )
                det_losses = detection_loss(detector, student_out, targets)
                kd_terms = (
                    distill_terms(
                        student_out,
                        teacher_out,
                        targets,
                        _batch_hw(image_list.tensors),
                        cfg.distill,
                    )
                    if teacher_out is not None
                    else {}
                )
                total, logs = combine(det_losses, kd_terms, cfg.distill, progress.step, epoch)

                # A non-finite loss on any process skips the step on every process.
                bad = torch.tensor(
                    0.0 if torch.isfinite(total.detach()) else 1.0, device=accelerator.device
                )
                bad_anywhere = bool(accelerator.reduce(bad, "sum").item() > 0)
                accelerator.backward(total)
                grad_norm = None
                if bad_anywhere:
                    optimizer.zero_grad(set_to_none=True)
                elif accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        module.parameters(), cfg.train.grad_clip or math.inf
                    )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            progress.batch += 1
            if not accelerator.sync_gradients:
                continue
            if bad_anywhere:
                nonfinite_in_a_row += 1
                progress.nonfinite_total += 1
                log.warning(
                    "non-finite loss at step %d: step skipped (%d in a row)",
                    progress.step,
                    nonfinite_in_a_row,
                )
                accelerator.log(
                    {"train/nonfinite_skipped": progress.nonfinite_total}, step=progress.step
                )
                if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                    raise RuntimeError(
                        f"{nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite="
                        f"{cfg.train.max_nonfinite}); last terms: {logs}. Lower train.lr or use "
                        "gradient clipping; the last checkpoint is in {run_dir}/checkpoints"
                    )
                continue
            nonfinite_in_a_row = 0
            progress.step += 1
            toc = time.perf_counter()
            images_per_s = images_per_step / max(toc - tic, 1e-9)
            tic = toc
            bar.set_postfix(loss=f"{logs['loss/total']:.3f}", img_s=f"{images_per_s:.1f}")
            if progress.step % cfg.train.log_every == 0 or progress.step == 1:
                logs["train/lr"] = scheduler.get_last_lr()[0]
                logs["train/grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
                logs["train/images_per_s"] = images_per_s
                logs["train/epoch"] = epoch
                accelerator.log(logs, step=progress.step)
            if progress.step >= total_steps:
                break
        bar.close()
        progress.epoch, progress.batch = epoch + 1, 0
        last = epoch + 1 == cfg.train.epochs or progress.step >= total_steps
        every = cfg.eval.every_epochs
        if last or (every > 0 and (epoch + 1) % every == 0):
            metrics = _evaluate_and_log(
                cfg, accelerator, detector, teacher, transform, val_set, progress.step
            )
        save_checkpoint(accelerator, run_dir, progress)

    # ---- outputs ------------------------------------------------------------------------
    if not metrics:  # e.g. resumed after the last epoch
        metrics = _evaluate_and_log(
            cfg, accelerator, detector, teacher, transform, val_set, progress.step
        )
    if accelerator.is_main_process:
        weights_name = "teacher.pt" if job == "teacher" else "student.pt"
        save_state_dict_file(
            student_state_dict(accelerator.unwrap_model(module)), run_dir / weights_name
        )
        summary = {
            "job": job,
            "step": progress.step,
            "epoch": progress.epoch,
            "num_processes": accelerator.num_processes,
        }
        write_json({**metrics, **summary}, run_dir / "metrics.json")
        log.info(
            "mAP %.4f (AP50 %.4f); wrote %s and metrics.json in %s",
            metrics["map"],
            metrics["ap50"],
            weights_name,
            run_dir,
        )
    accelerator.end_training()
    return metrics


def make_accelerator(cfg: Config, **kwargs: Any) -> Accelerator:
    """An Accelerator for this config; usable several times in one process (tests, demo, sweeps).

    Without CUDA, ``cpu=True`` is what lets Accelerate run several CPU processes with gloo
    (``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine).
    """
    # Accelerate keeps one global state per process; a new run may use another precision.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=check_mixed_precision(cfg.train.mixed_precision),
        **kwargs,
    )


def build_models(cfg: Config, job: str, num_classes: int) -> tuple[StudentModule, nn.Module | None]:
    """The trainable module and the frozen teacher (None when it is not needed)."""
    if job == "teacher":
        return StudentModule(build_teacher(cfg, num_classes, frozen=False)), None
    if job != "student":
        raise ValueError(f"unknown job {job!r}: teacher | student")
    student = build_student(cfg, num_classes)
    if not needs_teacher(cfg.distill):
        return StudentModule(student), None
    teacher = build_teacher(cfg, num_classes, frozen=True)
    check_compatible(teacher, student)
    feature = cfg.distill.feature
    levels = feature.levels if feature.weight > 0 else ()
    s_ch, t_ch = student.backbone.out_channels, teacher.backbone.out_channels
    adapters = None
    if levels and (feature.kind == "mse" or s_ch != t_ch):
        adapters = build_adapters(levels, s_ch, t_ch)
    global_s = global_t = None
    if levels and feature.kind == "fgd" and feature.fgd_lambda > 0:
        blocks = build_global_blocks(levels, t_ch)  # {"student_p3": ..., "teacher_p3": ...}
        global_s = nn.ModuleDict({lv: blocks[f"student_{lv}"] for lv in levels})
        global_t = nn.ModuleDict({lv: blocks[f"teacher_{lv}"] for lv in levels})
    return StudentModule(student, levels, adapters, global_s, global_t), teacher


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and normalisation weights (1-D parameters)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
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


def check_mixed_precision(value: str) -> str:
    """Accelerate's mixed-precision mode; fp16 without CUDA is an error, not a silent fallback."""
    if value not in ("no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision: expected no | fp16 | bf16, got {value!r}")
    if value == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU and none is available; "
            "use bf16 (CPUs with avx512_bf16 / AMX run it fast) or no"
        )
    return value


def _evaluate_and_log(
    cfg: Config,
    accelerator: Accelerator,
    detector: nn.Module,
    teacher: nn.Module | None,
    transform: nn.Module,
    val_set: Any,
    step: int,
) -> dict[str, Any]:
    batch_size = cfg.eval.batch_size or cfg.data.batch_size
    metrics = evaluate(detector, transform, val_set, accelerator, batch_size, cfg.data.num_workers)
    scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}
    scalars.update({f"eval_class/{k}": v for k, v in metrics.get("per_class", {}).items()})
    accelerator.log(scalars, step=step)
    if accelerator.is_main_process and cfg.eval.images_logged > 0:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        log_detections(writer, detector, teacher, transform, val_set, cfg.eval.images_logged, step)
    if accelerator.is_main_process:
        log.info("step %d: mAP %.4f AP50 %.4f", step, metrics["map"], metrics["ap50"])
    return metrics


def _batch_hw(tensors: torch.Tensor) -> tuple[int, int]:
    return int(tensors.shape[-2]), int(tensors.shape[-1])


def _setup_logging(accelerator: Accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("distill").setLevel(level)
