"""The README's strategy example is real code: run it."""
import re
from pathlib import Path

import torch

from cl.registry import STRATEGIES
from cl.runner import build_scenario, load_datasets, run_one
from tests.helpers import digits_experiment

README = Path(__file__).resolve().parent.parent / "README.md"


def test_writing_a_strategy_example_registers_and_runs():
    section = README.read_text().split("## Writing a strategy", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    assert STRATEGIES.get("l2_anchor").obj is namespace["L2Anchor"]
    cfg = digits_experiment([{"name": "l2_anchor", "weight": 0.01}], n_experiences=3)
    record = run_one(cfg, cfg.strategies[0], build_scenario(cfg, load_datasets(cfg.datasets), 0),
                     0, torch.device("cpu"), progress=False)
    assert record["metrics"]["task_il_acc"] > 0.8  # it learns
    # After the last experience it keeps one copy of the MLP (64-64-10) as its anchor.
    assert record["budgets"]["memory_bytes"] == record["budgets"]["model_bytes"]
