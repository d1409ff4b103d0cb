"""``distill search``: config keys searched with Optuna, trials trained in lockstep groups and
halved at rungs.

- ``space``: the keys searched and their values (``--space`` items), checked against the
  config, sampled by an Optuna trial (``Space.suggest``), written as ``--set`` items
- ``block``: the ``search:`` block of a config file; ``load_space``, the space of a command
- ``rungs``: the student steps trials are scored at, and the successive-halving pruner
- ``study``: the Optuna study (storage, sampler, pruner, what it records), taking a trial
  (``ask``), ``best.yaml``

    space = load_space(config, overrides, ["distill.logit.weight=0.1..10:log"])
    study = open_study(space, load_config(config, overrides), rungs, out_dir, seed=0)
    trial, values = ask(study, space)
    cfg = load_config(config, [*overrides, *space_overrides(values)])
"""

from distill.search.block import SearchBlock, load_space, merge_space, read_search_block
from distill.search.rungs import RungPruner, check_rungs, parse_rungs
from distill.search.space import (
    Param,
    SearchError,
    Space,
    check_space,
    make_space,
    parse_space_item,
    space_overrides,
)
from distill.search.study import ask, open_study, storage_url, study_name, write_best

__all__ = [
    "Param",
    "RungPruner",
    "SearchBlock",
    "SearchError",
    "Space",
    "ask",
    "check_rungs",
    "check_space",
    "load_space",
    "make_space",
    "merge_space",
    "open_study",
    "parse_rungs",
    "parse_space_item",
    "read_search_block",
    "space_overrides",
    "storage_url",
    "study_name",
    "write_best",
]
