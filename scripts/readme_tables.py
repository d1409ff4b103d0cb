"""Regenerate the README's result tables from ``results/*.json`` (never typed by hand).

    python scripts/readme_tables.py          # rewrite README.md in place
    python scripts/readme_tables.py --check  # exit 1 if README.md is out of date

Each table sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers, where NAME is
the results file's stem (``bench_speed``). The table is the one the benchmark script prints,
followed by the command, machine and date recorded in the JSON. ``demo*.json`` files are
written by ``distill demo --record FILE`` (one per kind of host) and formatted by the demo.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _script(name: str) -> ModuleType:
    """Import ``scripts/NAME.py`` (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _formatter(name: str) -> ModuleType:
    """What formats results file ``name``: ``distill.demo`` for ``demo*``, else its script."""
    if name.startswith("demo"):
        return importlib.import_module("distill.demo")
    return _script(name)


def section(name: str, result: dict[str, Any]) -> str:
    """The markdown between the markers for results file ``name``."""
    table = _formatter(name).format_table(result)
    machine = result.get("machine", {})
    where = ", ".join(
        str(v)
        for v in (machine.get("cpu"), f"{machine.get('cores')} cores", machine.get("device"))
        if v
    )
    return (
        f"{table}\n\n"
        f"Command: `{result.get('command', 'python scripts/' + name + '.py')}` — "
        f"{where}, torch {machine.get('torch', '?')}, {result.get('date', '?')}.\n"
    )


def render(readme: str) -> str:
    for path in sorted((REPO / "results").glob("*.json")):
        name = path.stem
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in readme:
            continue
        body = section(name, json.loads(path.read_text()))
        before, _, rest = readme.partition(start)
        _, _, after = rest.partition(end)
        readme = f"{before}{start}\n{body}{end}{after}"
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is current")
    args = parser.parse_args(argv)
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md tables are out of date: run python scripts/readme_tables.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
