"""Experiment files: TOML tables naming a dataset, a scenario, a model, training and strategies.

    name = "quickstart"
    seeds = [0, 1, 2]
    [dataset]            # or [[dataset]] several times for domain-incremental scenarios
    name = "fashion_mnist"
    [scenario]
    name = "class_incremental"
    n_experiences = 5
    [model]
    name = "mlp"
    [training]
    epochs = 1
    [transforms]         # optional input pipeline: resize, augmentation, normalisation
    normalize = true
    [divergence]         # optional: when a run counts as diverged (cl/divergence.py)
    factor = 10.0
    [validation]         # optional: the held-out share cl sweep evaluates on (cl/validation.py)
    fraction = 0.1
    [[strategies]]
    name = "er"
    buffer_size = 500

Every table is validated against the registered parameters of what it names;
unknown keys and wrong types raise a UserError that lists the valid keys.
"""
from __future__ import annotations

import copy
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from cl.divergence import DivergenceParams
from cl.errors import UserError
from cl.params import build_params, params_to_dict
from cl.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES, Registry
from cl.training import TrainingParams
from cl.transforms import TransformParams
from cl.validation import ValidationParams

TOP_LEVEL = {"name": "str", "description": "str", "seeds": "list[int]", "dataset": "table or list of tables",
             "scenario": "table", "model": "table", "training": "table", "transforms": "table",
             "divergence": "table", "validation": "table", "strategies": "list of tables"}
REQUIRED = ("name", "dataset", "scenario", "model", "strategies")
# Keys that do not change results and so do not enter a run's identity.
NON_RESULT_KEYS = {"data_dir"}
# The result store's column widths (cl/store.py): PostgreSQL refuses longer text, so longer names are
# refused here, before a run trains that could never be stored.
MAX_NAME = 200  # experiment names, sweep study names
MAX_LABEL = 100  # strategy labels


@dataclasses.dataclass
class Component:
    """A registered thing chosen by name, with validated parameters."""

    name: str
    params: Any
    label: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **params_to_dict(self.params)}


@dataclasses.dataclass
class ExperimentConfig:
    name: str
    description: str
    seeds: list[int]
    datasets: list[Component]
    scenario: Component
    model: Component
    training: TrainingParams
    transforms: TransformParams
    strategies: list[Component]
    source: str = ""
    divergence: DivergenceParams = dataclasses.field(default_factory=DivergenceParams)
    validation: ValidationParams = dataclasses.field(default_factory=ValidationParams)
    # "test": train on the training experiences, evaluate on the test stream (cl run); "validation":
    # train on them minus the [validation] share, evaluate on that share (cl sweep; cl/validation.py).
    evaluated_on: str = "test"

    def setup(self) -> dict[str, Any]:
        """Everything but strategies and seeds, as JSON-able data (stored with each run)."""
        setup = {"datasets": [d.as_dict() for d in self.datasets], "scenario": self.scenario.as_dict(),
                 "model": self.model.as_dict(), "training": dataclasses.asdict(self.training),
                 "transforms": dataclasses.asdict(self.transforms), "divergence": dataclasses.asdict(self.divergence),
                 "evaluated_on": self.evaluated_on}
        if self.evaluated_on == "validation":
            setup["validation"] = dataclasses.asdict(self.validation)
        return setup

    def setup_identity(self) -> dict[str, Any]:
        setup = copy.deepcopy(self.setup())
        for d in setup["datasets"]:
            for key in NON_RESULT_KEYS:
                d.pop(key, None)
        return setup


def _component(registry: Registry, table: Any, where: str, allow_label: bool = False) -> Component:
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table with a 'name' key, got {table!r}")
    values = dict(table)
    name = values.pop("name", None)
    if not isinstance(name, str):
        raise UserError(f"{where} needs name = \"...\"; known: {', '.join(registry.names())}")
    label = values.pop("label", name) if allow_label else name
    if len(str(label)) > MAX_LABEL:
        raise UserError(f"{where}: label is {len(str(label))} characters long; the result store takes at most "
                        f"{MAX_LABEL}: shorten it")
    entry = registry.get(name)
    return Component(name, build_params(entry.params, values, f"{where} {name!r}"), str(label))


def parse_value(text: str) -> Any:
    """A --set value: TOML syntax (numbers, true/false, [lists], "strings"), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `--set section.key=value` to the raw TOML dict.

    `strategies.NAME.key=v` targets the strategy labelled NAME (a label may hold dots: the key is
    what follows the last one), or, when no label is NAME, every strategy registered as NAME;
    `dataset.key=v` targets every dataset table.
    """
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key=value, e.g. training.lr=0.05")
    path, _, text = assignment.partition("=")
    path = path.strip()
    keys = path.split(".")
    value = parse_value(text.strip())
    if keys[0] == "strategies":
        strategies = raw.get("strategies", [])
        if not all(isinstance(s, dict) for s in strategies):
            raise UserError("strategies must be a list of tables ([[strategies]] with name = ...)")
        label, _, key = path.partition(".")[2].rpartition(".")
        label = label.strip("\"'")
        if not label or not key:
            raise UserError(f"--set {assignment!r}: use strategies.NAME.key=value")
        targets = ([s for s in strategies if s.get("label", s.get("name")) == label]
                   or [s for s in strategies if s.get("name") == label])
        if not targets:
            names = ", ".join(str(s.get("label", s.get("name"))) for s in raw.get("strategies", []))
            raise UserError(f"--set {assignment!r}: no strategy {label!r} in this experiment (has: {names})")
        for s in targets:
            s[key] = value
        return
    if keys[0] == "dataset" and len(keys) == 2:
        tables = raw.get("dataset", {})
        tables = tables if isinstance(tables, list) else [tables]
        if not all(isinstance(t, dict) for t in tables):
            raise UserError("dataset must be a table ([dataset] with name = ...) or a list of tables")
        for table in tables:
            table[keys[1]] = value
        return
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {assignment!r}: {key!r} is not a table")
    node[keys[-1]] = value


def read_toml(path: Path, what: str, hint: str) -> dict[str, Any]:
    """A TOML file's table; a one-line UserError (naming `what`, with `hint` when missing) otherwise."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {str(path)!r} not found; {hint}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None


def load_experiment(path: str | Path, overrides: list[str] = (), seeds: list[int] | None = None,
                    data_dir: str | None = None, only_strategies: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    raw = read_toml(path, "experiment file", "see experiments/ for examples")
    for assignment in overrides:
        apply_override(raw, assignment)
    return build_experiment(raw, str(path), seeds=seeds, data_dir=data_dir, only_strategies=only_strategies)


def build_experiment(raw: dict[str, Any], source: str = "<dict>", seeds: list[int] | None = None,
                     data_dir: str | None = None, only_strategies: list[str] | None = None) -> ExperimentConfig:
    where = source
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        valid = ", ".join(f"{k} ({v})" for k, v in TOP_LEVEL.items())
        raise UserError(f"{where}: unknown key {', '.join(map(repr, unknown))}; valid keys: {valid}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}; an experiment needs {', '.join(REQUIRED)}")
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: name must be a non-empty string")
    if len(name) > MAX_NAME:
        raise UserError(f"{where}: name is {len(name)} characters long; the result store takes at most {MAX_NAME}: "
                        f"shorten it")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{where}: description must be a string, got {description!r}")
    seed_list = seeds if seeds is not None else raw.get("seeds", [0])
    if not (isinstance(seed_list, list) and seed_list
            and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in seed_list)):
        raise UserError(f"{where}: seeds must be a non-empty list of integers in [0, 2**63), got {seed_list!r}")
    repeated = sorted({s for s in seed_list if seed_list.count(s) > 1})
    if repeated:
        raise UserError(f"{where}: seed {repeated[0]} is listed twice; a seed names one run, list each once")

    dataset_tables = raw["dataset"] if isinstance(raw["dataset"], list) else [raw["dataset"]]
    if data_dir is not None:
        readers = [t for t in dataset_tables if isinstance(t, dict) and _takes_data_dir(t)]
        if not readers:
            names = ", ".join(repr(t.get("name")) for t in dataset_tables if isinstance(t, dict))
            raise UserError(f"--data-dir was given, but dataset {names} reads no files (it is packaged or "
                            f"generated); drop --data-dir")
        for table in readers:
            table["data_dir"] = data_dir
    datasets = [_component(DATASETS, t, f"{where}: [dataset]") for t in dataset_tables]
    scenario = _component(SCENARIOS, raw["scenario"], f"{where}: [scenario]")
    model = _component(MODELS, raw["model"], f"{where}: [model]")
    training = build_params(TrainingParams, raw.get("training", {}), f"{where}: [training]")
    transforms = build_params(TransformParams, raw.get("transforms", {}), f"{where}: [transforms]")
    divergence = build_params(DivergenceParams, raw.get("divergence", {}), f"{where}: [divergence]")
    validation = build_params(ValidationParams, raw.get("validation", {}), f"{where}: [validation]")

    tables = raw["strategies"]
    if not isinstance(tables, list) or not tables:
        raise UserError(f"{where}: strategies must be a non-empty list of tables ([[strategies]])")
    strategies = [_component(STRATEGIES, t, f"{where}: [[strategies]]", allow_label=True) for t in tables]
    labels = [s.label for s in strategies]
    dupes = sorted({l for l in labels if labels.count(l) > 1})
    if dupes:
        raise UserError(f"{where}: strategy {dupes[0]!r} appears twice; give each a distinct label = \"...\"")
    if only_strategies:
        missing = [n for n in only_strategies if not select_strategies(strategies, [n])]
        if missing:
            raise UserError(f"{where}: --strategy {missing[0]!r} is not in this experiment (has: {', '.join(labels)})")
        strategies = select_strategies(strategies, only_strategies)
    return ExperimentConfig(name, description, list(seed_list), datasets, scenario, model, training, transforms,
                            strategies, source, divergence, validation)


def select_strategies(strategies: list[Component], names: list[str]) -> list[Component]:
    """The strategies `--strategy NAME ...` selects, in file order: for each NAME the one labelled NAME, or,
    when no label is NAME, every strategy registered as NAME (the rule of `--set strategies.NAME.key`)."""
    chosen = set()
    for name in names:
        by_label = [i for i, s in enumerate(strategies) if s.label == name]
        chosen.update(by_label or [i for i, s in enumerate(strategies) if s.name == name])
    return [s for i, s in enumerate(strategies) if i in chosen]


def _takes_data_dir(table: dict[str, Any]) -> bool:
    name = table.get("name")
    return isinstance(name, str) and any(f.name == "data_dir" for f in dataclasses.fields(DATASETS.get(name).params))
