"""The Optuna study of a search: where it is stored, how it samples and prunes, what it must
match to be continued, how a process takes a trial; and the ``best.yaml`` a search ends with.

Storage: any URL of Optuna's RDB storage (``sqlite:///PATH``, ``postgresql://...``,
``mysql://...``); by default ``sqlite:///<out>/study.db`` (absolute). ``optuna-dashboard URL``
opens the study as it is. Several ``distill search`` processes, on one machine or many, work
on one study by giving the same URL and study name: ``open_study`` loads it where it exists,
and each ``ask`` creates a trial of its own (numbered by the storage in one transaction,
RUNNING from then on, with the process that trains it in the trial's ``worker`` attribute),
so two workers never train the same trial. SQLite lets one writer in at a time; the others
wait for it (``SQLITE_TIMEOUT_S``) instead of failing at once.
A worker killed between asking for its trials and recording their group (``group.json``, then
each trial's ``group`` attribute) leaves them RUNNING with no one to train them: the next worker
of the study on that host finds them (``orphaned``: their process is gone), tells them FAIL and
takes others in their place (``release``, ``taken``).

Sampler: TPE, multivariate over the groups of keys that are sampled together (a conditional
key forms its own group: Optuna's ``group=True``), with the constant liar (trials still
running count as bad ones: a lockstep group asks all its trials before any is told, and
would otherwise get one point several times), seeded. Workers that share a study should be
given different seeds: with the same one they draw the same points while TPE starts up.

Pruner: successive halving at the rungs (``distill.search.rungs``); the score is maximised.

A study records what it searches (user attributes ``space``, ``rungs``, ``reduction_factor``,
``config``: the base config) and refuses to go on with another space, other rungs or a base
config that differs other than in where things are (``WORKERS_MAY_DIFFER``).
"""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc

from distill.config import Config, dump_config, flatten, load_config, override, to_dict
from distill.search.rungs import RungPruner
from distill.search.space import SearchError, Space, space_overrides

DEFAULT_STUDY = "distill-search"
SQLITE_TIMEOUT_S = 60.0  # how long a transaction waits for another process's to end
OPEN_TRIES = 5  # of a new SQLite file that other processes make at once
# Where the base configs of workers sharing a study may differ: where things are on each
# machine (paths, loader processes), not what is trained or how it is scored. Keys ending in
# "." cover a section.
WORKERS_MAY_DIFFER = (
    "output.", "data.root", "data.train", "data.val", "data.images", "data.val_images",
    "data.num_workers", "teacher.weights", "teacher.backbone_weights", "student.weights",
    "student.backbone_weights",
)  # fmt: skip


def study_name(config: Path | None) -> str:
    """The default study name: the config file's folder and stem (``shapes/distill``)."""
    if config is None:
        return DEFAULT_STUDY
    path = Path(config)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def storage_url(storage: str | None, out_dir: Path) -> str:
    """``storage`` as given, or the SQLite file ``<out_dir>/study.db`` (absolute; the folder is
    made)."""
    if storage is not None:
        return storage
    out_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(out_dir / 'study.db').resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``; a one-line error where it cannot be opened. A SQLite file
    gets transactions that lock it from their start (``_lock_on_begin``)."""
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else {}
    for attempt in range(1, OPEN_TRIES + 1):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
            break
        except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as err:
            # two processes making one new database: one made a table between the other's
            # look and its CREATE (or its version row): the next look finds them
            racing = isinstance(
                err, sqlalchemy.exc.OperationalError | sqlalchemy.exc.IntegrityError
            )
            if not racing or attempt == OPEN_TRIES:
                reason = str(err).splitlines()[0]
                raise SearchError(f"--storage {url}: cannot open it ({reason})") from None
            time.sleep(random.uniform(0.1, 0.5))
    if sqlite:
        _lock_on_begin(storage.engine)
    return storage


def _lock_on_begin(engine: sqlalchemy.engine.Engine) -> None:
    """Make each transaction on a SQLite engine ``BEGIN IMMEDIATE`` (SQLAlchemy's recipe): the
    Python driver begins one only at its first write, so two processes can both read that a
    queued (WAITING) trial is free and both take it; locked from its start, the second waits
    for the first and reads it taken. ``ask`` of a new trial is safe either way."""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: sqlalchemy.engine.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # the connections made before (the storage's setup) go


def make_sampler(seed: int | None) -> optuna.samplers.TPESampler:
    with warnings.catch_warnings():  # group=True is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True
        )


def open_study(
    space: Space,
    base: Config,
    rungs: Sequence[int],
    out_dir: Path,
    *,
    storage: str | None = None,
    name: str = DEFAULT_STUDY,
    seed: int | None = None,
    reduction_factor: int = 3,
    prune: bool = True,
) -> optuna.Study:
    """The study ``name`` in ``storage`` (default: ``<out_dir>/study.db``), created or continued:
    a continued one must search the same space, at the same rungs, over the same base config
    (see the module). ``base``: the config every trial starts from (CONFIG and ``--set``)."""
    pruner = RungPruner(rungs, reduction_factor)  # checks them before the storage is touched
    url = storage_url(storage, out_dir)
    study = optuna.create_study(
        storage=open_storage(url),
        study_name=name,
        load_if_exists=True,
        direction="maximize",
        sampler=make_sampler(seed),
        # prune False: every trial to full length, scored at every rung (the rungs' fidelity)
        pruner=pruner if prune else optuna.pruners.NopPruner(),
    )
    record = {
        "space": space.texts(),
        "rungs": list(pruner.rungs),
        "reduction_factor": pruner.reduction_factor if prune else None,
        "config": to_dict(base),
    }
    if check_record(study, record, f"study {name!r} in {url}"):
        return study
    for key, value in record.items():  # a new study (two new ones at once write the same)
        study.set_user_attr(key, value)
    return study


def check_record(study: optuna.Study, record: Mapping[str, Any], where: str) -> bool:
    """Whether ``study`` holds a record (False: a new study), refusing one that searches
    something else than ``record`` says."""
    held = study.user_attrs
    if not held:
        if study.get_trials(deepcopy=False):
            raise SearchError(f"{where} has trials but was not made by distill search")
        return False
    for key in ("space", "rungs", "reduction_factor"):
        if held.get(key) != record[key]:
            raise SearchError(
                f"{where} has {key} {held.get(key)!r}, not {record[key]!r}: give the same, or "
                "another --study or --storage"
            )
    before, now = flatten(held.get("config", {})), flatten(record["config"])
    changed = [
        f"{key} {before.get(key)!r} there, {now.get(key)!r} here"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key) and not key.startswith(WORKERS_MAY_DIFFER)
    ]
    if changed:
        raise SearchError(
            f"{where} searches over another base config: {'; '.join(changed)}; give the same "
            "config and --set, or another --study or --storage"
        )
    return True


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def orphaned(study: optuna.Study, recorded: set[int]) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials that a worker of this host took and died before it recorded them in a
    group: not in ``recorded`` (the trials of this output folder's groups), without a ``group``
    attribute (a group of another folder) and their worker's process gone. Trials of other
    hosts are never judged: their processes cannot be seen from here."""
    host = socket.gethostname()
    found = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        name, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if trial.number in recorded or "group" in trial.user_attrs or name != host:
            continue
        if pid.isdigit() and not alive(int(pid)):
            found.append(trial)
    return found


def release(study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
    """Tell ``trials`` (``orphaned``) FAIL, marked ``orphan``: ``taken`` does not count them, so
    the search still trains as many trials as it was given."""
    for trial in trials:
        optuna.trial.Trial(study, trial._trial_id).set_user_attr("orphan", True)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def taken(study: optuna.Study) -> int:
    """Trials the study holds, in any state (another worker's running ones too), but those
    released as orphans."""
    return sum(not t.user_attrs.get("orphan") for t in study.get_trials(deepcopy=False))


def ask(study: optuna.Study, space: Space) -> tuple[optuna.Trial, dict[str, Any]]:
    """A new trial for this process (RUNNING in the storage: no other worker gets it), with the
    values of ``space`` it samples; the trial's ``worker`` attribute names this process."""
    trial = study.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    return trial, space.suggest(trial)


def write_best(
    values: Mapping[str, Any], config: Path | None, overrides: Sequence[str], out_dir: Path
) -> Path:
    """``<out_dir>/best.yaml``: the base config (``config`` and its ``--set`` ``overrides``) with
    a trial's ``values`` (``study.best_params``, say), resolved in full like a run's
    ``config.yaml``; its ``output.dir`` is ``<out_dir>/best``, so that ``distill run
    <out_dir>/best.yaml`` trains it beside the search."""
    cfg = load_config(
        config, [*overrides, *space_overrides(values), override("output.dir", out_dir / "best")]
    )
    path = out_dir / "best.yaml"
    dump_config(cfg, path)
    return path
