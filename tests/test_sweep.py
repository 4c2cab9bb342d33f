"""Sweeps (cl/sweep.py, `cl sweep`) and the validation split they evaluate on (cl/validation.py)."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from cl.cli import main
from cl.data import Experience, Scenario
from cl.errors import UserError
from cl.registry import DATASETS
from cl.runner import check_experiment
from cl.store import ResultStore
from cl.sweep import RunningAccuracyPruner, counts_towards, open_study, prepare_sweep, work
from cl.validation import stratified_split, validation_scenario
from tests.postgres_server import postgres_server, postgres_unavailable

CPU = torch.device("cpu")
EXPERIMENT = """
name = "digits-sweep"
seeds = [0, 1]
[dataset]
name = "digits"
[scenario]
name = "class_incremental"
n_experiences = {experiences}
[model]
name = "mlp"
hidden = [32]
[training]
epochs = {epochs}
lr = {{low = 0.02, high = 0.2, log = true}}
[validation]
fraction = 0.2
[[strategies]]
name = "der_pp"
buffer_size = 100
alpha = {{low = 0.05, high = 1.0}}
beta = {{low = 0.05, high = 1.0}}
[[strategies]]
name = "naive"
"""


def experiment_file(tmp_path: Path, experiences: int = 5, epochs: int = 1, text: str = EXPERIMENT) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text.format(experiences=experiences, epochs=epochs))
    return path


def sweep_of(path: Path, tmp_path: Path, study: str = "s", **options):
    return prepare_sweep(path, [], None, options.pop("metric", "acc"), None,
                         options.pop("storage", f"sqlite:///{tmp_path / 'sweeps.db'}"), study,
                         f"sqlite:///{tmp_path / 'cl.db'}")


def run_sweep(tmp_path: Path, path: Path, trials: int, study: str, stack: int = 1, pruner: str = "none"):
    sweep = sweep_of(path, tmp_path, study)
    study_ = open_study(sweep, pruner)
    work(sweep, study_, check_experiment(sweep.first_config(), CPU), trials, ResultStore(f"sqlite:///{tmp_path / 'cl.db'}"), CPU, stack=stack, progress=False,
         log=lambda _: None)
    return study_


# ---------------------------------------------------------------- the validation split


def test_stratified_split_holds_out_each_class_share():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)
    train, validation = stratified_split(y, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(torch.sort(torch.cat([train, validation])).values, torch.arange(len(y)))  # a partition
    assert torch.equal(train, torch.sort(train).values) and torch.equal(validation, torch.sort(validation).values)
    held = y[validation].tolist()
    # 0.2 * 10 = 2 of class 0; round(0.2 * 5) = 1 of class 1; a single sample stays in training; 1 of 2.
    assert [held.count(c) for c in range(4)] == [2, 1, 0, 1]
    again, _ = stratified_split(y, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(train, again)


def test_validation_scenario_replaces_the_test_stream_and_keeps_shared_data_shared():
    x = torch.arange(40, dtype=torch.float32).view(20, 2)
    y = torch.tensor([0, 1] * 10)
    train = [Experience(i, x, y, i, torch.tensor([0, 1])) for i in range(3)]  # one stored copy, 3 views
    test = [Experience(i, x[:4], y[:4], i, torch.tensor([0, 1])) for i in range(3)]
    described = [{"classes": [0, 1], "n_train": 20, "n_test": 4}] * 3
    scenario = Scenario(train, test, 2, "domain-il", False, {"name": "toy", "experiences": described})
    carved = validation_scenario(scenario, 0.3, seed=7)
    # the record's description gives the sizes trained and evaluated on (it kept 20 and 4)
    assert carved.description["experiences"] == [{"classes": [0, 1], "n_train": 14, "n_test": 6}] * 3
    assert [len(e) for e in carved.train] == [14] * 3 and [len(e) for e in carved.test] == [6] * 3
    assert all(e.x is carved.train[0].x for e in carved.train)  # still one copy
    held = set(carved.test[0].x[:, 0].tolist())
    assert held.isdisjoint(carved.train[0].x[:, 0].tolist())
    assert sorted(carved.test[0].y.tolist()) == [0, 0, 0, 1, 1, 1]  # stratified
    assert carved.description["evaluated_on"] == "validation" and scenario.test[0] is test[0]
    assert set(validation_scenario(scenario, 0.3, seed=8).test[0].x[:, 0].tolist()) != held


def test_a_validation_split_of_one_sample_per_class_says_no_fraction_can_help():
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 2, 3])
    scenario = Scenario([Experience(0, x, y, 0, torch.arange(4))], [Experience(0, x, y, 0, torch.arange(4))], 4,
                        "class-il", False, {"name": "toy"})
    for fraction in (0.1, 0.9):  # it used to say "raise validation.fraction", which changes nothing here
        with pytest.raises(UserError, match=re.escape("experience 1 has a single training sample of each of its "
                                                      "classes (4 samples), so [validation] can hold none out")):
            validation_scenario(scenario, fraction, seed=0)


# ---------------------------------------------------------------- the search space


def test_search_space_is_read_from_the_strategy_and_training_tables(tmp_path):
    sweep = sweep_of(experiment_file(tmp_path), tmp_path)
    kinds = {d.name: (d.kind, d.changes_no_shape) for d in sweep.dimensions}
    assert kinds == {"alpha": ("float", True), "beta": ("float", True), "training.lr": ("float", True)}
    config = sweep.config({"alpha": 0.3, "beta": 0.7, "training.lr": 0.05})
    assert config.evaluated_on == "validation" and config.seeds == [0]
    assert [s.name for s in config.strategies] == ["der_pp"]
    assert (config.strategies[0].params.alpha, config.training.lr) == (0.3, 0.05)
    assert sweep.study_name == "s" and sweep.direction == "maximize"


@pytest.mark.parametrize("replace, message", [
    ('alpha = {low = 0.05, high = 1.0}', "nothing to sweep"),
    ('alpha = {low = 1.0, high = 0.5}', "low < high"),
    ('alpha = {lo = 0.1, high = 0.5}', "unknown key 'lo'"),
    ('alpha = {low = 0.0, high = 0.5, log = true}', "log scale needs low > 0"),
    ('alpha = {choices = []}', "non-empty list"),
    ('alpha = {low = -1.0, high = 0.5}', "alpha"),  # below the parameter's range: refused before training
])
def test_bad_search_spaces_are_refused_in_one_line(tmp_path, replace, message):
    text = EXPERIMENT.replace('alpha = {{low = 0.05, high = 1.0}}', replace.replace("{", "{{").replace("}", "}}"))
    if message == "nothing to sweep":
        text = text.replace('alpha = {{low = 0.05, high = 1.0}}', "").replace(
            'beta = {{low = 0.05, high = 1.0}}', "").replace('lr = {{low = 0.02, high = 0.2, log = true}}', "")
    with pytest.raises(UserError, match=message):
        sweep_of(experiment_file(tmp_path, text=text), tmp_path)


def test_a_study_name_longer_than_the_store_takes_is_refused(tmp_path):
    path = experiment_file(tmp_path)
    assert sweep_of(path, tmp_path, study="s" * 200).study_name == "s" * 200
    with pytest.raises(UserError, match="is 201 characters long; the result store takes at most 200"):
        sweep_of(path, tmp_path, study="s" * 201)


def test_buffer_size_choices_are_a_shape_dimension(tmp_path):
    text = EXPERIMENT.replace("buffer_size = 100", "buffer_size = {{choices = [50, 100]}}")
    sweep = sweep_of(experiment_file(tmp_path, text=text), tmp_path)
    (buffer,) = [d for d in sweep.dimensions if d.name == "buffer_size"]
    assert buffer.kind == "categorical" and not buffer.changes_no_shape
    assert sweep.stack_key({"alpha": 0.1, "beta": 0.2, "training.lr": 0.1, "buffer_size": 50}) == (50,)


def test_a_whole_number_range_with_a_fractional_step_is_a_float_range(tmp_path):
    text = EXPERIMENT.replace("alpha = {{low = 0.05, high = 1.0}}", "alpha = {{low = 0, high = 1, step = 0.25}}")
    sweep = sweep_of(experiment_file(tmp_path, text=text), tmp_path)
    (alpha,) = [d for d in sweep.dimensions if d.name == "alpha"]
    assert alpha.kind == "float" and alpha.extremes() == [0.0, 1.0] and alpha.changes_no_shape
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = {alpha.suggest(study.ask()) for _ in range(40)}
    assert drawn == {0.0, 0.25, 0.5, 0.75, 1.0}  # the step as written, not int(0.25) = 0
    text = EXPERIMENT.replace("buffer_size = 100", "buffer_size = {{low = 20, high = 60, step = 2.5}}")
    with pytest.raises(UserError, match="buffer_size"):  # an int parameter refuses the float values
        sweep_of(experiment_file(tmp_path, text=text), tmp_path)


@pytest.mark.parametrize("line, before, after", [
    ("buffer_size = 100", "buffer_size = {{low = 20, high = 60}}", "buffer_size = {{low = 20, high = 60, step = 20}}"),
    ("alpha = {{low = 0.05, high = 1.0}}", "alpha = {{low = 0, high = 1}}", "alpha = {{low = 0.0, high = 1.0}}"),
])
def test_a_study_refuses_a_search_space_that_differs_only_in_step_or_kind(tmp_path, line, before, after):
    """Both pairs read the same as text ("alpha in [0, 1]"), yet draw different values."""
    open_study(sweep_of(experiment_file(tmp_path, text=EXPERIMENT.replace(line, before)), tmp_path))
    with pytest.raises(UserError, match="sweeps another setup"):
        open_study(sweep_of(experiment_file(tmp_path, text=EXPERIMENT.replace(line, after)), tmp_path))


@pytest.mark.parametrize("metric, options, message", [
    ("forgetting", {"strategy": "joint"}, "trains on every experience at once"),
    ("bwt", {"experiences": 1}, "at least 2 experiences, and the scenario has 1"),
])
def test_a_metric_the_runs_cannot_have_is_refused_before_anything_trains(tmp_path, capsys, metric, options,
                                                                        message):
    label = options.get("strategy", "der_pp")
    text = EXPERIMENT.split("[[strategies]]")[0] + f'[[strategies]]\nname = "{label}"\n' if label != "der_pp" \
        else EXPERIMENT  # [training]'s lr is the space: every strategy of the file is swept
    path = experiment_file(tmp_path, experiences=options.get("experiences", 3), text=text)
    assert main(["sweep", str(path), "--strategy", label, "--trials", "1", "--metric", metric,
                 "--store", f"sqlite:///{tmp_path / 'cl.db'}"]) == 2
    err = capsys.readouterr().err
    assert f"--metric {metric}: {label}'s runs have none here" in err and message in err
    assert "choose one of acc" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cl.db").exists() and not (tmp_path / "sweeps.db").exists()


# ---------------------------------------------------------------- trials


def test_stacked_trials_give_the_values_of_the_trials_run_one_by_one(tmp_path):
    path = experiment_file(tmp_path)
    stacked = run_sweep(tmp_path, path, 4, "stacked", stack=4)
    alone = run_sweep(tmp_path, path, 4, "alone", stack=1)
    by_number = lambda s: sorted(s.trials, key=lambda t: t.number)  # noqa: E731
    for a, b in zip(by_number(stacked), by_number(alone)):
        assert a.state == b.state == TrialState.COMPLETE
        assert a.params == b.params
        assert a.value == pytest.approx(b.value, abs=0.01)
    values = [t.value for t in stacked.trials]
    assert len(set(values)) > 1 and max(values) > 0.3  # different trials, and they learned
    store = ResultStore(f"sqlite:///{tmp_path / 'cl.db'}")
    runs = store.records(study="stacked")
    assert sorted(r.sweep["trial"] for r in runs) == [0, 1, 2, 3]
    assert {r.budgets.stacked_runs for r in runs} == {4}
    assert {r.evaluated_on for r in runs} == {"validation"}


def test_a_continued_study_draws_new_trials(tmp_path):
    """Raising --trials (or restarting after a kill) continues the study: the trials it adds are new
    draws, not the study's first trials again. A new study with the same seed draws the same trials."""
    path = experiment_file(tmp_path, experiences=2)
    run_sweep(tmp_path, path, 2, "continued")
    study = run_sweep(tmp_path, path, 4, "continued")
    params = [t.params for t in sorted(study.trials, key=lambda t: t.number)]
    assert len(params) == 4 and params[2] not in params[:2] and params[3] not in params[:2]
    again = run_sweep(tmp_path, path, 2, "again")
    assert [t.params for t in sorted(again.trials, key=lambda t: t.number)] == params[:2]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_workers_started_together_never_draw_the_same_trials(tmp_path):
    """Two hosts' workers opening a new study at one moment with one seed: the random trials they draw
    differ (each trial's draws come from its number, which the storage hands out once); drawn again in a
    new study, they are the same."""
    path = experiment_file(tmp_path, experiences=2)
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}

    def draws(study_name):
        hosts = [open_study(sweep_of(path, tmp_path, study_name)) for _ in range(2)]  # both see 0 trials
        return [host.ask(space).params["x"] for _ in range(3) for host in hosts]

    first = draws("together")
    assert len(set(first)) == 6
    assert draws("again") == first


def test_the_objective_never_reads_the_test_stream(tmp_path, monkeypatch):
    """Poison the test labels: a sweep's values do not move (a test run's do)."""
    path = experiment_file(tmp_path, experiences=3)
    clean = run_sweep(tmp_path, path, 3, "clean")
    entry = DATASETS.get("digits")
    load = entry.obj

    def poisoned(p):
        data = load(p)
        return dataclasses.replace(data, y_test=(data.y_test + 1) % data.n_classes)

    monkeypatch.setattr(entry, "obj", poisoned)
    dirty = run_sweep(tmp_path, path, 3, "poisoned")
    assert [t.params for t in clean.trials] == [t.params for t in dirty.trials]
    assert [t.value for t in clean.trials] == [t.value for t in dirty.trials]
    values = [t.value for t in dirty.trials]
    assert min(values) > 0.15 and max(values) > 0.5  # above chance (0.1), and some trial learned well


def test_the_median_pruner_compares_the_accuracy_at_the_step_not_the_best_so_far():
    """Continual accuracy falls as experiences accumulate: a trial at 0.95 after its first experience and
    0.3 after its second, against finished trials at 0.6 there, is pruned (Optuna's MedianPruner compares
    its best, 0.95, and kept it)."""
    study = optuna.create_study(direction="maximize")
    for value in (0.5, 0.6, 0.6, 0.7):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={1: 0.9, 2: value}))
    falling = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values={1: 0.95, 2: 0.3})
    assert RunningAccuracyPruner(n_startup_trials=4, n_warmup_steps=2).prune(study, falling)
    assert not optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2).prune(study, falling)
    good = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values={1: 0.8, 2: 0.65})
    assert not RunningAccuracyPruner(n_startup_trials=4, n_warmup_steps=2).prune(study, good)
    early = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values={1: 0.1})
    assert not RunningAccuracyPruner(n_startup_trials=4, n_warmup_steps=2).prune(study, early)  # warm-up
    assert not RunningAccuracyPruner(n_startup_trials=5, n_warmup_steps=2).prune(study, falling)  # 4 finished


def test_pruned_trials_are_stored_as_pruned(tmp_path):
    path = experiment_file(tmp_path)
    study = run_sweep(tmp_path, path, 10, "pruned", stack=1, pruner="median")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) >= 1, states
    store = ResultStore(f"sqlite:///{tmp_path / 'cl.db'}")
    by_trial = {r.sweep["trial"]: r for r in store.records(study="pruned")}
    for trial in study.trials:
        if trial.state == TrialState.PRUNED:
            record = by_trial[trial.number]
            assert record.status == "pruned" and record.metrics.acc is None
            assert "pruned by the sweep after experience" in record.failure["reason"]


# ---------------------------------------------------------------- workers, storage, CLI


def cl_sweep(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cl.cli", "sweep", *args, "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def check_study(study: optuna.Study, store: ResultStore, name: str, trials: int) -> None:
    """Exactly `trials` finished trials, one stored run per complete trial, none lost or duplicated."""
    counted = [t for t in study.trials if counts_towards(t)]
    assert len(counted) == trials and all(t.state != TrialState.RUNNING for t in counted)
    records = store.records(study=name)
    numbers = [r.sweep["trial"] for r in records]
    assert len(numbers) == len(set(numbers))  # no trial stored twice
    complete = {t.number for t in study.trials if t.state == TrialState.COMPLETE}
    assert complete == {r.sweep["trial"] for r in records if r.status == "completed"}
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            (record,) = [r for r in records if r.sweep["trial"] == t.number]
            assert record.id == t.user_attrs["run_id"] and record.metrics.acc == pytest.approx(t.value)


def test_two_workers_on_sqlite_finish_exactly_the_requested_trials(tmp_path):
    path = experiment_file(tmp_path, experiences=3)
    storage, store = f"sqlite:///{tmp_path / 'sweeps.db'}", f"sqlite:///{tmp_path / 'cl.db'}"
    process = cl_sweep(str(path), "--strategy", "der_pp", "--trials", "6", "--workers", "2", "--stack", "2",
                       "--storage", storage, "--store", store, "--study", "two")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    sweep = sweep_of(path, tmp_path, "two", storage=storage)
    check_study(open_study(sweep, create=False), ResultStore(store), "two", 6)
    assert "study two: " in output.splitlines()[-1]


def test_best_writes_an_experiment_for_cl_run_and_report_plots(tmp_path, capsys):
    path = experiment_file(tmp_path, experiences=3)
    run_sweep(tmp_path, path, 3, "s")
    common = [str(path), "--strategy", "der_pp", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'sweeps.db'}",
              "--store", f"sqlite:///{tmp_path / 'cl.db'}"]
    assert main(["sweep", *common, "--best", "--out", str(tmp_path / "best.toml")]) == 0
    from cl.config import load_experiment

    best = load_experiment(tmp_path / "best.toml")
    study = open_study(sweep_of(path, tmp_path), create=False)
    assert [s.name for s in best.strategies] == ["der_pp"] and best.seeds == [0, 1]
    assert best.strategies[0].params.alpha == study.best_params["alpha"]
    assert best.training.lr == study.best_params["training.lr"] and best.evaluated_on == "test"
    assert main(["sweep", *common, "--report", "--out", str(tmp_path / "report")]) == 0
    for name in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / "report" / name).stat().st_size > 10_000
    assert main(["sweep", *common[:-2], "--store", f"sqlite:///{tmp_path / 'cl.db'}", "--metric", "forgetting",
                 "--trials", "1"]) == 2  # the study sweeps acc
    assert "sweeps another setup (metric: 'acc' -> 'forgetting')" in capsys.readouterr().err
    for override, changed in [("model.hidden=[16]", "setup.model.hidden: [32] -> [16]"),
                              ("validation.fraction=0.3", "setup.validation.fraction: 0.2 -> 0.3"),
                              ("strategies.der_pp.buffer_size=50", "strategy.buffer_size: 100 -> 50")]:
        assert main(["sweep", *common, "--trials", "4", "--set", override]) == 2  # not mixed into the study
        assert f"another setup ({changed})" in capsys.readouterr().err
    assert main(["sweep", *common, "--trials", "3", "--set", "seeds=[0, 3]",  # the sweep seed is the first
                 "--set", "description='another text'"]) == 0
    assert main(["sweep", *common]) == 2  # no --trials
    assert main(["sweep", *common, "--best"]) == 2  # no --out
    assert main(["sweep", *common, "--best", "--out", str(tmp_path / "report")]) == 2  # a folder
    assert "--best --out" in (err := capsys.readouterr().err) and "cannot write that file" in err
    assert main(["sweep", *common, "--report", "--out", str(tmp_path / "best.toml")]) == 2  # a file
    assert "--report --out" in (err := capsys.readouterr().err) and len(err.strip().splitlines()) == 1
    typo = [*common[:-4], "--storage", f"sqlite:///{tmp_path / 'typo' / 'sweeps.db'}", *common[-2:]]
    assert main(["sweep", *typo, "--best", "--out", str(tmp_path / "b.toml")]) == 2
    assert "no sweep storage at" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    two = tmp_path / "two" / "sweep.toml"
    two.parent.mkdir()
    two.write_text(path.read_text().replace('name = "naive"', 'name = "er"\nbuffer_size = {choices = [50, 100]}'))
    assert main(["sweep", str(two), "--trials", "2", "--store", f"sqlite:///{tmp_path / 'cl.db'}"]) == 2
    assert "choose one with --strategy" in capsys.readouterr().err


def test_a_missing_dataset_stops_the_sweep_before_anything_is_created(tmp_path, capsys):
    text = EXPERIMENT.replace('name = "digits"', f'name = "fashion_mnist"\ndata_dir = "{tmp_path / "nope"}"')
    path = experiment_file(tmp_path, text=text)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--strategy", "der_pp", "--trials", "2", "--store",
                 f"sqlite:///{out / 'cl.db'}"]) == 2
    assert f"folder {tmp_path / 'nope'} not found" in capsys.readouterr().err
    assert not out.exists()  # neither the result store nor the study's storage beside it


def test_leaderboard_shows_test_runs_only(tmp_path):
    from cl.leaderboard import generate

    path = experiment_file(tmp_path, experiences=3)
    run_sweep(tmp_path, path, 1, "s")
    store = ResultStore(f"sqlite:///{tmp_path / 'cl.db'}")
    generate(store, tmp_path / "board", plots=False)
    assert "digits-sweep" not in (tmp_path / "board" / "README.md").read_text()
    assert main(["runs", "--store", store.url]) == 0


def test_postgresql_workers_survive_one_killed_mid_trial(tmp_path):
    """Two workers against a PostgreSQL study; one is killed with SIGKILL while it trains a trial. Its
    trial is failed by the heartbeat and retried, never counted complete, and the study finishes."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    path = experiment_file(tmp_path, experiences=5, epochs=3)
    store = f"sqlite:///{tmp_path / 'cl.db'}"
    with postgres_server() as url:
        common = [str(path), "--strategy", "der_pp", "--trials", "6", "--stack", "1", "--storage", url,
                  "--store", store, "--study", "pg", "--heartbeat", "1"]
        victim = cl_sweep(*common, "--worker-index", "0")
        survivor = cl_sweep(*common, "--worker-index", "1")
        sweep = sweep_of(path, tmp_path, "pg", storage=url)
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                trials = open_study(sweep, create=False).trials
            except UserError:  # the workers have not created the study yet
                continue
            for t in trials:
                if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(f":{victim.pid}"):
                    victim.send_signal(signal.SIGKILL)
                    killed = t.number
                    break
        victim.wait(timeout=30)
        assert killed is not None, "the first worker never ran a trial"
        output, _ = survivor.communicate(timeout=600)
        assert survivor.returncode == 0, output
        study = open_study(sweep, create=False)
        dead = study.trials[killed]
        assert dead.state == TrialState.FAIL and "run_status" not in dead.user_attrs
        retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
        assert len(retried) == 1 and retried[0].params == dead.params
        check_study(study, ResultStore(store), "pg", 6)



def test_ctrl_c_says_how_to_continue_the_sweep(tmp_path, capsys, monkeypatch):
    """`cl sweep` has no --resume: a study continues when the same command runs again."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cl.sweep.work", interrupted)
    path = experiment_file(tmp_path, experiences=2)
    assert main(["sweep", str(path), "--strategy", "der_pp", "--trials", "1",
                 "--store", f"sqlite:///{tmp_path / 'cl.db'}"]) == 130
    err = capsys.readouterr().err
    assert "run the same command again to continue the study" in err and "--resume" not in err
