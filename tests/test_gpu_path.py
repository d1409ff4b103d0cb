"""The GPU path, exercised on this CPU machine: fp16 with its grad scaler, gradient accumulation
in lockstep, KD normalisers across processes, the sweep's report, host syncs in a step."""

from __future__ import annotations

import ast
import itertools
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import PartialState
from accelerate.utils import GradScalerKwargs, set_seed
from torch.utils._python_dispatch import TorchDispatchMode

import distill.device
import distill.engine.loop
import distill.engine.setup
import distill.engine.step
import distill.experiments.sweep
from distill.config import Config, ConfigError, load_config
from distill.data import build_dataset, collate
from distill.device import make_accelerator
from distill.engine.build import build_models, check_lockstep
from distill.engine.loop import TrainingStopped, train, train_group
from distill.engine.step import mean_over_processes, step_losses, teacher_forward
from distill.experiments.sweep import is_lockstep, parse_grid, sweep_command
from distill.kd import kd_scale
from distill.models.retinanet import build_transform
from distill.models.weights import load_state_dict_file
from tests.conftest import REPO, smoke_overrides
from tests.test_losses import feature_kd_loss

SMOKE = REPO / "configs" / "shapes" / "smoke.yaml"
NO_KD = ("distill.feature.kind=null", "distill.logit.weight=0", "distill.box.weight=0")
QUIET_EVAL = ("eval.every_epochs=0", "eval.images_logged=0")  # one evaluation, at the end


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_state_dict_file(a), load_state_dict_file(b)
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "last").read_text().strip()


def test_fp16_overflows_shrink_the_scale_and_a_resume_keeps_it(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale of 1e10 overflows the fp16 gradients, 1e7 too, 1e4 does not (the scale shrinks
    1000x an overflow): the first two steps are the scaler's own skips. The run, stopped
    after the first one and resumed, goes on; they are not non-finite losses, the LR schedule
    waits for them, and the resumed run starts from the saved scale."""
    monkeypatch.setenv(distill.device.CPU_FP16_ENV, "1")
    monkeypatch.setattr(
        distill.device,
        "GRAD_SCALER",
        GradScalerKwargs(init_scale=1e10, backoff_factor=1e-3),
    )

    def config(out: Path) -> Config:
        fp16 = ["train.mixed_precision=fp16", "train.max_steps=3", *QUIET_EVAL]
        return load_config(SMOKE, [*smoke_overrides(shapes_root, out), *NO_KD, *fp16])

    run_dir = tmp_path / "fp16"
    with pytest.raises(TrainingStopped):
        train(config(run_dir), stop_after=1)
    saved = torch.load(last_checkpoint(run_dir) / "scaler.pt", weights_only=True)
    assert saved["scale"] == pytest.approx(1e7)  # 1e10 overflowed at step 1
    metrics = train(config(run_dir), resume=run_dir)
    assert metrics["mixed_precision"] == "fp16"
    assert metrics["step"] == 3
    # 1e7 overflowed at step 2, 1e4 did not: with the initial scale again (not restored) the
    # resumed run would have overflowed at step 3 as well
    assert metrics["scaler_skipped"] == 2
    assert metrics["nonfinite_skipped"] == 0
    checkpoint = last_checkpoint(run_dir)
    scheduler = torch.load(checkpoint / "scheduler.bin", weights_only=True)
    assert scheduler["last_epoch"] == 3 - 2  # the LR schedule stepped only with the optimizer
    assert torch.load(checkpoint / "scaler.pt", weights_only=True)["scale"] == pytest.approx(1e4)


def test_lockstep_with_gradient_accumulation_equals_separate_runs(
    shapes_root: Path, tmp_path: Path
) -> None:
    """Two students, 2 micro-batches a step: each ends with a separate run's weights, bitwise
    (fp32, CPU). Each trainee's own accumulate() advanced one shared counter twice a batch."""
    base = [f"data.root={shapes_root}", "train.grad_accum=2", "train.max_steps=1",
            "train.epochs=1", "data.max_val_images=2", *QUIET_EVAL]  # fmt: skip
    points = {"plain": list(NO_KD), "logit": ["distill.feature.kind=null", "distill.box.weight=0"]}
    cfgs = [
        load_config(SMOKE, [*base, *extra, f"output.dir={tmp_path / 'group' / name}"])
        for name, extra in points.items()
    ]
    train_group(cfgs, "student", tmp_path / "group")
    for name, extra in points.items():
        alone = tmp_path / "alone" / name
        metrics = train(load_config(SMOKE, [*base, *extra, f"output.dir={alone}"]))
        assert metrics["step"] == 1
        assert_same_weights(tmp_path / "group" / name / "student.pt", alone / "student.pt")


def test_lockstep_refuses_fp16_and_the_sweep_runs_it_in_sequence() -> None:
    """fp16 trainees in lockstep would share Accelerate's one grad scaler (one trainee's
    overflow shrinks the other's scale)."""
    cfgs = [
        load_config(SMOKE, ["train.mixed_precision=fp16", f"output.dir=runs/{name}"])
        for name in ("a", "b")
    ]
    with pytest.raises(ConfigError, match=r"lockstep .*train\.mixed_precision=fp16"):
        check_lockstep(cfgs)
    check_lockstep(cfgs[:1])  # one model alone is not lockstep
    grid = parse_grid(["distill.logit.temperature=1,2"])
    assert is_lockstep(grid, cfgs[0].train) is False
    assert is_lockstep(grid, load_config(SMOKE).train) is True


def test_feature_kd_sums_levels_and_the_shapes_recipe_keeps_its_loss() -> None:
    """The levels' losses are summed by default (a paper's weight means the same here); the
    shapes recipe's weight was divided by its 5 levels, so its weighted loss is the one that
    30 x the mean over the levels gave before."""
    assert load_config(None).distill.feature.level_reduction == "sum"
    recipe = load_config(REPO / "configs" / "shapes" / "distill.yaml").distill.feature
    assert recipe.level_reduction == "sum" and len(recipe.levels) == 5
    gen = torch.Generator().manual_seed(0)
    s = {
        lv: torch.randn(2, 8, 32 >> i, 32 >> i, generator=gen) for i, lv in enumerate(recipe.levels)
    }
    t = {lv: torch.randn(x.shape, generator=gen) for lv, x in s.items()}
    now = recipe.cwd.weight * feature_kd_loss(recipe.kind, s, t, recipe.levels, tau=recipe.cwd.tau)
    before = 30.0 * feature_kd_loss(
        recipe.kind, s, t, recipe.levels, tau=recipe.cwd.tau, reduction="mean"
    )
    torch.testing.assert_close(now, before)
    with pytest.raises(ConfigError, match=r"distill\.feature\.level_reduction in --set .*'max'"):
        load_config(None, ["distill.feature.level_reduction=max"])


def project_imports(path: Path) -> set[str]:
    """The modules of this project that a source file imports (at any depth of its code)."""
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}  # fmt: skip
    names |= {node.module for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}  # fmt: skip
    return {n for n in names if n.split(".")[0] in ("distill", "students", "teachers")}


def test_the_config_is_a_leaf_and_the_registries_declare_their_names() -> None:
    """distill.config imports no registry (only its own modules and distill.fileio, which
    imports nothing of the project); the names it checks come from the registries (students,
    teachers, the KD terms), which declare them."""
    for path in (REPO / "distill" / "config").glob("*.py"):
        imported = {n for n in project_imports(path) if not n.startswith("distill.config")}
        assert imported <= {"distill.fileio"}, path
    assert project_imports(REPO / "distill" / "fileio.py") == set()
    import students
    import teachers
    from distill.config import choices
    from distill.kd.feature import LEVEL_REDUCTIONS

    assert choices()["student.arch"] == tuple(students.STUDENTS)
    assert choices()["teacher.arch"] == tuple(teachers.TEACHERS)
    assert choices()["distill.feature.level_reduction"] == LEVEL_REDUCTIONS


class HostSyncs(TorchDispatchMode):
    """Counts ``aten::_local_scalar_dense``, the op behind ``.item()``, ``float()`` and
    ``bool()`` of a tensor (on a GPU each one waits for the device), per ``bucket``."""

    def __init__(self) -> None:
        super().__init__()
        self.bucket = "ours"
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts[self.bucket] += 1
        return func(*args, **(kwargs or {}))

    def counting_as(self, bucket: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.bucket = bucket
            try:
                return fn(*args, **kwargs)
            finally:
                self.bucket = "ours"

        return counted


def test_a_kd_step_that_does_not_log_syncs_with_the_host_at_most_twice(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted over whole loop iterations (batch to batch: transform, teacher, student step,
    bookkeeping) of a distillation run with every KD term, at step 2 (step 1 logs).

    Two parts of torchvision count apart: the training transform draws each image's size from
    a CPU tensor (``torch_choice``, no device sync on a GPU either), and RetinaNet's focal loss
    divides by ``max(1, num_foreground)`` of each image (a device sync on a GPU, torchvision's
    code, in the plain student's step too). The loader runs in a worker, as in real runs."""
    counter, at_batch = HostSyncs(), []
    trace_batch = distill.engine.loop._trace_batch

    def traced(*args: Any) -> None:
        at_batch.append(dict(counter.counts))
        trace_batch(*args)

    def transform(cfg: Config) -> Any:
        module = build_transform(cfg)
        module.forward = counter.counting_as("transform", module.forward)  # type: ignore[method-assign]
        return module

    monkeypatch.setattr(distill.engine.loop, "_trace_batch", traced)
    monkeypatch.setattr(distill.engine.setup, "build_transform", transform)
    monkeypatch.setattr(
        distill.engine.step,
        "detection_loss",
        counter.counting_as("focal", distill.engine.step.detection_loss),
    )
    out = tmp_path / "kd"
    overrides = [*smoke_overrides(shapes_root, out), "train.log_every=100", "train.max_steps=3",
                 "data.num_workers=1", "data.max_val_images=2", *QUIET_EVAL]  # fmt: skip
    cfg = load_config(SMOKE, overrides)
    assert cfg.distill.feature.cwd.weight and cfg.distill.logit.weight and cfg.distill.box.weight
    with counter:
        train(cfg)
    assert len(at_batch) == 3  # the loop stops after step 3, before a 4th batch
    per_step = [Counter(b) - Counter(a) for a, b in itertools.pairwise(at_batch)]
    assert per_step[0]["ours"] > per_step[1]["ours"]  # step 1 logs: the counter sees the reads
    for counts in per_step[1:]:
        assert counts["ours"] <= 2, per_step
        assert counts["transform"] == counts["focal"] == 4, per_step  # one per image


# ---------------------------------------------------------------------------------------------
# Two processes: run as ``torchrun --nproc_per_node 2 -m tests.test_gpu_path OUT SHAPES``
# ---------------------------------------------------------------------------------------------

IMAGES = 4  # one batch of 4 on one process, or 2 on each of two


def kd_gradient(shapes_root: Path, out: Path) -> None:
    """The KD terms (averaged over processes) and the student's gradient (averaged by DDP) of
    the first ``IMAGES`` training images, split over the processes; rank 0 saves them to
    ``out/grad.world{W}.pt``."""
    cfg = load_config(SMOKE, [*smoke_overrides(shapes_root, out), "data.hflip=0"])
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    dataset = build_dataset(cfg.data, "train")
    per_process = IMAGES // world
    images, targets = collate(
        [dataset[i] for i in range(rank * per_process, (rank + 1) * per_process)]
    )
    set_seed(cfg.train.seed)
    module, teacher = build_models(cfg, "student", dataset.num_categories + 1)
    assert teacher is not None
    module.detector.freeze_backbone_norm()  # BatchNorm on batch statistics would differ by design
    module = accelerator.prepare(module)
    teacher.to(accelerator.device)
    transform = build_transform(cfg).to(accelerator.device)
    image_list, targets = transform([i.to(accelerator.device) for i in images], targets)
    unwrapped = accelerator.unwrap_model(module)
    teacher_out = teacher_forward(accelerator, teacher, image_list, [unwrapped.terms])
    total, logs = step_losses(
        module, unwrapped.detector, unwrapped.terms, image_list, targets, teacher_out,
        kd_scale(cfg.distill, 10, 0), mean_over_processes(accelerator),
    )  # fmt: skip
    accelerator.backward(total)
    kd = {
        k.removeprefix("kd/"): v for k, v in logs.items() if k.startswith("kd/") and k != "kd/scale"
    }
    terms = {name: accelerator.reduce(value, "mean") for name, value in kd.items()}
    params = accelerator.unwrap_model(module).named_parameters()
    grads = {name: p.grad.clone() for name, p in params if p.grad is not None}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"world": world, "terms": terms, "grads": grads}, out / f"grad.world{world}.pt")


def sweep_report(shapes_root: Path, out: Path) -> None:
    """A sweep into ``out/sweep.rank{R}`` with its training replaced (each point just writes a
    metrics.json): only the main process may write the report."""
    rank = PartialState().process_index

    def fake_train(cfg: Config, *args: Any, **kwargs: Any) -> dict[str, Any]:
        write_metrics(cfg)
        return {}

    def fake_group(cfgs: list[Config], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return [fake_train(c) for c in cfgs]

    # the sweep calls the names it imported from distill.engine.loop
    distill.experiments.sweep.train, distill.experiments.sweep.train_group = fake_train, fake_group
    sweep_args = [f"data.root={shapes_root}", f"output.dir={out / f'sweep.rank{rank}'}"]
    sweep_cfg = load_config(SMOKE, sweep_args)
    grid = ["distill.logit.temperature=1,2"]
    sweep_command(sweep_cfg, grid, config_path=SMOKE, overrides=sweep_args)
    PartialState().wait_for_everyone()


def write_metrics(cfg: Config) -> None:
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"map": 0.1, "ap50": 0.2, "aps": 0.0, "apm": 0.0, "apl": 0.0}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_two_processes_with_batch_b_give_the_kd_terms_and_gradient_of_one_with_2b(
    shapes_root: Path, tmp_path: Path
) -> None:
    """1 process with batch 4 against 2 gloo processes with batch 2 on the same images: the
    KD terms (the soft-label and box terms divide by anchor-weight sums reduced across the
    processes) and the gradient of the total agree within 1e-5. And only the main process
    writes the sweep's report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "tests.test_gpu_path", str(tmp_path),
           str(shapes_root)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    kd_gradient(shapes_root, tmp_path / "one")  # meanwhile, the same in this process
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output.decode()[-3000:]
    one = torch.load(tmp_path / "one" / "grad.world1.pt", weights_only=True)
    two = torch.load(tmp_path / "grad.world2.pt", weights_only=True)
    assert (one["world"], two["world"]) == (1, 2)
    assert one["terms"].keys() == two["terms"].keys() == {"feature", "logit", "box"}
    for name, value in one["terms"].items():
        torch.testing.assert_close(two["terms"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    for output_file in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / "sweep.rank0" / output_file).is_file()
        assert not (tmp_path / "sweep.rank1" / output_file).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    kd_gradient(Path(sys.argv[2]), Path(sys.argv[1]))
    sweep_report(Path(sys.argv[2]), Path(sys.argv[1]))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
