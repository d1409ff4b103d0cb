"""Regenerate the result tables in README.md and docs/*.md from ``results/*.json``.

    python scripts/readme_tables.py          # rewrite README.md and docs/*.md in place
    python scripts/readme_tables.py --check  # exit 1 if one of them is out of date

Each table sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers, where NAME is
the results file's stem (``bench_speed``), in whichever of those files holds them (each results
file in one place). The table is the one the benchmark script prints, followed by the command,
machine and date recorded in the JSON; none is typed by hand. ``demo*.json`` files are written by
``distill demo --record FILE`` (one per kind of host) and formatted by the demo;
``NAME-HOST.json`` is ``scripts/NAME.py``'s on another kind of host.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from distill.fileio import import_script

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"


def documents() -> list[Path]:
    """The files that may hold generated tables: README.md and docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _script(name: str) -> ModuleType:
    """Import ``scripts/NAME.py`` (scripts/ is not a package)."""
    return import_script(REPO / "scripts" / f"{name}.py")


def _formatter(name: str) -> ModuleType:
    """What formats results file ``name``: ``distill.experiments.demo`` for ``demo*``, else its
    script (``bench_x-avx2`` is ``bench_x.py``'s, run on another kind of host)."""
    if name.startswith("demo"):
        return importlib.import_module("distill.experiments.demo")
    return _script(name.partition("-")[0])


def section(name: str, result: dict[str, Any]) -> str:
    """The markdown between the markers for results file ``name``."""
    table = _formatter(name).format_table(result)
    notes = NOTES[name](result) if name in NOTES else ""
    return (
        f"{table}\n\n{notes}"
        f"Command: `{result.get('command', 'python scripts/' + name + '.py')}` — "
        f"{machine_text(result.get('machine', {}))}, {result.get('date', '?')}.\n"
    )


def machine_text(machine: dict[str, Any]) -> str:
    """The machine as its JSON records it: only the fields present, each under its own name
    (older results recorded torch's thread count, not the core count)."""
    parts = [machine.get("cpu")]
    if machine.get("cores") is not None:
        usable = machine.get("cores_usable")
        notes = [f"{usable} usable"] if usable not in (None, machine["cores"]) else []
        physical = machine.get("physical_cores")  # under the usable cores: SMT threads share one
        if physical is not None and physical < (usable or machine["cores"]):
            notes.append(f"on {physical} physical core{'s' if physical > 1 else ''}")
        extra = f" ({', '.join(notes)})" if notes else ""
        parts.append(f"{machine['cores']} cores{extra}")
    if machine.get("torch_threads") is not None:
        parts.append(f"{machine['torch_threads']} torch threads")
    parts += [machine.get("device"), f"torch {machine.get('torch', '?')}"]
    if "native_bf16" in machine:
        parts.append(f"native bf16: {'yes' if machine['native_bf16'] else 'no'}")
    if machine.get("onednn_max_cpu_isa"):  # an older instruction set imitated on this CPU
        parts.append(
            f"oneDNN capped at {machine['onednn_max_cpu_isa']}, PyTorch kernels "
            f"{machine.get('cpu_capability', '?')}"
        )
    return ", ".join(str(p) for p in parts if p)


def bench_speed_notes(result: dict[str, Any]) -> str:
    """What the speed JSON says about bf16 on its host and about the lockstep bound, from its
    own fields (the speed prose of docs/results.md is this text, never typed by hand)."""
    lines = []
    native = result.get("machine", {}).get("native_bf16")
    if "bf16" in result and "fp32" in result:
        fp32, bf16 = result["fp32"]["median_ms"], result["bf16"]["median_ms"]
        status = {None: "whether it was native is not recorded in this JSON"}.get(
            native, "native" if native else "emulated"
        )
        lines.append(
            f"bf16 on this host: {status}; the teacher forward took {bf16['teacher_forward']:.0f} "
            f"ms in bf16 against {fp32['teacher_forward']:.0f} ms in fp32, a student KD step "
            f"{bf16['student_kd_step']:.0f} against {fp32['student_kd_step']:.0f} ms."
        )
    for p in ("fp32", "bf16"):
        if p in result:
            ms = result[p]["median_ms"]
            lines.append(
                f"{p}: shared work T = transform + teacher forward = "
                f"{ms['transform'] + ms['teacher_forward']:.0f} ms, per-student work S = "
                f"{ms['student_kd_step']:.0f} ms: K(T+S)/(T+KS) = "
                f"{result[p]['sweep_speedup_bound']:.2f}× for K = {result['sweep_k']}."
            )
    text = "".join(f"- {line}\n" for line in lines) + "\n" if lines else ""
    return text + deployment_table(result.get("deployment"))


def deployment_table(deployment: dict[str, Any] | None) -> str:
    """The deployed graph's latency and file sizes that bench_speed measured (``distill
    summary``'s deployment numbers), as a markdown table; "" for a JSON without them."""
    if not deployment:
        return ""
    rows = [
        f"Deployed graph (normalise, backbone + FPN + head, box decoding, NMS), CPU, batch 1, "
        f"{deployment['image_size']} px, {deployment['student']['threads']} threads, median "
        "after warm-up:\n",
        "| model | PyTorch ms | ONNX Runtime ms | weights MB | ONNX MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("teacher", "student"):
        d = deployment[name]
        rows.append(
            f"| {name} | {d['pytorch_ms']:.1f} | {d['onnxruntime_ms']:.1f} | "
            f"{d['weights_mb']:.1f} | {d['onnx_mb']:.1f} |"
        )
    r = deployment["ratio"]
    rows.append(
        f"| student / teacher | {r['pytorch_ms']:.3f} | {r['onnxruntime_ms']:.3f} | "
        f"{r['weights_mb']:.3f} | {r['onnx_mb']:.3f} |"
    )
    return "\n".join(rows) + "\n\n"


# Sentences generated from a results file's fields, after its table.
NOTES = {"bench_speed": bench_speed_notes}


def render(text: str) -> str:
    """``text`` with the section of every results file whose markers it holds regenerated."""
    for path in sorted((REPO / "results").glob("*.json")):
        name = path.stem
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text:
            continue
        if text.count(start) > 1:
            times = text.count(start)
            raise ValueError(f"{start} appears {times} times: a table goes in one place")
        body = section(name, json.loads(path.read_text()))
        before, _, rest = text.partition(start)
        _, _, after = rest.partition(end)
        text = f"{before}{start}\n{body}{end}{after}"
    return text


def placements(paths: list[Path]) -> dict[str, list[Path]]:
    """Each results file's stem -> the files in ``paths`` that hold its start marker."""
    return {
        result.stem: [p for p in paths if f"<!-- {result.stem}:start -->" in p.read_text()]
        for result in sorted((REPO / "results").glob("*.json"))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that README.md and docs/ are current"
    )
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        old = path.read_text()
        new = render(old)
        if new == old:
            continue
        stale.append(path.relative_to(REPO))
        if not args.check:
            path.write_text(new)
    if args.check and stale:
        names = ", ".join(str(p) for p in stale)
        print(f"tables out of date in {names}: run python scripts/readme_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
