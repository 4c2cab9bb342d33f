"""The README's strategy examples are real code: run them."""
import re
from pathlib import Path

import pytest
import torch

from cl.registry import STRATEGIES
from cl.runner import build_scenario, load_datasets, run_one, run_stacked
from tests.helpers import digits_experiment

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def readme_strategies():
    """Execute the python blocks of "Writing a strategy", each in a namespace of its own (a reader copies
    one block into a module: it must import what it uses)."""
    section = README.read_text().split("## Writing a strategy", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    namespace: dict = {"__name__": "readme_example"}
    try:
        for block in blocks:
            own: dict = {"__name__": "readme_example"}
            exec(compile(block, "README.md", "exec"), own)
            namespace.update(own)
        yield namespace
    finally:
        for name in ("l2_anchor", "logit_replay"):
            STRATEGIES._entries.pop(name, None)


def run(strategies, **options):
    cfg = digits_experiment(strategies, **options)
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
    return [run_one(cfg, c, scenario, 0, torch.device("cpu"), progress=False) for c in cfg.strategies]


def test_first_example_registers_learns_keeps_its_anchor_and_logs(readme_strategies):
    assert STRATEGIES.get("l2_anchor").obj is readme_strategies["L2Anchor"]
    (record,) = run([{"name": "l2_anchor", "weight": 0.01}], n_experiences=3)
    assert record.task_il_acc > 0.8  # it learns
    # After the last experience it keeps one copy of the MLP (64-64-10) as its anchor.
    assert record.budgets.memory_bytes == record.budgets.model_bytes
    assert record.logs["penalty"][0] == 0.0 and all(v > 0 for v in record.logs["penalty"][1:])
    assert all(v > 0 for v in record.logs["ce"])


def test_second_example_stores_logits_and_forgets_less_than_fine_tuning(readme_strategies):
    assert STRATEGIES.get("logit_replay").obj is readme_strategies["LogitReplay"]
    naive, der = run([{"name": "naive"}, {"name": "logit_replay", "buffer_size": 200}], n_experiences=5, epochs=2)
    assert der.metrics.forgetting < naive.metrics.forgetting - 0.3
    assert der.metrics.acc > naive.metrics.acc + 0.2
    # 200 stored digits: 64 float32 pixels, label, task id and 10 float32 logits each
    assert der.budgets.memory_bytes == 200 * (64 * 4 + 8 + 8 + 10 * 4)
    assert der.logs["logit_distance"][0] > 0 and len(der.logs["logit_distance"]) == 5


def test_second_example_trains_stacked_as_it_trains_alone(readme_strategies):
    cfg = digits_experiment([{"name": "logit_replay", "buffer_size": 100}], n_experiences=3, seeds=[0, 1])
    datasets = load_datasets(cfg.datasets)
    scenarios = [build_scenario(cfg, datasets, seed) for seed in (0, 1)]
    stacked = run_stacked(cfg, cfg.strategies[0], scenarios, [0, 1], torch.device("cpu"), progress=False)
    for seed, record in zip((0, 1), stacked):
        alone = run_one(cfg, cfg.strategies[0], scenarios[seed], seed, torch.device("cpu"), progress=False)
        assert record.budgets.stacked_runs == 2 and record.seed == seed
        assert abs(record.metrics.acc - alone.metrics.acc) <= 0.01
