"""The search space of ``distill search``: the config keys a search samples, over which values,
and under which choice of another key.

Each entry is one config key, written on the command line as ``--space KEY=SPEC``:

    distill.logit.temperature=1..8          a range, sampled uniformly
    distill.logit.weight=0.1..10:log        a range, sampled log-uniformly (LOW > 0)
    data.batch_size=4..16                   a range of ints: the key holds ints
    distill.feature.kind=cwd|fgd|mgd        a choice (values read as YAML: null, 3, 0.5, true, cwd)
    distill.feature.fgd.tau=0.5..64:log@distill.feature.kind=fgd
                                            sampled only where the condition holds

A range's values have the type of the key's: ``1..8`` samples floats for a float key
(``distill.logit.temperature``) and ints for an int key (``check_space`` settles it from the
config); ``:log`` on an int range samples every int in it, the small ones more often (Optuna's
``suggest_int(log=True)``). A condition ``@KEY=A|B`` names a choice of the same space and the
values it applies under; several (``@K1=a@K2=b``) must all hold; a key whose condition names a
conditional choice applies only where that choice was sampled. Command-line values cannot
hold ``@`` or ``|`` (a YAML ``search:`` block can: see ``distill.search.block``).

Sampling is Optuna's define-by-run API: ``space.suggest(trial)`` gives ``{key: value}`` of the
keys that apply, one Optuna parameter per config key (named by the key), so that a conditional
key is a parameter of its own, seen only in the trials of its branch, as TPE wants it.
``overrides(values)`` gives them as the ``--set`` items ``load_config`` takes.

    space = check_space(make_space([parse_space_item(t) for t in items]), config, overrides)
    values = space.suggest(trial)                  # {"distill.logit.weight": 0.83, ...}
    cfg = load_config(config, [*overrides, *space_overrides(values)])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import yaml

from distill.config import ConfigError, flatten, load_config, override, parse_value, value_text
from distill.config.schema import section_at

SCALARS = (str, int, float, bool, type(None))  # what a choice may hold (Optuna's categoricals)
SPACE_SYNTAX = "KEY=LOW..HIGH, KEY=LOW..HIGH:log or KEY=A|B|C, each with @KEY=A|B conditions"


class SearchError(ConfigError):
    """A search that cannot start: one line naming the entry (key and value) and where it was
    given. A ``ConfigError``, so that the command line prints it as one."""


@dataclass(frozen=True)
class Param:
    """One key of a search space: a range ``low..high`` (log-uniform with ``log``; ints when
    both bounds are ints) or a choice of ``choices``; sampled where ``when`` holds.

    key: the dotted config key, also the Optuna parameter's name
    when: {key of a choice of the space: the values this key is sampled under}; all must hold
    source: where it was declared (``--space TEXT``, ``search.space.KEY in FILE``), for errors
    """

    key: str
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = self.source or self.key
        if self.choices:
            odd = [v for v in self.choices if not isinstance(v, SCALARS)]
            if odd or self.low is not None or self.high is not None:
                got = odd[0] if odd else self.low
                raise SearchError(f"{where}: choices are null, numbers, words or booleans: {got!r}")
            if len({(type(v), v) for v in self.choices}) < len(self.choices):
                raise SearchError(f"{where}: a value is given twice in {self.text()}")
            if len(self.choices) < 2:
                raise SearchError(
                    f"{where}: a choice needs two values or more (for one, --set KEY=VALUE)"
                )
            return
        low, high = self.low, self.high
        if low is None or high is None:
            raise SearchError(f"{where}: give a range low..high or choices")
        if low == high:
            raise SearchError(f"{where}: the range {low!r}..{high!r} is empty")
        if low > high:
            raise SearchError(f"{where}: the range {low!r}..{high!r} is reversed (LOW..HIGH)")
        if self.log and low <= 0:
            raise SearchError(f"{where}: a log range must lie above 0, got {low!r}..{high!r}")

    @property
    def is_int(self) -> bool:
        return not self.choices and isinstance(self.low, int) and isinstance(self.high, int)

    def text(self) -> str:
        """The ``--space`` item of this entry (the study records the space so)."""
        if self.choices:
            spec = "|".join(value_text(v) for v in self.choices)
        else:
            spec = f"{self.low!r}..{self.high!r}" + (":log" if self.log else "")
        conditions = "".join(
            f"@{key}=" + "|".join(value_text(v) for v in values)
            for key, values in self.when.items()
        )
        return f"{self.key}={spec}{conditions}"

    def applies(self, values: Mapping[str, Any]) -> bool:
        """Whether this key is sampled beside ``values``, those sampled before it."""
        return all(key in values and values[key] in allowed for key, allowed in self.when.items())

    def suggest(self, trial: optuna.trial.BaseTrial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, self.choices)
        assert self.low is not None and self.high is not None  # __post_init__
        if self.is_int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class Space:
    """The entries of a search, each after the choices its conditions name (``make_space``)."""

    params: tuple[Param, ...]

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """{key: value} for the keys whose conditions hold, sampled by the trial's study."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.applies(values):
                values[param.key] = param.suggest(trial)
        return values

    def texts(self) -> list[str]:
        return [param.text() for param in self.params]


def space_overrides(values: Mapping[str, Any]) -> list[str]:
    """The ``--set`` items of a trial's values (``space.suggest``, ``study.best_params``) that
    ``load_config`` reads back as the same values (floats as repr, None as null)."""
    return [override(key, value) for key, value in values.items()]


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def parse_space_item(text: str) -> Param:
    """``--space KEY=SPEC[@KEY=A|B...]`` -> its ``Param`` (the syntax: the module's docstring)."""
    key, sep, spec = text.partition("=")
    source = f"--space {text}"
    if not sep or not key.strip() or not spec.strip():
        raise SearchError(f"{source}: must look like {SPACE_SYNTAX}")
    return parse_spec(key.strip(), spec, source)


def parse_spec(key: str, text: str, source: str) -> Param:
    """``LOW..HIGH[:log]`` or ``A|B|C``, then ``@KEY=A|B`` conditions, of config key ``key``."""
    spec, *conditions = text.split("@")
    when: dict[str, tuple[Any, ...]] = {}
    for condition in conditions:
        on, sep, values = condition.partition("=")
        if not sep or not on.strip() or not values.strip():
            raise SearchError(f"{source}: a condition must look like @KEY=A|B, got @{condition}")
        if on.strip() in when:
            raise SearchError(f"{source}: two conditions on {on.strip()}")
        when[on.strip()] = _values(values, source)
    spec = spec.strip()
    if "|" in spec:
        return Param(key, choices=_values(spec, source), when=when, source=source)
    body, log = (spec.removesuffix(":log"), True) if spec.endswith(":log") else (spec, False)
    low, sep, high = body.partition("..")
    if not sep:
        raise SearchError(f"{source}: {spec!r} is no range LOW..HIGH[:log] nor choice A|B|C")
    return Param(key, number(low, source), number(high, source), log, when=when, source=source)


def _values(text: str, source: str) -> tuple[Any, ...]:
    """``A|B|C`` -> its values, each read as YAML (``null``, ``3``, ``true``, ``cwd``)."""
    parts = [part.strip() for part in text.split("|")]
    if not all(parts):
        raise SearchError(f"{source}: an empty value in {text!r} (null is written null)")
    try:
        return tuple(parse_value(part) for part in parts)
    except yaml.YAMLError as err:
        raise SearchError(f"{source}: cannot read {text!r}: {err}") from None


def number(value: Any, source: str) -> int | float:
    """A range's bound: an int or float, as a number or its text (``3``, ``0.5``, ``1e-4``)."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                value = kind(value.strip())
                break
            except ValueError:
                continue
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SearchError(f"{source}: a range's bound must be a finite number, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------


def make_space(params: Sequence[Param]) -> Space:
    """The space of ``params``: each key once, each condition on a choice of the space and on
    its values, ordered so that a key comes after the choices its conditions name."""
    by_key: dict[str, Param] = {}
    for param in params:
        if param.key in by_key:
            also = by_key[param.key].source
            raise SearchError(f"{param.source}: {param.key} is given twice (also {also})")
        by_key[param.key] = param
    for param in params:
        for key, values in param.when.items():
            choice = by_key.get(key)
            if choice is None or not choice.choices:
                raise SearchError(
                    f"{param.source}: its condition names {key}, which is no choice of the "
                    f"space (give {key}=A|B|...)"
                )
            odd = [v for v in values if v not in choice.choices]
            if odd:
                raise SearchError(
                    f"{param.source}: {key}={value_text(odd[0])} is not one of its choices "
                    f"({choice.text()})"
                )
    return Space(_ordered(params))


def _ordered(params: Sequence[Param]) -> tuple[Param, ...]:
    """``params`` in the given order, except that a key waits for the choices it depends on."""
    done: list[Param] = []
    pending = list(params)
    while pending:
        placed = {param.key for param in done}
        ready = [param for param in pending if set(param.when) <= placed]
        if not ready:
            keys = ", ".join(param.key for param in pending)
            raise SearchError(f"{pending[0].source}: the conditions of {keys} form a cycle")
        done.append(ready[0])
        pending.remove(ready[0])
    return tuple(done)


def check_space(space: Space, config: Path | None, overrides: Sequence[str] = ()) -> Space:
    """``space`` with every value it can take checked by the config loader, before any compute:
    each choice, each range's two bounds, set over CONFIG and its ``--set`` overrides (and the
    first value of each condition): an unknown key, a wrong type, a name or bound the config
    refuses is a one-line error naming the entry. Ranges come back with the type of their key's
    values (``1..8`` of a float key is the float range ``1.0..8.0``)."""
    load_config(config, overrides)  # the base's own errors first, as the loader words them
    return Space(tuple(_checked(param, config, overrides) for param in space.params))


def _checked(param: Param, config: Path | None, overrides: Sequence[str]) -> Param:
    """``param`` with its values as the config reads them, where it reads the same values."""
    branch = [*overrides, *(override(key, values[0]) for key, values in param.when.items())]
    if param.choices:
        read = [_as_read(param, value, config, branch) for value in param.choices]
        return replace(param, choices=tuple(map(_same, read, param.choices)))
    low, high = (_as_read(param, value, config, branch) for value in (param.low, param.high))
    return replace(param, low=_same(low, param.low), high=_same(high, param.high))


def _same(read: Any, given: Any) -> Any:
    """``read`` where it is ``given`` in the key's type (3 -> 3.0 for a float key), else
    ``given`` (a null that the config reads as a default stays null)."""
    return read if read == given else given


def _as_read(param: Param, value: Any, config: Path | None, overrides: list[str]) -> Any:
    """``value`` of ``param.key`` as ``load_config`` reads it over CONFIG and ``overrides``."""
    try:
        cfg = load_config(config, [*overrides, override(param.key, value)])
    except ConfigError as err:
        raise SearchError(f"{param.source}: {err}") from None
    flat = flatten(cfg)
    if param.key not in flat:  # an old name, which the loader read at its new place
        at, _, name = param.key.rpartition(".")
        section = section_at(at)
        now = section.renamed.get(name) if section is not None else None
        where = f"{at}.{now}" if now else "a key that is read elsewhere now"
        raise SearchError(
            f"{param.source}: {param.key} is the old name of {where}: search that key"
        )
    return flat[param.key]
