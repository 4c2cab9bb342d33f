"""Experiment files: loading, validation messages, --set overrides, strategy selection, data_dir."""
from __future__ import annotations

import re

import pytest

from cl.config import build_experiment, load_experiment, parse_value
from cl.errors import UserError
from cl.training import TrainingParams
from cl.transforms import TransformParams


def error_of(raw, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        build_experiment(raw, "exp.toml", **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- a valid file


def test_load_valid_file(write_experiment, tiny_raw):
    path = write_experiment(tiny_raw(description="a test", seeds=[3, 1]))
    config = load_experiment(path)
    assert config.name == "tiny"
    assert config.description == "a test"
    assert config.seeds == [3, 1]
    assert config.source == str(path)
    assert [d.name for d in config.datasets] == ["digits"]
    assert config.datasets[0].params.test_fraction == 0.2  # default filled in
    assert config.scenario.name == "class_incremental"
    assert config.scenario.params.n_experiences == 2
    assert config.model.name == "mlp" and config.model.params.hidden == [32]
    assert isinstance(config.training, TrainingParams)
    assert (config.training.epochs, config.training.batch_size, config.training.lr) == (1, 32, 0.1)
    assert config.training.optimizer == "sgd"  # default
    assert [(s.name, s.label) for s in config.strategies] == [("naive", "naive"), ("er", "er"), ("joint", "joint")]
    assert config.strategies[1].params.buffer_size == 50
    assert config.strategies[1].params.buffer == "reservoir"  # default
    setup = config.setup()
    assert setup["model"] == {"name": "mlp", "multi_head": False, "hidden": [32]}
    assert setup["training"]["lr"] == 0.1


def test_shipped_quickstart_file_is_valid():
    config = load_experiment("experiments/quickstart.toml")
    assert config.name == "quickstart"
    assert [s.name for s in config.strategies] == ["naive", "er", "joint"]


def test_training_table_is_optional(tiny_raw):
    config = build_experiment(tiny_raw(training=None))
    assert config.training == TrainingParams()


def test_seeds_default_to_zero(tiny_raw):
    assert build_experiment(tiny_raw(seeds=None)).seeds == [0]


def test_several_dataset_tables(tiny_raw):
    config = build_experiment(tiny_raw(dataset=[{"name": "digits"}, {"name": "digits", "split_seed": 1}]))
    assert [d.params.split_seed for d in config.datasets] == [0, 1]


# ---------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_lists_valid_keys(tiny_raw):
    msg = error_of(tiny_raw(seed=1))
    assert "'seed'" in msg
    for key in ("name", "description", "seeds", "dataset", "scenario", "model", "training", "strategies"):
        assert key in msg
    assert "seeds (list[int])" in msg


@pytest.mark.parametrize("section, key, expected", [
    ("training", "learning_rate", ["epochs (int)", "batch_size (int)", "lr (float)", "momentum (float)",
                                   "optimizer ('sgd'|'adam')"]),
    ("model", "layers", ["multi_head (bool)", "hidden (list[int])"]),
    ("scenario", "n_exp", ["n_experiences (int)", "class_order (list[int])", "task_labels (bool)",
                           "seed (int or none)"]),
    ("dataset", "fraction", ["test_fraction (float)", "split_seed (int)"]),
])
def test_unknown_key_in_table_names_it_and_lists_valid_keys(tiny_raw, section, key, expected):
    raw = tiny_raw()
    raw[section][key] = 1
    msg = error_of(raw)
    assert f"[{section}]" in msg
    assert f"unknown key {key!r}" in msg
    assert "valid keys:" in msg
    for text in expected:
        assert text in msg


def test_unknown_key_in_strategy_names_it_and_lists_valid_keys(tiny_raw):
    raw = tiny_raw()
    raw["strategies"][1]["buffersize"] = 10
    msg = error_of(raw)
    assert "'er'" in msg and "unknown key 'buffersize'" in msg
    assert "buffer_size (int)" in msg and "replay_batch_size (int)" in msg
    assert "buffer ('reservoir'|'class_balanced')" in msg


def test_key_on_parameterless_strategy(tiny_raw):
    raw = tiny_raw()
    raw["strategies"][0]["lr"] = 0.1
    msg = error_of(raw)
    assert "'naive'" in msg and "unknown key 'lr'" in msg and "takes no parameters" in msg


def test_label_is_not_a_dataset_key(tiny_raw):
    msg = error_of(tiny_raw(dataset={"name": "digits", "label": "d"}))
    assert "unknown key 'label'" in msg


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize("section, key, value, expected", [
    ("training", "lr", "x", "lr must be float, got 'x'"),
    ("training", "epochs", 1.5, "epochs must be int, got 1.5"),
    ("training", "epochs", True, "epochs must be int, got True"),  # bool is not an int
    ("training", "lr", True, "lr must be float, got True"),
    ("training", "optimizer", "rmsprop", "optimizer must be 'sgd'|'adam', got 'rmsprop'"),
    ("model", "hidden", 3, "hidden must be list[int], got 3"),
    ("model", "hidden", [32, "64"], "hidden must be list[int]"),
    ("model", "multi_head", 1, "multi_head must be bool, got 1"),
    ("scenario", "n_experiences", "2", "n_experiences must be int, got '2'"),
    ("dataset", "test_fraction", "0.3", "test_fraction must be float"),
])
def test_wrong_type_names_key_and_expected_type(tiny_raw, section, key, value, expected):
    raw = tiny_raw()
    raw[section][key] = value
    msg = error_of(raw)
    assert f"[{section}]" in msg
    assert expected in msg


def test_wrong_type_in_strategy(tiny_raw):
    raw = tiny_raw()
    raw["strategies"][1]["buffer_size"] = 2.5
    assert "buffer_size must be int, got 2.5" in error_of(raw)


@pytest.mark.parametrize("seeds", [[1.5], [], [True], "0", 0])
def test_bad_seeds(tiny_raw, seeds):
    assert "seeds must be a non-empty list of integers" in error_of(tiny_raw(seeds=seeds))


def test_bad_seeds_from_the_command_line_are_checked_too(tiny_raw):
    assert "seeds must be" in error_of(tiny_raw(), seeds=[])


def test_name_must_be_a_non_empty_string(tiny_raw):
    assert "name must be a non-empty string" in error_of(tiny_raw(name=""))
    assert "name must be a non-empty string" in error_of(tiny_raw(name=3))


def test_int_accepted_for_float_and_converted(tiny_raw):
    raw = tiny_raw()
    raw["training"]["lr"] = 1
    raw["training"]["momentum"] = 0
    config = build_experiment(raw)
    assert config.training.lr == 1.0 and type(config.training.lr) is float
    assert type(config.training.momentum) is float


def test_validate_rejects_out_of_range_values(tiny_raw):
    raw = tiny_raw()
    raw["training"]["epochs"] = 0
    assert "epochs must be >= 1, got 0" in error_of(raw)
    raw = tiny_raw()
    raw["training"]["lr"] = -0.1
    assert "lr must be > 0, got -0.1" in error_of(raw)
    raw = tiny_raw()
    raw["strategies"][1]["buffer_size"] = 0
    assert "buffer_size must be >= 1, got 0" in error_of(raw)


@pytest.mark.parametrize("section, key, value, message", [
    ("training", "momentum", 1.5, "momentum must be in [0, 1), got 1.5"),
    ("training", "momentum", -0.1, "momentum must be in [0, 1)"),
    ("training", "weight_decay", 2.0, "weight_decay must be in [0, 1)"),
    ("training", "lr_scale", {"head": 0.0}, "lr_scale must be > 0 (each value)"),
    ("model", "hidden", [8, 0], "hidden must be >= 1 (each value), got [8, 0]"),
    ("scenario", "n_experiences", 0, "n_experiences must be in [1, 1000], got 0"),
    ("scenario", "n_experiences", 10**6, "n_experiences must be in [1, 1000]"),
])
def test_declared_ranges_are_enforced(tiny_raw, section, key, value, message):
    raw = tiny_raw()
    raw[section][key] = value
    assert message in error_of(raw)


@pytest.mark.parametrize("where, key", [("training", "momentum"), ("strategies", "alpha"),
                                        ("scenario", "max_angle"), ("dataset", "test_fraction")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_float_must_be_finite(tiny_raw, where, key, bad):
    raw = tiny_raw()
    if where == "strategies":
        raw["strategies"] = [{"name": "lwf", key: bad}]
    elif where == "scenario":
        raw["scenario"] = {"name": "rotated", "n_experiences": 2, key: bad}
    else:
        raw[where][key] = bad
    assert f"{key} must be finite, got {bad}" in error_of(raw)


def test_declared_ranges_are_listed():
    from cl.params import describe_params
    from cl.training import TrainingParams

    ranges = {r["name"]: r["range"] for r in describe_params(TrainingParams)}
    assert ranges["momentum"] == "in [0, 1)" and ranges["lr"] == "> 0" and ranges["epochs"] == ">= 1"
    assert ranges["optimizer"] == ""


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_non_finite_lr_is_rejected(tiny_raw, lr):
    raw = tiny_raw()
    raw["training"]["lr"] = lr
    assert "lr must be" in error_of(raw)


@pytest.mark.parametrize("value", [3, "fast", [1, 2]])
def test_training_must_be_a_table(tiny_raw, value):
    assert "training" in error_of(tiny_raw(training=value))


def test_description_must_be_a_string(tiny_raw):
    assert "description" in error_of(tiny_raw(description=5))


def test_tables_must_be_tables(tiny_raw):
    assert "[scenario] must be a table" in error_of(tiny_raw(scenario="class_incremental"))
    assert "strategies must be a non-empty list of tables" in error_of(tiny_raw(strategies=[]))
    assert "must be a table with a 'name' key" in error_of(tiny_raw(strategies=["er"]))


# ---------------------------------------------------------------- unknown names


@pytest.mark.parametrize("section, known", [
    ("strategies", ["naive", "er", "joint", "cumulative"]),
    ("model", ["mlp", "cnn", "resnet18_reduced"]),
    ("dataset", ["digits", "fashion_mnist", "mnist", "cifar10"]),
    ("scenario", ["class_incremental", "permuted", "rotated", "blurry", "domain_incremental"]),
])
def test_unknown_name_lists_known_names(tiny_raw, section, known):
    raw = tiny_raw()
    table = raw[section][0] if section == "strategies" else raw[section]
    table["name"] = "nope"
    msg = error_of(raw)
    assert "'nope'" in msg and "known:" in msg
    listed = re.search(r"known: ([^(]*)", msg).group(1)
    for name in known:
        assert name in listed


def test_missing_name_lists_known_names(tiny_raw):
    msg = error_of(tiny_raw(model={"hidden": [32]}))
    assert "needs name" in msg and "mlp" in msg and "cnn" in msg


# ---------------------------------------------------------------- missing sections, bad files


@pytest.mark.parametrize("section", ["name", "dataset", "scenario", "model", "strategies"])
def test_missing_required_section(tiny_raw, section):
    msg = error_of(tiny_raw(**{section: None}))
    assert f"missing {section}" in msg
    assert "an experiment needs name, dataset, scenario, model, strategies" in msg


def test_invalid_toml(write_experiment):
    path = write_experiment('name = "x"\n[dataset\nname = "digits"\n')
    with pytest.raises(UserError, match="invalid TOML"):
        load_experiment(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found") as info:
        load_experiment(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)


def test_file_that_is_not_utf8(write_experiment):
    path = write_experiment()
    path.write_bytes(b'name = "\xff\xfe"\n' + path.read_bytes())
    with pytest.raises(UserError):
        load_experiment(path)


def test_path_that_is_a_folder(tmp_path):
    with pytest.raises(UserError):
        load_experiment(tmp_path)


# ---------------------------------------------------------------- --set overrides


def test_set_overrides(write_experiment):
    path = write_experiment()
    config = load_experiment(path, ["training.lr=0.05", "scenario.n_experiences=3", "model.hidden=[16,16]",
                                    "strategies.er.buffer_size=20", "dataset.test_fraction=0.3",
                                    "training.optimizer=adam", "scenario.task_labels=true"])
    assert config.training.lr == 0.05
    assert config.training.optimizer == "adam"  # a bare word is a string
    assert config.scenario.params.n_experiences == 3
    assert config.scenario.params.task_labels is True
    assert config.model.params.hidden == [16, 16]
    assert config.strategies[1].params.buffer_size == 20
    assert config.strategies[1].params.replay_batch_size == 10  # untouched
    assert config.datasets[0].params.test_fraction == 0.3


def test_set_top_level_keys(write_experiment):
    config = load_experiment(write_experiment(), ["seeds=[4, 5]", "name=renamed"])
    assert config.seeds == [4, 5] and config.name == "renamed"


def test_set_adds_a_missing_table(write_experiment, tiny_raw):
    config = load_experiment(write_experiment(tiny_raw(training=None)), ["training.epochs=2"])
    assert config.training.epochs == 2


def test_set_on_every_dataset_table(write_experiment, tiny_raw):
    path = write_experiment(tiny_raw(dataset=[{"name": "digits"}, {"name": "digits", "split_seed": 1}]))
    config = load_experiment(path, ["dataset.test_fraction=0.4"])
    assert [d.params.test_fraction for d in config.datasets] == [0.4, 0.4]


@pytest.mark.parametrize("assignment, expected", [
    ("strategies.nope.x=1", "no strategy 'nope' in this experiment (has: naive, er, joint)"),
    ("strategies.er=1", "use strategies.NAME.key=value"),
    ("training.lr", "expected key=value"),
    ("training.lr=abc", "lr must be float, got 'abc'"),
    ("strategies.er.buffer_size=big", "buffer_size must be int, got 'big'"),
    ("training.nope=1", "unknown key 'nope'"),
    ("name.x=1", "'name' is not a table"),
])
def test_bad_set(write_experiment, assignment, expected):
    with pytest.raises(UserError) as info:
        load_experiment(write_experiment(), [assignment])
    assert expected in str(info.value)


def test_set_with_non_table_strategy_entries(write_experiment):
    path = write_experiment('name = "t"\nstrategies = ["er"]\n[dataset]\nname = "digits"\n'
                            '[scenario]\nname = "class_incremental"\n[model]\nname = "mlp"\n')
    with pytest.raises(UserError):
        load_experiment(path, ["strategies.er.buffer_size=20"])


@pytest.mark.parametrize("text, value", [("0.05", 0.05), ("3", 3), ("true", True), ("[16, 16]", [16, 16]),
                                         ('"adam"', "adam"), ("adam", "adam"), ("/data/x", "/data/x")])
def test_parse_value(text, value):
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


# ---------------------------------------------------------------- strategy labels and selection


def test_duplicate_strategy_without_label(tiny_raw):
    raw = tiny_raw(strategies=[{"name": "er"}, {"name": "er", "buffer_size": 10}])
    msg = error_of(raw)
    assert "'er' appears twice" in msg and "label" in msg


def test_two_er_entries_with_distinct_labels(write_experiment, tiny_raw):
    raw = tiny_raw(strategies=[{"name": "er", "label": "er_small", "buffer_size": 10},
                               {"name": "er", "label": "er_big", "buffer_size": 100}])
    path = write_experiment(raw)
    config = load_experiment(path)
    assert [(s.name, s.label, s.params.buffer_size) for s in config.strategies] == [
        ("er", "er_small", 10), ("er", "er_big", 100)]
    # --set by label targets one entry, by name every entry of that strategy
    config = load_experiment(path, ["strategies.er_big.buffer_size=7"])
    assert [s.params.buffer_size for s in config.strategies] == [10, 7]
    config = load_experiment(path, ["strategies.er.replay_batch_size=3"])
    assert [s.params.replay_batch_size for s in config.strategies] == [3, 3]
    # a label may hold dots (the key follows the last one), quoted or not; a label is matched before names
    raw = tiny_raw(strategies=[{"name": "er", "label": "er-0.5k", "buffer_size": 500},
                               {"name": "der", "label": "er", "buffer_size": 100}])
    path = write_experiment(raw)
    for override in ("strategies.er-0.5k.buffer_size=20", 'strategies."er-0.5k".buffer_size=20'):
        assert [s.params.buffer_size for s in load_experiment(path, [override]).strategies] == [20, 100]
    assert [s.params.buffer_size for s in load_experiment(path, ["strategies.er.buffer_size=7"]).strategies] == [
        500, 7]
    # a label equal to another entry's label is still a duplicate
    assert "appears twice" in error_of(tiny_raw(strategies=[{"name": "naive"}, {"name": "er", "label": "naive"}]))


def test_only_strategies(tiny_raw):
    config = build_experiment(tiny_raw(), only_strategies=["er"])
    assert [s.label for s in config.strategies] == ["er"]
    config = build_experiment(tiny_raw(), only_strategies=["joint", "naive"])
    assert [s.label for s in config.strategies] == ["naive", "joint"]  # file order
    msg = error_of(tiny_raw(), only_strategies=["ewc"])
    assert "--strategy 'ewc' is not in this experiment (has: naive, er, joint)" in msg


def test_only_strategies_uses_labels_then_registered_names(tiny_raw):
    raw = tiny_raw(strategies=[{"name": "er", "label": "er_small", "buffer_size": 10}, {"name": "naive"},
                               {"name": "er", "label": "er_big", "buffer_size": 100}])
    assert [s.label for s in build_experiment(raw, only_strategies=["er_small"]).strategies] == ["er_small"]
    # no label 'er': every strategy registered as er, as --set strategies.er.key does
    assert [s.label for s in build_experiment(raw, only_strategies=["er"]).strategies] == ["er_small", "er_big"]
    assert "exp.toml: --strategy 'der'" in error_of(raw, only_strategies=["der"])


def test_cli_seeds_override_file_seeds(tiny_raw):
    assert build_experiment(tiny_raw(seeds=[0, 1, 2]), seeds=[7]).seeds == [7]


# ---------------------------------------------------------------- data_dir


def test_data_dir_applies_only_to_datasets_with_a_data_dir(tiny_raw, tmp_path):
    raw = tiny_raw(dataset=[{"name": "fashion_mnist"}, {"name": "digits"}, {"name": "mnist", "data_dir": "x"}])
    config = build_experiment(raw, data_dir=str(tmp_path))
    fashion, digits, mnist = config.datasets
    assert fashion.params.data_dir == str(tmp_path)
    assert mnist.params.data_dir == str(tmp_path)  # overrides the file
    assert not hasattr(digits.params, "data_dir")  # digits has no data_dir and is not given one


def test_data_dir_for_digits_only_is_refused(tiny_raw):
    with pytest.raises(UserError, match="dataset 'digits' reads no files"):
        build_experiment(tiny_raw(), data_dir="/nowhere")


def test_data_dir_is_not_part_of_the_run_identity(tiny_raw):
    raw = tiny_raw(dataset={"name": "fashion_mnist"})
    a = build_experiment(raw, data_dir="/a")
    b = build_experiment(raw, data_dir="/b")
    assert a.setup() != b.setup()
    assert a.setup_identity() == b.setup_identity()
    assert "data_dir" not in a.setup_identity()["datasets"][0]


# ---------------------------------------------------------------- [transforms], tables of values, required keys


def test_transforms_table_is_optional_and_validated(tiny_raw):
    assert build_experiment(tiny_raw()).transforms == TransformParams()
    config = build_experiment(tiny_raw(transforms={"crop_padding": 2, "horizontal_flip": True,
                                                   "normalize": True, "mean": [0.5], "std": [0.25]}))
    assert config.transforms.augments and config.setup()["transforms"]["mean"] == [0.5]
    assert "valid keys: resize (list[int])" in error_of(tiny_raw(transforms={"flip": True}))
    assert "resize must be [height, width]" in error_of(tiny_raw(transforms={"resize": [32]}))
    assert "set normalize = true" in error_of(tiny_raw(transforms={"mean": [0.5], "std": [0.2]}))


def test_training_tables_of_values(tiny_raw):
    config = build_experiment(tiny_raw(training={"lr_scale": {"head": 10, "features": 0.5}}))
    assert config.training.lr_scale == {"head": 10.0, "features": 0.5}  # ints converted to float
    assert "lr_scale must be table of float" in error_of(tiny_raw(training={"lr_scale": {"head": "x"}}))
    assert "lr_scale must be > 0 (each value)" in error_of(tiny_raw(training={"lr_scale": {"head": 0}}))
    assert "optimizer_policy must be 'reset'|'keep'" in error_of(tiny_raw(training={"optimizer_policy": "x"}))


def test_required_parameter_missing_is_a_one_line_error():
    import dataclasses

    from cl.params import build_params, describe_params, param, required

    @dataclasses.dataclass
    class Needs:
        strength: float = required("regularisation strength; no default fits every scale")
        decay: float = param(0.9, "decay")

    with pytest.raises(UserError) as info:
        build_params(Needs, {"decay": 0.5}, "strategy 'x'")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("strategy 'x': missing required parameter strength (float: regularisation strength")
    assert "add strength = ... to its table" in message
    assert build_params(Needs, {"strength": 2}, "strategy 'x'").strength == 2.0
    assert [r["required"] for r in describe_params(Needs)] == [True, False]


def test_defaults_a_file_does_not_set_pass_the_same_checks_and_blame_the_declaration():
    import dataclasses

    from cl.params import build_params, param

    @dataclasses.dataclass
    class Declared:
        size: int = param(8, "a size", low=1)
        ratio: float = param(1, "a ratio")

    built = build_params(Declared, {}, "strategy 'x'")
    assert built.ratio == 1.0 and isinstance(built.ratio, float)  # converted like a value from a file

    @dataclasses.dataclass
    class WrongType:
        size: int = param("lots", "a size")

    @dataclasses.dataclass
    class OutOfRange:
        size: int = param(-5, "a size", low=1)

    declared = f"{__name__}.test_defaults_a_file_does_not_set_pass_the_same_checks_and_blame_the_declaration"
    with pytest.raises(UserError, match=re.escape(f"the default of size ('lots') is not int; fix its declaration "
                                                  f"in {declared}.<locals>.WrongType")):
        build_params(WrongType, {}, "strategy 'x'")
    with pytest.raises(UserError, match=r"size must be >= 1, got -5 \(its default; fix its declaration in .*OutOfRange"):
        build_params(OutOfRange, {}, "strategy 'x'")
    assert build_params(OutOfRange, {"size": 3}, "strategy 'x'").size == 3  # a file's value replaces it


def test_a_field_that_declares_its_file_key_is_known_by_that_key_everywhere():
    """`key="class"` (a Python keyword): files, `cl list` and every error use the key, never the field name."""
    import dataclasses

    from cl.params import build_params, describe_params, param, params_to_dict, required

    @dataclasses.dataclass
    class Keyed:
        class_name: str = required("a class", key="class")
        size: int = param(2, "a size", low=1)

    built = build_params(Keyed, {"class": "Naive"}, "strategy 'x'")
    assert built.class_name == "Naive"
    assert params_to_dict(built) == {"class": "Naive", "size": 2}  # what run records store
    assert build_params(Keyed, params_to_dict(built), "strategy 'x'") == built
    assert [r["name"] for r in describe_params(Keyed)] == ["class", "size"]
    for values, message in [({"clas": "Naive"}, "unknown key 'clas'; valid keys: class (str), size (int)"),
                            ({"class_name": "Naive"}, "unknown key 'class_name'; valid keys: class (str)"),
                            ({"class": 3}, "class must be str, got 3"),
                            ({}, "missing required parameter class (str: a class); add class = ... to its table")]:
        with pytest.raises(UserError, match=re.escape(f"strategy 'x': {message}")):
            build_params(Keyed, values, "strategy 'x'")


def test_names_longer_than_the_store_takes_are_refused(tiny_raw):
    """PostgreSQL refuses text longer than the store's columns: such a run trained and could never be stored."""
    assert build_experiment(tiny_raw(name="e" * 200, strategies=[{"name": "naive", "label": "l" * 100}]))
    assert "name is 201 characters long; the result store takes at most 200" in error_of(tiny_raw(name="e" * 201))
    assert "label is 101 characters long; the result store takes at most 100" in error_of(
        tiny_raw(strategies=[{"name": "naive", "label": "l" * 101}]))
