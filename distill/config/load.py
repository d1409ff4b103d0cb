"""Reading a YAML config into the frozen dataclasses of ``distill.config.schema``: checking,
inheriting (``_base_``), ``key.path=value`` overrides, writing it back.

Files are read with ``yaml.safe_load`` only; unknown keys and wrong types are errors that name
the key, the file and (for unknown keys) the closest known key. A file may inherit from others,
as in mmdetection: ``_base_: ../shapes/distill.yaml`` (or a list, merged in order; paths are
relative to the file that names them), then its own keys over theirs (see ``read_config``).

    cfg = load_config("configs/shapes/distill.yaml", ["distill.logit.temperature=2"])
    cfg.distill.logit.temperature  # 2.0
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from distill.config.schema import (
    ANCHOR_PRESETS,
    AT_MOST,
    INIT_FROM_TEACHER_PARTS,
    LEVEL_NAMES,
    NON_NEGATIVE,
    POSITIVE,
    Config,
    ConfigError,
    Extensible,
    choices,
    registered_sections,
    resolve_defaults,
    section_at,
    walk_sections,
)
from distill.fileio import write_text_atomic

# --------------------------------------------------------------------------------------------
# Reading, checking, overriding, writing
# --------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)
T = TypeVar("T")
# a number in exponent notation without a dot (1e-4, 5E6): a float to YAML 1.2 and to Python,
# a string to PyYAML (YAML 1.1); read as the float the user meant where a float is expected
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
BASE_KEY = "_base_"  # the files a config file inherits from; not a config field
# Top-level blocks that a tool reads from the file, not a run: ``distill search`` its
# ``search:`` block (distill.search.space). ``read_config`` keeps them (merged through
# ``_base_`` like a section) and a run leaves them out, so a search file runs as its base config.
TOOL_BLOCKS = ("search",)


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (``None``: all defaults), apply ``key.path=value`` overrides, check it."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        raw, files = read_config(Path(path))
        if len(files) > 1:  # each file was checked alone: errors left come of the merge
            source = f"{path} (with its bases {', '.join(map(str, files[:-1]))})"
    cfg = _build(raw, source)  # the file (over its bases): its errors name the file
    sources = [source]
    for item in overrides:
        _apply_override(raw, item)
        cfg = _build(raw, f"--set {item}")  # an override's errors name the override
        sources.append(f"--set {item}")
    # a pair of keys, checked once all overrides are in (they may set one key each)
    if (cfg.data.min_size is None) != (cfg.data.max_size is None):
        given, other = (
            ("min_size", "max_size") if cfg.data.max_size is None else ("max_size", "min_size")
        )
        raise ConfigError(
            f"data.{given} in {' / '.join(sources)}: give data.{other} too (torchvision's resize "
            "needs both; neither: data.image_size)"
        )
    return cfg


def _build(raw: dict[str, Any], source: str) -> Config:
    run = {key: value for key, value in raw.items() if key not in TOOL_BLOCKS}
    cfg = resolve_defaults(from_dict(Config, run, source))
    check_values(cfg, source)
    return _named_anchors(cfg, raw.get("anchors") or {}, source)


def _named_anchors(cfg: Config, raw_anchors: Mapping[str, Any], source: str) -> Config:
    """Fill in the numbers of ``anchors.name``; numbers given beside the name must be its own
    (a resolved config.yaml holds both), anything else is an error naming the key."""
    if cfg.anchors.name is None:
        return cfg
    preset = ANCHOR_PRESETS[cfg.anchors.name]
    for key in ("sizes", "scales", "aspect_ratios"):
        given, wanted = getattr(cfg.anchors, key), getattr(preset, key)
        if key in raw_anchors and given != wanted:
            raise ConfigError(
                f"anchors.{key} in {source}: {list(given)} contradicts anchors.name "
                f"{cfg.anchors.name} ({list(wanted)}); give the name or the numbers, not both"
            )
    return dataclasses.replace(cfg, anchors=preset)


def check_values(cfg: Config, source: str) -> None:
    """Names and ranges that types alone do not check; errors name the key and the source."""
    flat = flatten(cfg)
    for key, allowed in choices().items():
        if flat[key] not in allowed:
            names = " | ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{key} in {source}: {flat[key]!r} is not one of {names}")
    sections = list(walk_sections(cfg))  # what the registered sections declare
    positive, non_negative = list(POSITIVE), list(NON_NEGATIVE)
    for at, section, _ in sections:
        positive += [f"{at}.{key}" for key in section.positive]
        non_negative += [f"{at}.{key}" for key in section.non_negative]
    for keys, low, words in ((positive, False, "> 0"), (non_negative, True, ">= 0")):
        for key in keys:
            value = flat[key]
            if value is not None and not (value >= 0 if low else value > 0):
                raise ConfigError(f"{key} in {source}: {value!r} must be {words}")
    for key, most in AT_MOST.items():
        if flat[key] is not None and flat[key] > most:
            raise ConfigError(f"{key} in {source}: {flat[key]!r} must be at most {most}")
    if not 0 <= cfg.data.hflip <= 1:  # also NaN
        raise ConfigError(f"data.hflip in {source}: {cfg.data.hflip!r} must be between 0 and 1")
    if not 0 < cfg.eval.nms_threshold <= 1:
        raise ConfigError(
            f"eval.nms_threshold in {source}: {cfg.eval.nms_threshold!r} must be in (0, 1]"
        )
    parts = cfg.student.init_from_teacher
    if any(part not in INIT_FROM_TEACHER_PARTS for part in parts) or len(set(parts)) < len(parts):
        raise ConfigError(
            f"student.init_from_teacher in {source}: {list(parts)} must be a list of distinct "
            f"names from {', '.join(INIT_FROM_TEACHER_PARTS)}"
        )
    if parts and cfg.student.weights:
        raise ConfigError(
            f"student.init_from_teacher in {source}: {list(parts)} would overwrite the "
            f"checkpoint student.weights {cfg.student.weights}; give one of the two"
        )
    if len(cfg.anchors.sizes) != len(LEVEL_NAMES):
        raise ConfigError(
            f"anchors.sizes in {source}: one base size per level {', '.join(LEVEL_NAMES)}, "
            f"got {list(cfg.anchors.sizes)}"
        )
    for _, section, value in sections:
        if section.check is not None:
            section.check(value, cfg, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the
    last one silently: a second ``train:`` section would drop the first)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """``yaml.safe_load`` a file that must hold a mapping; errors name the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # safe_load, unique keys
    except yaml.YAMLError as err:  # includes Python tags, which safe_load refuses
        raise ConfigError(f"cannot parse {path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"cannot read {path}: not a text (UTF-8) file ({err.reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def read_config(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """The mapping of config file ``path`` merged over the files it inherits from, and the files
    read: its bases first (each once), ``path`` last.

    ``_base_: FILE`` or ``_base_: [FILE, ...]``, relative to the file that names them: the bases,
    each merged over its own bases, are merged in order, then the file's own keys over them.
    Mappings merge key by key (the later file's keys win); anything else, lists included, is
    replaced whole. Every file is also checked on its own, so that a bad key is reported in the
    file that holds it; a cycle or a missing base is an error naming the files.
    """
    return _read_inheriting(path, ())


def _read_inheriting(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], list[Path]]:
    """``read_config`` of ``path``, reached through the files in ``chain`` (the cycle check)."""
    own = read_yaml_mapping(path)
    bases = own.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"{BASE_KEY} in {path}: expected a path or a list of paths (relative to {path.parent}),"
            f" got {type(bases).__name__} {bases!r}"
        )
    chain = (*chain, path)
    merged: dict[str, Any] = {}
    files: list[Path] = []
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / base))
        seen = [p.resolve() for p in chain]
        if base_path.resolve() in seen:
            cycle = [*chain[seen.index(base_path.resolve()) :], base_path]
            raise ConfigError(
                f"{BASE_KEY} in {path}: config files inherit in a cycle: "
                + " -> ".join(map(str, cycle))
            )
        if not base_path.is_file():
            raise ConfigError(f"{BASE_KEY} {base!r} in {path}: config file not found: {base_path}")
        raw, read = _read_inheriting(base_path, chain)
        merged = _merge(merged, raw)
        files += [f for f in read if f not in files]
    own = upgrade(own, merged, str(path))  # in today's keys, over what its bases say
    _build(own, str(path))  # the file alone: a bad key is reported in the file that holds it
    return _merge(merged, own), [*files, path]


def upgrade(
    raw: Mapping[str, Any], under: Mapping[str, Any], source: str, prefix: str = ""
) -> dict[str, Any]:
    """One source's raw config (a file's own keys, an override) in today's keys, before it is
    merged over ``under`` (the raw config of the sources before it): each registered section's
    old keys are read at their place now (``Section.renamed``, then ``Section.upgrade``, which
    may read ``under`` for a value the source does not give), with a warning that names them;
    an old and a new name given together is an error. A later source's old key so overrides an
    earlier source's new one (``--set`` of an old key over a file in today's keys)."""
    out = dict(raw)
    section = section_at(prefix.rstrip("."))
    if section is not None:
        if any(key in section.renamed for key in out):
            out = _moved(out, section.renamed, prefix, source)
        if section.upgrade is not None:
            out = dict(section.upgrade(out, under, source))
    for key, value in out.items():
        if isinstance(value, Mapping):
            below = under.get(key) if isinstance(under, Mapping) else None
            below = below if isinstance(below, Mapping) else {}
            out[key] = upgrade(value, below, source, f"{prefix}{key}.")
    return out


def _merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key, anything else is replaced whole."""
    merged = dict(base)
    for key, value in child.items():
        old = merged.get(key)
        merged[key] = (
            _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return merged


def parse_value(text: str) -> Any:
    """A command-line value read as YAML (``4``, ``null``, ``[p3, p4]``), except that YAML 1.1's
    word booleans (no, yes, on, off) stay words: ``train.mixed_precision=no`` is the string."""
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    return value


def value_text(value: Any) -> str:
    """``value`` as command-line text that ``parse_value`` reads back as ``value``: as it is
    where YAML reads it so (``no``, ``runs/demo``), else as flow YAML, quoted where needed
    (``'runs/demo #1'``, ``[p3, p4]``)."""
    if isinstance(value, str) and value and parse_value(value) == value:
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    return text.strip().removesuffix("...").strip()


def override(key: str, value: Any) -> str:
    """The ``--set`` item ``key=value`` that ``load_config`` reads back as ``value``, whatever
    it holds: a path with `` #`` (a YAML comment), ``: `` (a mapping), quotes or a leading
    ``-`` is quoted. Paths become strings."""
    return f"{key}={value_text(os.fspath(value) if isinstance(value, os.PathLike) else value)}"


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if key.partition(".")[0] in TOOL_BLOCKS:  # a run would ignore it
        raise ConfigError(f"override {item!r}: {key} is no run key (give it to its command)")
    try:
        value = parse_value(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot read the value: {err}") from None
    parts = key.split(".")
    own: dict[str, Any] = {}
    node = own
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    upgraded = upgrade(own, raw, f"--set {item}")
    if upgraded != own:  # an old key, in today's keys: merged over the config
        raw.update(_merge(raw, upgraded))
        return
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], raw: Mapping[str, Any], source: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} in {source} must be a mapping, "
            f"got {type(raw).__name__} {raw!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "sections"}  # type: ignore[arg-type]
    declared = registered_sections(cls.AT) if issubclass(cls, Extensible) else {}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields and key not in declared:
            known = [*fields, *declared]
            # keys of the sub-sections too: a key that moved into one (fgd_tau -> fgd.tau)
            nested = [f"{name}.{k}" for name, d in declared.items() for k in flatten(d.config())]
            close = difflib.get_close_matches(str(key), [*known, *nested], n=1)
            # a sub-section's key without its section: every sub-section that has it (each
            # has a weight), not one of them at random
            leaf = close[0].partition(".")[2] if close else ""
            if leaf and difflib.get_close_matches(str(key), [leaf]):
                close = [name for name in nested if name.partition(".")[2] == leaf]
            names = " or ".join(filter(None, [", ".join(close[:-1]), *close[-1:]]))
            hint = f"; did you mean {names}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {prefix}{key} in {source}{hint}")
    values: dict[str, Any] = {}
    sections: list[tuple[str, Any]] = []
    for key, value in raw.items():
        if key in declared:  # a registered sub-section: its own dataclass
            sections.append(
                (key, from_dict(declared[key].config, value, source, f"{prefix}{key}."))
            )
        else:
            values[key] = _convert(hints[key], value, f"{prefix}{key}", source)
    if sections:
        values["sections"] = tuple(sections)
    return cls(**values)


def _moved(
    raw: Mapping[str, Any], renamed: Mapping[str, str], prefix: str, source: str
) -> dict[str, Any]:
    """``raw`` with the keys a section renamed (``Section.renamed``: an old run's config.yaml,
    an old recipe) read at their new place, and a warning that names them; both names given is
    an error (``upgrade``)."""
    moved = {key: value for key, value in raw.items() if key in renamed}
    out = {key: value for key, value in raw.items() if key not in renamed}
    for old, value in moved.items():
        *path, last = renamed[old].split(".")
        node = out
        for part in path:
            child = node.get(part, {})
            node[part] = child = dict(child) if isinstance(child, Mapping) else child
            if not isinstance(child, dict):
                raise ConfigError(f"{prefix}{part} in {source} must be a mapping")
            node = child
        if last in node:
            raise ConfigError(
                f"{prefix}{old} in {source} is the old name of {prefix}{renamed[old]}, which is "
                "given too: keep the new one"
            )
        node[last] = value
    names = ", ".join(f"{prefix}{old} -> {prefix}{renamed[old]}" for old in moved)
    log.warning("%s: old key names read at their new place (%s); rename them there", source, names)
    return out


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{key}.")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key, source)
            except ConfigError as err:
                errors.append(err)
        raise _type_error(key, value, tp, source)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise _type_error(key, value, tp, source)
        return tuple(_convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(key, value, tp, source)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, value, tp, source)
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise _type_error(key, value, tp, source)
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp}")  # a bug in this file


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, value: Any, tp: Any, source: str) -> ConfigError:
    hint = ""
    if isinstance(value, bool) and tp is str:
        hint = ' (YAML reads an unquoted no, yes, on or off as a boolean: quote it, "no")'
    return ConfigError(
        f"{key} in {source}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}"
    )


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (tuples as lists) of a config, suitable for YAML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.name != "sections" or not isinstance(value, Extensible)
            }
            if isinstance(value, Extensible):  # registered sub-sections read like keys
                items.update((name, plain(section)) for name, section in value.sections)
            return items
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 0.01, ...}``: every leaf of a config under its dotted key."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}{key}.", sub)
        else:
            flat[prefix[:-1]] = value

    walk("", to_dict(cfg))
    return flat


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; ``load_config(path)`` reads back the same object."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` with dotted keys: ``replace(cfg, **{"train.epochs": 3})``."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = replace(getattr(cfg, head), **sub)
    if isinstance(cfg, Extensible):  # registered sub-sections are not fields
        names = {name for name, _ in cfg.sections} | set(registered_sections(cfg.AT))
        sections = {k: direct.pop(k) for k in list(direct) if k in names}
        if sections:
            cfg = cfg.with_sections(**sections)
    return dataclasses.replace(cfg, **direct)  # type: ignore[type-var]
