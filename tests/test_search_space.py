"""distill search, part 1: the space (``--space`` items, the ``search:`` block), its checks
against the config, conditional sampling, the Optuna study (reopening, refusing another
space, two processes on one SQLite file), the successive-halving pruner and ``best.yaml``."""

from __future__ import annotations

import math
import multiprocessing
import os
import random
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from distill.config import ConfigError, flatten, load_config, to_dict
from distill.search import (
    Param,
    RungPruner,
    SearchError,
    ask,
    check_space,
    load_space,
    make_space,
    open_study,
    parse_rungs,
    parse_space_item,
    read_search_block,
    space_overrides,
    storage_url,
    study_name,
    write_best,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

KIND = "distill.feature.kind"
# a space with a choice and keys that apply only under one of its values
CONDITIONAL = [
    f"{KIND}=cwd|fgd|mgd",
    f"distill.feature.fgd.tau=0.5..64:log@{KIND}=fgd",
    f"distill.feature.cwd.tau=1..8@{KIND}=cwd",
    f"distill.feature.mgd.ratio=0.3..0.9@{KIND}=mgd|fgd",
    "distill.logit.weight=0.1..10:log",
]


def write(tmp_path: Path, text: str, name: str = "search.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def space_of(*items: str, config: Path | None = None) -> Any:
    return load_space(config, [], list(items))


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.lr=0.001..0.1", Param("train.lr", 0.001, 0.1)),
        ("train.lr=1e-4..1e-1:log", Param("train.lr", 1e-4, 0.1, log=True)),
        ("data.batch_size=2..16", Param("data.batch_size", 2, 16)),
        ("x=-1..1", Param("x", -1, 1)),
        ("x=null|3|0.5|true|cwd|no", Param("x", choices=(None, 3, 0.5, True, "cwd", "no"))),
        ("x=1..2@k=a", Param("x", 1, 2, when={"k": ("a",)})),
        ("x=a|b@k=a|b@j=3", Param("x", choices=("a", "b"), when={"k": ("a", "b"), "j": (3,)})),
    ],
)
def test_space_items_parse_and_write_back(text: str, expected: Param) -> None:
    param = parse_space_item(text)
    assert param == expected
    assert parse_space_item(param.text()) == param  # the study records the space as text
    assert param.source == f"--space {text}"


def test_an_int_range_needs_ints() -> None:
    assert parse_space_item("data.batch_size=2..16").is_int
    assert not parse_space_item("train.lr=1..16.0").is_int
    assert not parse_space_item("x=1|2").is_int


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train.lr", "must look like KEY=LOW..HIGH"),
        ("train.lr=", "must look like"),
        ("=1..2", "must look like"),
        ("train.lr=3", "'3' is no range"),
        ("train.lr=a..b", "a range's bound must be a finite number, got 'a'"),
        ("train.lr=1..inf", "finite number"),
        ("train.lr=1..2@k", "a condition must look like @KEY=A|B, got @k"),
        ("train.lr=1..2@k=a@k=b", "two conditions on k"),
        ("train.optimizer=sgd||adamw", "an empty value in 'sgd||adamw'"),
        ("train.optimizer=sgd|sgd", "a value is given twice"),
        ("train.optimizer=[a]|b", "choices are null, numbers, words or booleans: ['a']"),
    ],
)
def test_malformed_items_are_one_line_errors(text: str, words: str) -> None:
    with pytest.raises(SearchError) as err:
        parse_space_item(text)
    message = str(err.value)
    assert message.startswith(f"--space {text}:") and words in message
    assert "\n" not in message


def test_the_search_block_in_every_form_merged_through_bases(tmp_path: Path) -> None:
    write(
        tmp_path,
        "train: {epochs: 2}\nsearch:\n  trials: 7\n  space:\n"
        "    distill.logit.weight: 1..2\n    train.lr: 0.1..0.5\n",
        "base.yaml",
    )
    child = write(
        tmp_path,
        "_base_: base.yaml\n"
        "search:\n"
        "  rungs: [10, 20, 40]\n"
        "  seed: 3\n"
        "  space:\n"
        "    distill.logit.weight: 0.1..10:log\n"  # over the base's entry
        f"    {KIND}: [cwd, fgd]\n"
        "    distill.feature.fgd.tau: {low: 0.5, high: 64, log: true, when: {%s: fgd}}\n"
        "    distill.feature.cwd.tau: {choices: [1, 4], when: {%s: [cwd]}}\n"
        "    distill.logit.temperature: 1..8@%s=cwd\n" % (KIND, KIND, KIND),
    )
    block = read_search_block(child)
    assert (block.trials, block.rungs, block.seed) == (7, (10, 20, 40), 3)
    assert [p.text() for p in block.space] == [
        "distill.logit.weight=0.1..10:log",
        "train.lr=0.1..0.5",
        f"{KIND}=cwd|fgd",
        f"distill.feature.fgd.tau=0.5..64:log@{KIND}=fgd",
        f"distill.feature.cwd.tau=1|4@{KIND}=cwd",
        f"distill.logit.temperature=1..8@{KIND}=cwd",
    ]
    assert block.space[0].source == f"search.space.distill.logit.weight in {child} (with its bases)"
    # the file runs as its base config: a run leaves the block out
    assert load_config(child) == load_config(None, ["train.epochs=2"])
    # the command line's entry replaces the block's, the others stay
    space = load_space(child, [], ["train.lr=0.2..0.3", "train.momentum=0.8..0.99"])
    texts = space.texts()
    assert "train.lr=0.2..0.3" in texts and "train.lr=0.1..0.5" not in texts
    assert "train.momentum=0.8..0.99" in texts and len(texts) == 7


def test_a_run_refuses_a_search_key_on_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"search.trials is no run key"):
        load_config(None, ["search.trials=3"])


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ("search: {trails: 3}", "search in {path}: unknown key trails; did you mean trials?"),
        ("search: {trials: 0}", "search.trials in {path}: 0 must be at least 1"),
        ("search: {seed: x}", "search.seed in {path}: expected an int, got 'x'"),
        ("search: {rungs: [20, 10]}", "search.rungs in {path}: the steps must rise"),
        ("search: {rungs: 10}", "search.rungs in {path}: a list of steps"),
        ("search: {space: [train.lr]}", "search.space in {path}: a mapping KEY: SPEC"),
        ("search: {space: {train.lr: 3}}", "search.space.train.lr in {path}: give LOW..HIGH"),
        ("search: {space: {train.lr: {low: 1}}}", "give low and high"),
        ("search: {space: {train.lr: {lo: 1}}}", "unknown key lo; did you mean low?"),
        ("search: {space: {train.lr: {low: 1, high: 2, log: 1}}}", "log is true or false"),
        ("search: {space: {x: {choices: [1, 2], low: 1}}}", "without low, high, log"),
        ("search: {space: {x: {choices: [1, 2], when: {k: [[1]]}}}}", "when.k is a value"),
    ],
)
def test_a_bad_search_block_is_a_one_line_error(tmp_path: Path, block: str, words: str) -> None:
    path = write(tmp_path, block + "\n")
    with pytest.raises(SearchError) as err:
        read_search_block(path)
    assert words.format(path=path) in str(err.value)


# --------------------------------------------------------------------------------------------
# Checks against the config, before any compute
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "words"),
    [
        (
            ["distill.logit.temprature=1..8"],
            "unknown key distill.logit.temprature in --set distill.logit.temprature=1; "
            "did you mean temperature?",
        ),
        (["trian.lr=0.1..1"], "unknown key trian in --set trian.lr=0.1; did you mean train?"),
        (
            ["distill.logit.kind=1..2"],
            "distill.logit.kind in --set distill.logit.kind=1: expected str",
        ),
        (["data.batch_size=1.5..4"], "expected int, got float 1.5"),
        (["train.lr=0..0.1"], "train.lr in --set train.lr=0: 0.0 must be > 0"),
        (["distill.logit.weight=0..1:log"], "a log range must lie above 0, got 0..1"),
        (["distill.logit.weight=-1..1:log"], "a log range must lie above 0, got -1..1"),
        (["distill.logit.weight=2..1"], "the range 2..1 is reversed"),
        (["distill.logit.weight=1..1"], "the range 1..1 is empty"),
        (["distill.logit.kind=bce|nope"], "distill.logit.kind=nope: 'nope' is not one of bce"),
        (["train.lr=0.1..1", "train.lr=0.2..1"], "train.lr is given twice (also --space train"),
        (
            ["distill.feature.fgd.tau=1..2@distill.logit.weight=1"],
            "its condition names distill.logit.weight, which is no choice of the space",
        ),
        (
            ["distill.logit.weight=1..2", "distill.feature.fgd.tau=1..2@distill.logit.weight=1"],
            "which is no choice of the space",
        ),
        (
            [f"{KIND}=cwd|mgd", f"distill.feature.fgd.tau=1..2@{KIND}=fgd"],
            f"{KIND}=fgd is not one of its choices ({KIND}=cwd|mgd)",
        ),
        (
            [
                "train.optimizer=sgd|adamw@train.schedule=step",
                "train.schedule=step|cosine@train.optimizer=sgd",
            ],
            "form a cycle",
        ),
        (
            ["distill.feature.fgd_tau=1..2"],
            "distill.feature.fgd_tau is the old name of distill.feature.fgd.tau",
        ),
    ],
)
def test_the_space_is_checked_before_any_compute(items: list[str], words: str) -> None:
    with pytest.raises(SearchError) as err:
        space_of(*items)
    message = str(err.value)
    assert words in message, message
    assert message.startswith("--space ") and "\n" not in message


def test_nothing_to_search_is_an_error() -> None:
    with pytest.raises(SearchError, match="nothing to search"):
        space_of()


def test_values_are_checked_over_the_config_and_its_overrides(tmp_path: Path) -> None:
    """A student checkpoint is refused beside student.init_from_teacher: taken alone, refused
    with the override (or the file) that sets it; an entry of the block is named as such."""
    item = "student.weights=a.pt|b.pt"
    assert load_space(None, [], [item]).params[0].choices == ("a.pt", "b.pt")
    with pytest.raises(SearchError, match=r"^--space .*: student.init_from_teacher in .* a.pt"):
        load_space(None, ["student.init_from_teacher=[neck]"], [item])
    config = write(
        tmp_path,
        "student: {init_from_teacher: [head]}\nsearch: {space: {student.weights: [a.pt, b.pt]}}\n",
    )
    with pytest.raises(SearchError, match=rf"^search.space.student.weights in {config}: "):
        load_space(config, [], [])


def test_values_take_the_type_of_their_key() -> None:
    space = space_of(
        "distill.logit.temperature=1..8",  # a float key: a float range
        "data.batch_size=2..16:log",  # an int key: an int range
        "distill.crosskd.cls_weight=0|3",  # a float key: 0.0 | 3.0
        "eval.batch_size=null|4",  # null stays null
    )
    temperature, batch, cls_weight, eval_batch = space.params
    assert (temperature.low, temperature.high) == (1.0, 8.0) and not temperature.is_int
    assert type(temperature.low) is float
    assert batch.is_int and batch.log
    assert cls_weight.choices == (0.0, 3.0) and all(type(v) is float for v in cls_weight.choices)
    assert eval_batch.choices == (None, 4)
    trial = optuna.create_study().ask()
    values = space.suggest(trial)
    assert isinstance(values["data.batch_size"], int) and 2 <= values["data.batch_size"] <= 16
    assert isinstance(values["distill.logit.temperature"], float)


# --------------------------------------------------------------------------------------------
# Sampling and overrides
# --------------------------------------------------------------------------------------------


def test_conditional_keys_are_sampled_only_in_their_branch() -> None:
    # the dependent key given before its choice: the space orders them
    space = space_of(*reversed(CONDITIONAL))
    assert [p.key for p in space.params][:1] == ["distill.logit.weight"]
    assert [p.key for p in space.params].index(KIND) < 2
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5)
    )
    kinds = set()
    for _ in range(40):
        trial = study.ask()
        values = space.suggest(trial)
        kind = values[KIND]
        kinds.add(kind)
        expected = {KIND, "distill.logit.weight"} | {
            "fgd": {"distill.feature.fgd.tau", "distill.feature.mgd.ratio"},
            "cwd": {"distill.feature.cwd.tau"},
            "mgd": {"distill.feature.mgd.ratio"},
        }[kind]
        assert set(values) == expected == set(trial.params)
        study.tell(trial, random.Random(trial.number).random())
    assert kinds == {"cwd", "fgd", "mgd"}


def test_a_condition_on_a_conditional_choice_holds_only_in_its_branch() -> None:
    space = make_space(
        [
            parse_space_item("b=x|y@a=1"),
            parse_space_item("c=0.1..1@b=y"),
            parse_space_item("a=1|2"),
        ]
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        values = space.suggest(trial)
        seen.add(tuple(sorted(values)))
        assert ("c" in values) == (values.get("b") == "y")
        assert ("b" in values) == (values["a"] == 1)
        study.tell(trial, 0.0)
    assert seen == {("a",), ("a", "b"), ("a", "b", "c")}


def test_overrides_read_back_as_the_same_values() -> None:
    values = {
        "train.lr": 0.1 + 0.2,  # 0.30000000000000004: floats by repr
        "distill.logit.weight": 1e-05,
        "train.max_steps": None,
        "train.mixed_precision": "no",  # a word YAML 1.1 reads as false
        "data.batch_size": 3,
        "distill.feature.kind": "fgd",
    }
    flat = flatten(load_config(None, space_overrides(values)))
    assert {key: flat[key] for key in values} == values
    assert "train.max_steps=null" in space_overrides(values)


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def open_here(
    tmp_path: Path, items: list[str], rungs: tuple[int, ...] = (10, 20), **kw: Any
) -> Any:
    space = space_of(*items)
    return space, open_study(space, load_config(None, kw.pop("sets", [])), rungs, tmp_path, **kw)


def test_a_study_continues_where_it_was_and_refuses_another_search(tmp_path: Path) -> None:
    items = ["train.lr=0.001..0.1:log", "train.optimizer=sgd|adamw"]
    space, study = open_here(tmp_path, items, name="s", seed=0)
    for _ in range(3):
        trial, values = ask(study, space)
        assert trial.user_attrs["worker"].endswith(f":{os.getpid()}")
        study.tell(trial, values["train.lr"])
    assert (tmp_path / "study.db").is_file()
    assert storage_url(None, tmp_path) == f"sqlite:///{(tmp_path / 'study.db').resolve()}"
    # the same search, another process: the trials are there, the next one is number 3
    _, again = open_here(tmp_path, items, name="s", seed=1, sets=["output.dir=elsewhere"])
    assert len(again.trials) == 3
    assert again.user_attrs["space"] == space.texts()
    assert again.ask().number == 3
    with pytest.raises(SearchError, match=r"study 's' in sqlite:///.* has space \["):
        open_here(tmp_path, ["train.lr=0.001..0.2:log", "train.optimizer=sgd|adamw"], name="s")
    with pytest.raises(SearchError, match=r"has rungs \[10, 20\], not \[10, 30\]"):
        open_here(tmp_path, items, (10, 30), name="s")
    with pytest.raises(SearchError, match="has reduction_factor 3, not 2"):
        open_here(tmp_path, items, name="s", reduction_factor=2)
    with pytest.raises(SearchError, match=r"another base config: train.epochs 12 there, 3 here"):
        open_here(tmp_path, items, name="s", sets=["train.epochs=3"])
    # another name in the same file is another study
    _, other = open_here(tmp_path, ["train.lr=0.001..0.2:log"], name="t")
    assert len(other.trials) == 0


def test_a_storage_that_cannot_be_opened_is_a_one_line_error(tmp_path: Path) -> None:
    for url in ("nonsense", f"sqlite:///{tmp_path}/no/such/folder/x.db"):
        with pytest.raises(SearchError) as err:
            open_here(tmp_path, ["train.lr=0.001..0.1"], storage=url)
        assert str(err.value).startswith(f"--storage {url}: cannot open it (")
        assert "\n" not in str(err.value)


def test_study_names() -> None:
    assert study_name(Path("configs/shapes/distill.yaml")) == "shapes/distill"
    assert study_name(Path("x.yaml")) == "x"
    assert study_name(None) == "distill-search"


def take_trials(url: str, count: int, start: Any, results: Any) -> None:
    """A worker: open the study at ``url`` when the other one does, take ``count`` trials."""
    space = space_of("train.lr=0.001..0.1:log")
    start.wait()  # both open the storage at once: a new file is made by both
    study = open_study(space, load_config(None), (10, 20), Path("."), storage=url, name="s")
    numbers = []
    for _ in range(count):
        trial, values = ask(study, space)
        numbers.append(trial.number)
        study.tell(trial, values["train.lr"])
    results.put(numbers)


@pytest.mark.parametrize("enqueued", [0, 20])
def test_two_processes_never_take_the_same_trial(tmp_path: Path, enqueued: int) -> None:
    """Two processes on one new SQLite file (both make it), or on a study with queued trials
    (``enqueue_trial``: trials waiting for a worker, which each pops)."""
    url = storage_url(None, tmp_path)
    if enqueued:
        _, study = open_here(tmp_path, ["train.lr=0.001..0.1:log"], storage=url, name="s")
        for _ in range(enqueued):
            study.enqueue_trial({"train.lr": 0.01})
    fork = multiprocessing.get_context("fork")  # the test's imports, without a second start-up
    start, results = fork.Barrier(2), fork.Queue()
    workers = [fork.Process(target=take_trials, args=(url, 15, start, results)) for _ in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:  # a few numbers each: they fit the queue's pipe, join first
        worker.join(timeout=60)
        assert worker.exitcode == 0
    taken = [results.get(timeout=5) for _ in workers]
    assert not set(taken[0]) & set(taken[1])
    assert sorted(taken[0] + taken[1]) == list(range(30))


# --------------------------------------------------------------------------------------------
# Rungs and the pruner
# --------------------------------------------------------------------------------------------


def test_rungs_parse_and_are_checked() -> None:
    assert parse_rungs("500,1000,3000") == (500, 1000, 3000)
    assert parse_rungs("7") == (7,)
    for text, words in [("5,x", "ints"), ("10,10", "rise"), ("0,5", "rise"), ("", "ints")]:
        with pytest.raises(SearchError, match=rf"^--rungs {text}: .*{words}"):
            parse_rungs(text)


def halving_study(reduction_factor: int = 3) -> optuna.Study:
    return optuna.create_study(
        direction="maximize", pruner=RungPruner((100, 200, 400), reduction_factor)
    )


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 5, 0, 3, 1, 4]])
def test_a_group_reported_together_keeps_its_best_whatever_the_order(order: list[int]) -> None:
    study = halving_study()
    group = [study.ask() for _ in range(6)]
    for trial, score in zip(group, [0.1, 0.6, 0.3, 0.5, 0.2, 0.4]):
        trial.report(score, step=100)
    kept = {i for i in order if not group[i].should_prune()}
    assert kept == {1, 3}  # the top 6 // 3 = 2


def test_later_trials_meet_the_scores_of_earlier_ones() -> None:
    study = halving_study(reduction_factor=2)
    for score in (0.5, 0.7):
        trial = study.ask()
        trial.report(score, step=100)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    late = study.ask()
    late.report(0.6, step=100)  # below the best of three: pruned
    assert late.should_prune()
    best = study.ask()
    best.report(0.8, step=100)  # the top 4 // 2 = 2
    assert not best.should_prune()


def test_the_pruner_spares_the_last_rung_and_steps_between_rungs() -> None:
    study = halving_study()
    leader = study.ask()
    for step in (100, 200, 400):
        leader.report(0.9, step=step)
    follower = study.ask()
    follower.report(0.1, step=150)  # not a rung
    assert not follower.should_prune()
    follower.report(0.1, step=200)
    assert follower.should_prune()
    last = study.ask()
    last.report(0.1, step=400)  # the last rung: the full run, told, never pruned
    assert not last.should_prune()
    lost = study.ask()
    lost.report(math.nan, step=100)
    assert lost.should_prune()


# --------------------------------------------------------------------------------------------
# best.yaml
# --------------------------------------------------------------------------------------------


def test_best_yaml_is_the_base_with_the_values_and_runs_as_it_is(tmp_path: Path) -> None:
    write(
        tmp_path,
        "train: {epochs: 2}\nsearch: {space: {distill.logit.weight: 0.1..10:log}}\n",
        "base.yaml",
    )
    write(tmp_path, "_base_: base.yaml\ndata: {batch_size: 4}\n", "child.yaml")
    config, overrides = tmp_path / "child.yaml", ["train.lr=0.02"]
    space = check_space(make_space([parse_space_item(t) for t in CONDITIONAL]), config, overrides)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    values = space.suggest(study.ask())
    out = tmp_path / "search"
    path = write_best(values, config, overrides, out)
    assert path == out / "best.yaml"
    best = load_config(path)
    assert best == load_config(
        config, [*overrides, *space_overrides(values), f"output.dir={out / 'best'}"]
    )
    flat = flatten(best)
    assert all(flat[key] == value for key, value in values.items())
    assert (flat["train.epochs"], flat["data.batch_size"], flat["train.lr"]) == (2, 4, 0.02)
    assert set(yaml.safe_load(path.read_text())) == set(to_dict(best))  # no search:, _base_
