from pathlib import Path

import pytest

from distill.config import Config, ConfigError, dump_config, load_config, replace, resolve_defaults


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_partial_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train: {epochs: 3}\ndistill: {logit: {weight: 1.5}}\n"))
    assert cfg.train.epochs == 3
    assert cfg.distill.logit.weight == 1.5
    assert cfg.distill.logit.temperature == Config().distill.logit.temperature
    # the defaults that depend on other keys (feature levels by kind, CrossKD's layer by the
    # student's head) are filled in when a config is read
    assert load_config(None) == resolve_defaults(Config())


def test_unknown_key_names_path_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "distill:\n  logit:\n    temprature: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "distill.logit.temprature" in msg
    assert str(path) in msg
    assert "did you mean temperature?" in msg


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key trian .*did you mean train\?"):
        load_config(write(tmp_path, "trian: {epochs: 1}\n"))


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("train: {epochs: three}", "train.epochs", "expected int"),
        ("train: {epochs: 2.5}", "train.epochs", "expected int"),
        ("train: {epochs: true}", "train.epochs", "expected int"),
        ("train: {lr: fast}", "train.lr", "expected float"),
        ("anchors: {sizes: 16}", "anchors.sizes", "expected list of int"),
        ("anchors: {sizes: [16, x]}", "anchors.sizes[1]", "expected int"),
        ("teacher: {weights: 5}", "teacher.weights", "expected str or null"),
        ("data: 3", "data", "must be a mapping"),
    ],
)
def test_wrong_type_names_key_and_value(tmp_path: Path, text: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    msg = str(err.value)
    assert key in msg
    assert expected in msg


def test_int_is_accepted_for_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "distill: {logit: {temperature: 4}}"))
    assert cfg.distill.logit.temperature == 4.0
    assert isinstance(cfg.distill.logit.temperature, float)


def test_exponent_without_a_dot_is_a_float(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads ``1e-4`` as a string; where a float is expected it is one."""
    cfg = load_config(write(tmp_path, "train: {lr: 1e-4}"), ["distill.feature.cwd.weight=5E6"])
    assert cfg.train.lr == 1e-4 and cfg.distill.feature.cwd.weight == 5e6
    with pytest.raises(ConfigError, match=r"train\.lr .* expected float, got str 'e-4'"):
        load_config(write(tmp_path, "train: {lr: e-4}"))
    assert load_config(write(tmp_path, "output: {dir: 1e4}")).output.dir == "1e4"  # a string


def test_overrides_are_yaml_scalars_and_checked(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {epochs: 3}\n")
    cfg = load_config(
        path,
        [
            "train.epochs=5",
            "distill.logit.temperature=2",
            "teacher.weights=null",
            "train.grad_clip=null",
            "anchors.sizes=[8, 16, 32, 64, 128]",
            "data.skip_bad_images=true",
            "output.dir=runs/x y",
        ],
    )
    assert cfg.train.epochs == 5
    assert cfg.distill.logit.temperature == 2.0
    assert cfg.teacher.weights is None
    assert cfg.train.grad_clip is None
    assert cfg.anchors.sizes == (8, 16, 32, 64, 128)
    assert cfg.data.skip_bad_images is True
    assert cfg.output.dir == "runs/x y"
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch .*did you mean epochs"):
        load_config(path, ["train.epoch=5"])
    with pytest.raises(
        ConfigError, match=r"train\.epochs in --set train\.epochs=many: expected int"
    ):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"train\.lr in --set train\.lr=fast: expected float"):
        load_config(path, ["train.epochs=4", "train.lr=fast", "train.seed=1"])
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(path, ["train.epochs"])


def test_yaml_word_booleans_in_overrides_stay_words(tmp_path: Path) -> None:
    """``--set train.mixed_precision=no`` means the string "no", as documented; a file's
    unquoted ``no`` is a YAML boolean, and the error says to quote it."""
    cfg = load_config(None, ["train.mixed_precision=no", "data.skip_bad_images=false"])
    assert cfg.train.mixed_precision == "no"
    assert cfg.data.skip_bad_images is False
    with pytest.raises(ConfigError, match=r"data\.skip_bad_images.*expected bool.*'yes'"):
        load_config(None, ["data.skip_bad_images=yes"])
    path = write(tmp_path, "train: {mixed_precision: no}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.mixed_precision" in str(err.value) and str(path) in str(err.value)
    assert 'quote it, "no"' in str(err.value)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["distill.feature.levels=[p3, p5]", "train.grad_clip=null"])
    dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_python_tags_and_missing_files_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_replace_with_dotted_keys() -> None:
    cfg = replace(Config(), **{"train.epochs": 2, "distill.logit.weight": 0.5})
    assert cfg.train.epochs == 2
    assert cfg.distill.logit.weight == 0.5
    assert cfg.data == Config().data


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.rglob("*.yaml"))
    assert paths, "no configs shipped"
    for path in paths:
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "distill.feature.kind=foo",
            "distill.feature.kind in --set distill.feature.kind=foo: 'foo'",
        ),
        (
            "student.arch=resnet",
            "student.arch in --set student.arch=resnet: 'resnet' is not one of",
        ),
        ("teacher.head_norm=bn", "'bn' is not one of null | gn | none"),
        ("train.schedule=linear", "train.schedule in --set train.schedule=linear"),
        ("train.lr=-1", "train.lr in --set train.lr=-1: -1.0 must be > 0"),
        ("train.log_every=0", "train.log_every in --set train.log_every=0: 0 must be > 0"),
        ("distill.logit.temperature=0", "distill.logit.temperature in"),
        ("data.num_workers=-1", "data.num_workers in --set data.num_workers=-1: -1 must be >= 0"),
        ("data.hflip=.nan", "data.hflip in --set data.hflip=.nan: nan must be between 0 and 1"),
        ("data.hflip=1", None),
        ("distill.feature.levels=[p9]", "['p9'] must be a non-empty list of p3, p4, p5, p6, p7"),
        ("distill.feature.levels=[]", "[] must be a non-empty list"),
        ("anchors.sizes=[16, 32]", "anchors.sizes in --set anchors.sizes=[16, 32]: one base size"),
    ],
)
def test_names_and_ranges_are_checked_when_the_config_is_read(
    override: str, message: str | None
) -> None:
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_the_names_a_key_accepts_come_from_the_registries() -> None:
    from distill.config import choices
    from distill.kd import KINDS
    from students import STUDENTS

    assert tuple(KINDS) == ("mse", "cwd", "pkd", "fgd", "mgd")
    assert choices()["distill.feature.kind"] == (None, *KINDS)  # null: no feature KD
    assert choices()["student.arch"] == tuple(STUDENTS)
    for path in sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml")):
        load_config(path)  # every shipped config passes


def test_a_binary_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=f"cannot read {path}: not a text"):
        load_config(path)


def test_a_key_given_twice_in_a_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 0.1\ndata:\n  batch_size: 4\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"key 'train' given twice") as err:
        load_config(path)
    assert str(path) in str(err.value) and "line 5" in str(err.value)
    nested = write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n", "nested.yaml")
    with pytest.raises(ConfigError, match=r"key 'lr' given twice"):
        load_config(nested)
    # !!python tags are still refused, as by safe_load
    tagged = write(tmp_path, "data: !!python/object/apply:os.system ['true']\n", "tag.yaml")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tagged)


# --------------------------------------------------------------------------------------------
# Inheriting: _base_
# --------------------------------------------------------------------------------------------


def test_a_chain_of_bases_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    write(
        tmp_path,
        "train: {epochs: 7, lr: 0.5, seed: 3}\nanchors: {scales: [1.0, 1.5, 2.0]}\n",
        "a.yaml",
    )
    write(tmp_path, "_base_: a.yaml\ntrain: {lr: 0.25}\ndata: {batch_size: 2}\n", "b.yaml")
    (tmp_path / "sub").mkdir()
    child = write(
        tmp_path,
        "_base_: ../b.yaml  # relative to this file\ntrain: {seed: 9}\nanchors: {scales: [1.0]}\n",
        "sub/c.yaml",
    )
    cfg = load_config(child)
    assert cfg.train.epochs == 7  # from a.yaml, through b.yaml
    assert cfg.train.lr == 0.25  # b.yaml over a.yaml
    assert cfg.train.seed == 9  # the file's own key wins
    assert cfg.data.batch_size == 2
    assert cfg.anchors.scales == (1.0,)  # a list is replaced whole, not merged item by item
    assert cfg.train.weight_decay == Config().train.weight_decay  # no file names it: the default


def test_bases_given_as_a_list_are_merged_in_order(tmp_path: Path) -> None:
    write(tmp_path, "train: {epochs: 2, lr: 0.5}\ndata: {batch_size: 2}\n", "a.yaml")
    write(tmp_path, "train: {lr: 0.25, seed: 4}\n", "b.yaml")
    child = write(tmp_path, "_base_: [a.yaml, b.yaml]\ntrain: {seed: 5}\n", "c.yaml")
    cfg = load_config(child)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.seed) == (2, 0.25, 5)
    assert cfg.data.batch_size == 2


def test_a_cycle_of_bases_names_the_files(tmp_path: Path) -> None:
    a = write(tmp_path, "_base_: b.yaml\n", "a.yaml")
    b = write(tmp_path, "_base_: a.yaml\ntrain: {epochs: 1}\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_config(a)
    assert f"{a} -> {b} -> {a}" in str(err.value)
    itself = write(tmp_path, "_base_: [b.yaml, self.yaml]\n", "self.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(itself)


def test_a_missing_base_names_the_file_that_refers_to_it(tmp_path: Path) -> None:
    child = write(tmp_path, "_base_: ../nope/base.yaml\n", "c.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    msg = str(err.value)
    assert f"_base_ '../nope/base.yaml' in {child}" in msg
    assert f"not found: {tmp_path.parent / 'nope' / 'base.yaml'}" in msg


@pytest.mark.parametrize("value", ["3", "{a: b.yaml}", "[a.yaml, 3]", "''", "null"])
def test_a_base_that_is_not_a_path_or_a_list_of_paths_is_an_error(
    tmp_path: Path, value: str
) -> None:
    write(tmp_path, "train: {epochs: 1}\n", "a.yaml")
    child = write(tmp_path, f"_base_: {value}\n", "c.yaml")
    with pytest.raises(ConfigError, match=rf"_base_ in {child}: expected a path or a list"):
        load_config(child)


def test_an_error_names_the_file_that_holds_the_key(tmp_path: Path) -> None:
    base = write(tmp_path, "train: {epochs: 1, lr: fast}\n", "base.yaml")
    child = write(tmp_path, "_base_: base.yaml\ndata: {batch_size: 2}\n", "c.yaml")
    with pytest.raises(ConfigError, match=rf"train\.lr in {base}: expected float"):
        load_config(child)
    write(tmp_path, "train: {epoch: 1}\n", "base.yaml")
    with pytest.raises(ConfigError, match=rf"unknown key train\.epoch in {base}"):
        load_config(child)
    # keys that are right in each file but contradict each other once merged: both files named
    write(tmp_path, "anchors: {name: torchvision}\n", "base.yaml")
    write(tmp_path, "_base_: base.yaml\nanchors: {sizes: [8, 16, 32, 64, 128]}\n", "c.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert f"anchors.sizes in {child} (with its bases {base})" in str(err.value)


def test_set_overrides_an_inherited_key(tmp_path: Path) -> None:
    write(tmp_path, "train: {epochs: 7, lr: 0.5}\n", "a.yaml")
    child = write(tmp_path, "_base_: a.yaml\ntrain: {lr: 0.25}\n", "c.yaml")
    cfg = load_config(child, ["train.epochs=3", "train.lr=0.125"])
    assert (cfg.train.epochs, cfg.train.lr) == (3, 0.125)
    with pytest.raises(ConfigError, match=r"unknown key _base_ in --set _base_=a\.yaml"):
        load_config(child, ["_base_=a.yaml"])  # inheriting is for files, not a config key


def test_an_inherited_config_dumps_merged_and_loads_back_equal(tmp_path: Path) -> None:
    write(tmp_path, "train: {epochs: 7}\ndistill: {logit: {weight: 2.0}}\n", "a.yaml")
    child = write(tmp_path, "_base_: a.yaml\ndistill: {logit: {temperature: 2.0}}\n", "c.yaml")
    cfg = load_config(child, ["train.seed=1"])
    dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert "_base_" not in (tmp_path / "run" / "config.yaml").read_text()
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert (cfg.train.epochs, cfg.distill.logit.weight, cfg.distill.logit.temperature) == (
        7,
        2.0,
        2.0,
    )


def test_shipped_configs_that_derive_inherit_their_recipe() -> None:
    """The demo runs the benchmark's recipe as it is, and each plain student is its distillation
    config with no KD term on (no feature kind, every other KD weight 0): nothing else differs
    but where it writes."""
    from distill.kd import needs_teacher, weight_keys

    root = Path(__file__).resolve().parents[1] / "configs"
    demo, recipe = (
        load_config(root / "demo" / "distill.yaml"),
        load_config(root / "shapes" / "distill.yaml"),
    )
    assert demo.distill == recipe.distill
    assert demo.student == recipe.student
    for folder in ("shapes", "coco"):
        student, distill = (
            load_config(root / folder / "student.yaml"),
            load_config(root / folder / "distill.yaml"),
        )
        others = [key for key in weight_keys() if not key.startswith("distill.feature.")]
        off = ["distill.feature.kind=null", *(f"{key}=0" for key in others)]
        plain = load_config(root / folder / "distill.yaml", off)
        assert student == replace(plain, output=student.output)
        assert needs_teacher(distill.distill) and not needs_teacher(student.distill)
