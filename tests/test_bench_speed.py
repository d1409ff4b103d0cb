"""scripts/bench_speed.py: the ratios from hand-made timings, and a --quick run of the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO, load_script

SCRIPT = REPO / "scripts" / "bench_speed.py"


SAMPLES = {  # medians: transform 2, teacher 100, plain 50, student KD 60, KD 165, sweep 400
    "transform": [2.0, 2.0, 9.0],
    "teacher_forward": [100.0, 90.0, 300.0],
    "plain_step": [50.0, 50.0, 51.0],
    "student_kd_step": [60.0, 1.0, 70.0],
    "kd_step": [165.0, 165.0, 165.0],
    "sweep_step": [400.0, 380.0, 420.0],
}
LOADER = [
    {"first_batch_ms": 200.0, "images_per_s": 480.0, "images_per_s_with_startup": 400.0},
    {"first_batch_ms": 100.0, "images_per_s": 500.0, "images_per_s_with_startup": 420.0},
    {"first_batch_ms": 300.0, "images_per_s": 520.0, "images_per_s_with_startup": 440.0},
]


def load_bench_speed() -> ModuleType:
    return load_script("bench_speed")


def test_ratios_from_medians() -> None:
    bench = load_bench_speed()
    settings = bench.parse_args(["--batch", "8", "--sweep-k", "4"])
    result = bench.summarize(SAMPLES, LOADER, settings)
    assert result["kd_step_ratio"] == pytest.approx(165 / (50 + 100))
    assert result["sweep_step_ratio"] == pytest.approx(400 / (2 + 100 + 4 * 60))
    assert result["sweep_speedup"] == pytest.approx(4 * 165 / 400)
    assert result["kd_images_per_s"] == pytest.approx(8 / 0.165)
    assert result["loader_images_per_s"] == 500.0
    assert result["loader_over_kd"] == pytest.approx(500 / (8 / 0.165))
    assert result["loader_first_batch_ms"] == 200.0
    assert result["median_ms"]["teacher_forward"] == 100.0
    assert result["sweep_speedup_bound"] == pytest.approx(4 * (102 + 60) / (102 + 4 * 60))
    # per iteration: 165 / 150, 165 / 140, 165 / 351
    assert result["paired"]["kd_step_ratio"]["median"] == pytest.approx(1.1)

    assert bench.goal_met("sweep_speedup", 1.7) and not bench.goal_met("sweep_speedup", 1.69)
    assert bench.goal_met("kd_step_ratio", 1.05) and not bench.goal_met("kd_step_ratio", 1.06)
    full = {
        "sweep_k": 4,
        "fp32": {**result, "skipped_steps": {}},
        "bf16": {**result, "skipped_steps": {"plain": 1}},
    }
    table = bench.format_table(full)
    assert table.splitlines()[0] == "| metric | fp32 | bf16 | goal | met? |"
    assert (
        "| KD step / (plain step + teacher fwd) | 1.100 | 1.100 | ≤ 1.05 | fp32 no / bf16 no |"
        in (table)
    )
    assert "bf16: skipped (non-finite) steps per model: {'plain': 1}" in table


def test_quick_run_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # one torch thread: the smoke run stays fast on a machine shared with other jobs
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--precisions", "fp32,bf16"]
    cmd += ["--data", str(tmp_path / "shapes"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| metric | fp32 | bf16 | goal | met? |" in proc.stdout

    result = json.loads(out.read_text())
    for key in ("machine", "date", "command", "iterations", "warmup", "fp32", "bf16"):
        assert key in result
    assert result["iterations"] == 2 and result["image_size"] == 64
    assert result["machine"]["torch_threads"] == 1
    assert {"cpu", "cores", "torch", "device"} <= set(result["machine"])
    assert "--quick" in result["command"]
    for precision in ("fp32", "bf16"):
        r = result[precision]
        for key in (
            "kd_step_ratio",
            "sweep_step_ratio",
            "sweep_speedup",
            "loader_images_per_s",
            "kd_images_per_s",
        ):
            assert math.isfinite(r[key]) and r[key] > 0, (precision, key, r[key])
        assert set(r["median_ms"]) == {
            "transform",
            "teacher_forward",
            "plain_step",
            "student_kd_step",
            "kd_step",
            "sweep_step",
        }
        assert all(len(v) == 2 for v in r["samples_ms"].values())
        assert all(math.isfinite(v) and v > 0 for v in r["median_ms"].values())


def test_bf16_is_measured_only_where_native_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_bench_speed()
    monkeypatch.setattr(bench, "native_bf16", lambda: False)
    assert bench.parse_args(["--quick"]).precisions == ("fp32",)
    assert bench.parse_args(["--precisions", "fp32,bf16"]).precisions == ("fp32", "bf16")
    monkeypatch.setattr(bench, "native_bf16", lambda: True)
    assert bench.parse_args(["--quick"]).precisions == ("fp32", "bf16")
    with pytest.raises(SystemExit):
        bench.parse_args(["--precisions", "fp16"])
    fp32 = bench.summarize(SAMPLES, LOADER, bench.parse_args(["--batch", "8", "--sweep-k", "4"]))
    result = {"sweep_k": 4, "fp32": fp32, "not_measured": {"bf16": bench.NOT_NATIVE}}
    table = bench.format_table(result)
    assert table.splitlines()[0] == "| metric | fp32 | goal | met? |"
    assert "bf16: not measured (no native bf16 on this device" in table
