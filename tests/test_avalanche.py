"""Avalanche interoperability (cl/interop/avalanche.py): export, the strategy adapter, the metric cross-check."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from cl.errors import UserError
from cl.evaluation import Evaluator
from cl.runner import build_scenario, build_strategy, input_pipeline, load_datasets
from tests.helpers import CPU, digits_experiment, run, strategy_for

avalanche = pytest.importorskip("avalanche", reason="avalanche-lib is not installed (the avalanche extra)")
from avalanche.evaluation.metrics import accuracy_metrics  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from cl.interop.avalanche import to_avalanche  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def setup(strategy: dict, scenario: str = "class_incremental", **options):
    cfg = digits_experiment([strategy], hidden=[32], n_experiences=3, **options)
    if scenario != "class_incremental":
        cfg.scenario = type(cfg.scenario)(scenario, _scenario_params(scenario), scenario)
    data = build_scenario(cfg, load_datasets(cfg.datasets), 0)
    return cfg, data, input_pipeline(cfg, data, CPU)


def _scenario_params(name: str):
    from cl.params import build_params
    from cl.registry import SCENARIOS

    return build_params(SCENARIOS.get(name).params, {"n_experiences": 3}, name)


def avalanche_accuracies(model: torch.nn.Module, benchmark) -> list[float]:
    """Avalanche's own evaluation of `model` on the benchmark's test stream, per experience."""
    judge = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), eval_mb_size=500,
                  evaluator=EvaluationPlugin(accuracy_metrics(experience=True)))
    results = judge.eval(benchmark.test_stream)
    by_exp = {key.rsplit("/Exp", 1)[1]: value for key, value in results.items() if key.startswith("Top1_Acc_Exp")}
    return [by_exp[f"{j:03d}"] for j in range(len(benchmark.test_stream))]


@pytest.mark.parametrize("scenario, task_labels", [("permuted", False), ("class_incremental", True)])
def test_to_avalanche_exports_the_same_samples_labels_and_tasks_in_order(scenario, task_labels):
    """Task labels are our task ids in task-IL and 0 in class- and domain-IL, as in Avalanche's own
    benchmarks."""
    cfg, scenario, pipeline = setup({"name": "naive"}, scenario, task_labels=task_labels)
    benchmark = to_avalanche(scenario, pipeline)
    for ours, theirs in ((scenario.train, benchmark.train_stream), (scenario.test, benchmark.test_stream)):
        assert len(theirs) == len(ours)
        for exp, av_exp in zip(ours, theirs):
            x = pipeline(exp.inputs(), False, None)  # the permutation and normalisation applied
            label = exp.task_id if task_labels else 0
            assert av_exp.current_experience == exp.id and av_exp.task_label == label
            assert len(av_exp.dataset) == len(exp)
            for j in (0, 1, len(exp) // 2, len(exp) - 1):
                xj, yj, tj = av_exp.dataset[j]
                assert torch.equal(xj, x[j]) and int(yj) == int(exp.y[j]) and int(tj) == label
    assert {e.task_label for e in benchmark.train_stream} == ({0, 1, 2} if task_labels else {0})
    first = benchmark.train_stream[0].dataset[0][0]
    assert not torch.equal(first, benchmark.train_stream[1].dataset[0][0])  # permutations (classes) differ


def test_avalanche_lwf_distils_every_class_seen_in_class_il():
    """With one task label per experience, Avalanche's LwF distilled a single head over the first
    experience's classes only."""
    cfg = digits_experiment([{"name": "avalanche", "class": "LwF", "params": {"alpha": 1.0, "temperature": 2.0}}],
                            hidden=[16], n_experiences=3)
    strategy, scenario = strategy_for(cfg)
    for exp in scenario.train[:2]:
        strategy.fit(exp)
    (plugin,) = [p for p in strategy.avalanche.plugins if type(p).__name__ == "LwFPlugin"]
    seen = {int(c) for exp in scenario.train[:2] for c in exp.classes}
    assert {task: set(classes) for task, classes in plugin.lwf.prev_classes_by_task.items()} == {0: seen}


def test_adapter_runs_avalanche_strategies_in_our_runner():
    for strategy in ({"name": "avalanche", "class": "Naive"},
                     {"name": "avalanche", "class": "Replay", "params": {"mem_size": 100}},
                     {"name": "avalanche", "class": "LwF", "params": {"alpha": 1.0, "temperature": 2.0}}):
        cfg = digits_experiment([strategy], hidden=[32], n_experiences=3)
        record = run(cfg)
        assert record.status == "completed" and record.strategy_name == "avalanche"
        assert record.params["class"] == strategy["class"]  # stored under the key the file writes
        assert record.matrix[1][0] > 0.5  # it learned the first experience (chance 0.25)
    replay = run(digits_experiment([{"name": "avalanche", "class": "Replay", "params": {"mem_size": 200}}],
                                   hidden=[32], n_experiences=3))
    naive = run(digits_experiment([{"name": "avalanche", "class": "Naive"}], hidden=[32], n_experiences=3))
    assert replay.metrics.acc > naive.metrics.acc + 0.1  # Avalanche's replay reduces forgetting here too


def test_adapter_shows_none_of_avalanches_deprecation_warnings(recwarn):
    """Avalanche's deprecated functions re-enable their DeprecationWarning at every call, past this module's
    filter; the adapter's runs show none of them (they printed one per experience for Replay)."""
    record = run(digits_experiment([{"name": "avalanche", "class": "Replay", "params": {"mem_size": 100}}],
                                   hidden=[32], n_experiences=3))
    assert record.status == "completed"
    assert [str(w.message) for w in recwarn if issubclass(w.category, DeprecationWarning)] == []


@pytest.mark.parametrize("scenario", ["class_incremental", "permuted"])
def test_avalanche_evaluation_equals_our_matrix(scenario):
    """After each experience, Avalanche's own accuracies equal our matrix's row, to 1e-6: every entry
    in domain-IL; in class-IL the last row only, since before it ours argmaxes over the classes
    seen so far and Avalanche over all outputs (README)."""
    cfg, data, pipeline = setup({"name": "avalanche", "class": "Naive"}, scenario)
    strategy = build_strategy(cfg.strategies[0], cfg, data, CPU, 0, pipeline)
    evaluator = Evaluator(data, 500)
    benchmark = to_avalanche(data, pipeline)
    for i, exp in enumerate(data.train):
        strategy.fit(exp)
        evaluator.mark_trained(i)
        evaluator.evaluate_row(i + 1, strategy)
        if scenario == "permuted" or i == len(data.train) - 1:
            np.testing.assert_allclose(avalanche_accuracies(strategy.model, benchmark), evaluator.matrix[i + 1],
                                       atol=1e-6)
    assert evaluator.matrix[-1].max() > 0.5  # it learned


def test_bad_avalanche_classes_and_parameters_are_one_line_errors(monkeypatch):
    for strategy, message in (({"name": "avalanche", "class": "Nope"}, "class 'Nope' is not a strategy"),
                              ({"name": "avalanche", "class": "ReservoirSamplingBuffer"}, "is not a strategy"),
                              ({"name": "avalanche", "class": "Replay", "params": {"memsize": 5}},
                               "Replay takes no parameter 'memsize'; it takes eval_every, mem_size,"),
                              ({"name": "avalanche", "class": "Replay", "params": {"train_mb_size": 5}},
                               "params.train_mb_size is set by cl from training.batch_size"),
                              ({"name": "avalanche", "class": "LwF", "params": {"alpha": 1.0}},
                               "LwF needs temperature; give them in params")):
        cfg = digits_experiment([strategy], hidden=[32], n_experiences=3)
        with pytest.raises(UserError, match=message):
            run(cfg)
    real = importlib.import_module

    def without_avalanche(name, *args):
        if name.startswith("avalanche"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_avalanche)
    with pytest.raises(UserError, match=r"pip install -e \"\.\[avalanche\]\""):
        run(digits_experiment([{"name": "avalanche", "class": "Naive"}], hidden=[32], n_experiences=3))


@pytest.mark.parametrize("change, message", [
    ({"grad_clip_norm": 1.0}, "has no gradient clipping (training.grad_clip_norm)"),
    ({"task_labels": True}, "has no task-IL mask (training.task_il_mask: set it to false)"),
])
def test_settings_avalanches_loop_would_ignore_are_refused_before_anything_trains(change, message, cli, tiny_raw,
                                                                                    write_experiment, store_url):
    raw = tiny_raw(strategies=[{"name": "naive"}, {"name": "avalanche", "class": "Naive"}])
    if "task_labels" in change:
        raw["scenario"]["task_labels"] = True
    else:
        raw["training"].update(change)
    result = cli("run", write_experiment(raw), "--store", store_url, "--no-progress")
    assert result.rc == 2 and message in result.err and "run 1" not in result.out
    if "task_labels" in change:  # without the mask, task-IL is fine
        raw["training"]["task_il_mask"] = False
        assert cli("run", write_experiment(raw), "--store", store_url, "--no-progress").rc == 0


def test_an_unknown_avalanche_class_is_refused_before_other_strategies_train(cli, tiny_raw, write_experiment,
                                                                             store_url):
    raw = tiny_raw(strategies=[{"name": "naive"}, {"name": "avalanche", "class": "Replayy"}])
    result = cli("run", write_experiment(raw), "--store", store_url, "--no-progress")
    assert result.rc == 2 and "class 'Replayy' is not a strategy" in result.err and "run 1" not in result.out


def test_avalanche_runs_write_no_checkpoints_and_start_over_on_resume(cli, tiny_raw, write_experiment, store_url,
                                                                      tmp_path, monkeypatch):
    """Avalanche's buffers and teachers live in its own objects, which a checkpoint cannot hold: an interrupted
    run would resume without them (its Replay's parameters differed by 0.29 from the run uninterrupted)."""
    import cl.runner

    seen = []
    real = cl.runner.run_one

    def spy(*args, **kwargs):
        seen.append(args[7] if len(args) > 7 else kwargs.get("checkpoints"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cl.runner, "run_one", spy)
    raw = tiny_raw(strategies=[{"name": "avalanche", "class": "Replay", "params": {"mem_size": 20}}])
    result = cli("run", write_experiment(raw), "--store", store_url, "--no-progress", "--resume")
    assert result.rc == 0 and seen == [None]
    assert "its strategy's state cannot be checkpointed, so its unfinished runs start from the beginning" in result.out
