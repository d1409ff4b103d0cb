"""scripts/readme_tables.py renders what a results JSON records, and only that, into README.md and
docs/*.md; the committed tables are what it renders."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

from tests.conftest import REPO, load_script


def load_tables() -> ModuleType:
    return load_script("readme_tables")


def test_machine_line_names_each_recorded_field() -> None:
    tables = load_tables()
    full = {"cpu": "AMD EPYC", "cores": 4, "cores_usable": 2, "torch_threads": 2,
            "device": "cpu", "torch": "2.14.1", "native_bf16": False}  # fmt: skip
    assert tables.machine_text(full) == (
        "AMD EPYC, 4 cores (2 usable), 2 torch threads, cpu, torch 2.14.1, native bf16: no"
    )
    # an older result that recorded torch's thread count only: no core count is made up
    old = {"cpu": "Xeon", "torch_threads": 2, "device": "cpu", "torch": "2.14.1"}
    assert tables.machine_text(old) == "Xeon, 2 torch threads, cpu, torch 2.14.1"
    # usable cores that are SMT threads of fewer physical cores are named as such
    smt = {**old, "cores": 2, "physical_cores": 1}
    assert tables.machine_text(smt).startswith("Xeon, 2 cores (on 1 physical core), ")
    pinned = {**old, "cores": 64, "cores_usable": 2, "physical_cores": 1}
    assert tables.machine_text(pinned).startswith("Xeon, 64 cores (2 usable, on 1 physical core),")
    plain = {**old, "cores": 2, "cores_usable": 2, "physical_cores": 2}
    assert tables.machine_text(plain).startswith("Xeon, 2 cores, ")
    # an AVX2-only host imitated on a newer CPU says so
    capped = {**old, "native_bf16": False, "cpu_capability": "AVX2", "onednn_max_cpu_isa": "AVX2"}
    assert tables.machine_text(capped) == (
        "Xeon, 2 torch threads, cpu, torch 2.14.1, native bf16: no, oneDNN capped at AVX2, "
        "PyTorch kernels AVX2"
    )


def test_speed_notes_come_from_the_json() -> None:
    tables = load_tables()
    result = json.loads((REPO / "results" / "bench_speed.json").read_text())
    notes = tables.bench_speed_notes(result)
    native = result["machine"].get("native_bf16")
    expected = {None: "not recorded in this JSON", True: "native", False: "emulated"}[native]
    measured = [p for p in ("fp32", "bf16") if p in result]  # bf16 only where it was timed
    assert "fp32" in measured
    assert (expected in notes) == ("bf16" in measured)
    for p in measured:
        ms = result[p]["median_ms"]
        if "bf16" in measured:  # the line that compares the two precisions
            assert f"{ms['teacher_forward']:.0f} ms in {p}" in notes
        assert f"= {result[p]['sweep_speedup_bound']:.2f}× for K = {result['sweep_k']}" in notes
    both = {**result, "bf16": result.get("bf16", result["fp32"])}  # as a native-bf16 host writes
    recorded = {**both, "machine": {**result["machine"], "native_bf16": True}}
    assert "bf16 on this host: native;" in tables.bench_speed_notes(recorded)
    only_fp32 = {k: v for k, v in result.items() if k != "bf16"}
    assert "bf16 on this host" not in tables.bench_speed_notes(only_fp32)
    # and the document that holds the speed table holds exactly these lines
    (holder,) = tables.placements(tables.documents())["bench_speed"]
    assert notes in holder.read_text()


def test_committed_tables_are_generated_from_results() -> None:
    tables = load_tables()
    docs = tables.documents()
    assert REPO / "README.md" in docs and REPO / "docs" / "results.md" in docs
    for doc in docs:
        text = doc.read_text()
        assert tables.render(text) == text, f"{doc}: run python scripts/readme_tables.py"
    # every results file has its table in exactly one document (none lost, none twice)
    placed = tables.placements(docs)
    assert placed and {name: len(where) for name, where in placed.items()} == dict.fromkeys(
        placed, 1
    )
    assert tables.main(["--check"]) == 0


def test_a_stale_table_is_rewritten() -> None:
    tables = load_tables()
    (holder,) = tables.placements(tables.documents())["bench_kd"]
    text = holder.read_text()
    start, end = "<!-- bench_kd:start -->", "<!-- bench_kd:end -->"
    stale = text.replace(text[text.index(start) : text.index(end)], f"{start}\n| hand-typed |\n")
    assert stale != text and tables.render(stale) == text
    with pytest.raises(ValueError, match="a table goes in one place"):  # the same table twice
        tables.render(f"{start}\n{end}\n{start}\n{end}\n")
