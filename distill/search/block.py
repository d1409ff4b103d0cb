"""The ``search:`` block of a config file, and the space of a search: the block's entries with
the command line's ``--space`` entries over them, checked against the config.

A config file may hold, beside its run's sections, a block that ``distill search`` reads and a
run leaves out (``distill.config.load.TOOL_BLOCKS``: the file runs as the search's base):

    search:
      trials: 40                       # what the command line's --trials, --rungs, --seed set
      rungs: [250, 500, 1000]
      seed: 0
      space:
        distill.logit.temperature: 1..8                  # the --space text (module space)
        distill.logit.weight: 0.1..10:log
        distill.crosskd.cls_weight: [0, 3]               # a list: a choice
        distill.feature.kind: [cwd, fgd]
        distill.feature.fgd.tau: {low: 0.5, high: 64, log: true, when: {distill.feature.kind: fgd}}
        distill.feature.cwd.tau: {choices: [1, 4], when: {distill.feature.kind: [cwd]}}

The block is merged through ``_base_`` like a section (a file's own entries over its bases').
A ``--space`` entry replaces the block's entry for the same key.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import read_config
from distill.search.rungs import check_rungs
from distill.search.space import (
    SCALARS,
    Param,
    SearchError,
    Space,
    check_space,
    make_space,
    number,
    parse_space_item,
    parse_spec,
)

BLOCK = "search"
BLOCK_KEYS = ("space", "trials", "rungs", "seed")
ENTRY_KEYS = ("low", "high", "log", "choices", "when")  # an entry written as a mapping


@dataclass(frozen=True)
class SearchBlock:
    """A config file's ``search:`` block: its entries, and what it sets (None: not given)."""

    space: tuple[Param, ...] = ()
    trials: int | None = None
    rungs: tuple[int, ...] | None = None
    seed: int | None = None


def load_space(config: Path | None, overrides: Sequence[str], items: Sequence[str]) -> Space:
    """The space of ``distill search CONFIG --space ITEM ... --set OVERRIDE ...``: CONFIG's
    ``search.space`` with the ``--space`` entries over it, checked against CONFIG and the
    overrides before any compute."""
    block = read_search_block(config)
    params = merge_space(block.space, [parse_space_item(item) for item in items])
    if not params:
        raise SearchError(
            "nothing to search: give --space KEY=LOW..HIGH (or KEY=A|B) or a search.space block"
        )
    return check_space(make_space(params), config, overrides)


def merge_space(block: Sequence[Param], items: Sequence[Param]) -> list[Param]:
    """The block's entries, less those the command line gives again, then the command line's."""
    given = {param.key for param in items}
    return [*(param for param in block if param.key not in given), *items]


def read_search_block(config: Path | None) -> SearchBlock:
    """The ``search:`` block of config file ``config`` (merged over its bases'); empty where
    there is none. Unknown keys and wrong types are one-line errors naming the key."""
    if config is None:
        return SearchBlock()
    raw, files = read_config(Path(config))
    block = raw.get(BLOCK)
    where = f"{config}" if len(files) == 1 else f"{config} (with its bases)"
    if block is None:
        return SearchBlock()
    _known(block, BLOCK_KEYS, f"{BLOCK} in {where}")
    space = block.get("space") or {}
    if not isinstance(space, Mapping):
        raise SearchError(f"{BLOCK}.space in {where}: a mapping KEY: SPEC, got {space!r}")
    rungs = block.get("rungs")
    if rungs is not None:
        if not isinstance(rungs, list):
            raise SearchError(f"{BLOCK}.rungs in {where}: a list of steps, got {rungs!r}")
        rungs = check_rungs(rungs, f"{BLOCK}.rungs in {where}")
    return SearchBlock(
        space=tuple(
            parse_entry(str(key), spec, f"{BLOCK}.space.{key} in {where}")
            for key, spec in space.items()
        ),
        trials=_count(block, "trials", where, least=1),
        rungs=rungs,
        seed=_count(block, "seed", where, least=0),
    )


def parse_entry(key: str, spec: Any, source: str) -> Param:
    """One entry of ``search.space``: the ``--space`` text, a list (a choice) or a mapping of
    ``ENTRY_KEYS``."""
    if isinstance(spec, str):
        return parse_spec(key, spec, source)
    if isinstance(spec, list):
        return Param(key, choices=tuple(spec), source=source)
    if not isinstance(spec, Mapping):
        raise SearchError(
            f"{source}: give LOW..HIGH[:log], A|B|C, a list of choices or a mapping of "
            f"{', '.join(ENTRY_KEYS)}; got {spec!r}"
        )
    _known(spec, ENTRY_KEYS, source)
    when = _when(spec.get("when") or {}, source)
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or any(k in spec for k in ("low", "high", "log")):
            raise SearchError(f"{source}: choices is a list, and without low, high, log")
        return Param(key, choices=tuple(choices), when=when, source=source)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SearchError(f"{source}: log is true or false, got {log!r}")
    if "low" not in spec or "high" not in spec:
        raise SearchError(f"{source}: give low and high (or choices)")
    low, high = number(spec["low"], source), number(spec["high"], source)
    return Param(key, low, high, log, when=when, source=source)


def _when(when: Any, source: str) -> dict[str, tuple[Any, ...]]:
    """``{KEY: VALUE or [VALUES]}`` -> ``{KEY: (VALUES)}``."""
    if not isinstance(when, Mapping):
        raise SearchError(f"{source}: when is a mapping KEY: VALUE or [VALUES], got {when!r}")
    out = {}
    for key, values in when.items():
        values = tuple(values) if isinstance(values, list) else (values,)
        if not values or not all(isinstance(v, SCALARS) for v in values):
            raise SearchError(f"{source}: when.{key} is a value or a list of values: {values!r}")
        out[str(key)] = values
    return out


def _known(mapping: Any, keys: Sequence[str], source: str) -> None:
    """A mapping with no keys but ``keys``; else an error naming the closest."""
    if not isinstance(mapping, Mapping):
        raise SearchError(f"{source}: a mapping of {', '.join(keys)}, got {mapping!r}")
    for key in mapping:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(keys)}"
            raise SearchError(f"{source}: unknown key {key}; {hint}")


def _count(block: Mapping[str, Any], key: str, where: str, least: int) -> int | None:
    value = block.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise SearchError(f"{BLOCK}.{key} in {where}: expected an int, got {value!r}")
    if value is not None and value < least:
        raise SearchError(f"{BLOCK}.{key} in {where}: {value!r} must be at least {least}")
    return value
