"""Avalanche interoperability (cl/interop/avalanche.py): export, the strategy adapter, the metric cross-check."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from cl.errors import UserError
from cl.evaluation import Evaluator
from cl.runner import build_scenario, build_strategy, input_pipeline, load_datasets
from tests.helpers import CPU, digits_experiment, run

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


def test_to_avalanche_exports_the_same_samples_labels_and_tasks_in_order():
    cfg, scenario, pipeline = setup({"name": "naive"}, "permuted")
    benchmark = to_avalanche(scenario, pipeline)
    for ours, theirs in ((scenario.train, benchmark.train_stream), (scenario.test, benchmark.test_stream)):
        assert len(theirs) == len(ours)
        for exp, av_exp in zip(ours, theirs):
            x = pipeline(exp.inputs(), False, None)  # the permutation and normalisation applied
            assert av_exp.current_experience == exp.id and av_exp.task_label == exp.task_id
            assert len(av_exp.dataset) == len(exp)
            for j in (0, 1, len(exp) // 2, len(exp) - 1):
                xj, yj, tj = av_exp.dataset[j]
                assert torch.equal(xj, x[j]) and int(yj) == int(exp.y[j]) and int(tj) == exp.task_id
    first = benchmark.train_stream[0].dataset[0][0]
    assert not torch.equal(first, benchmark.train_stream[1].dataset[0][0])  # permutations differ


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
                              ({"name": "avalanche", "class": "Replay", "params": {"memsize": 5}},
                               "refused its parameters")):
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
