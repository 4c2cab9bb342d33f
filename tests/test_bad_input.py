"""Property-based: malformed experiment files and command lines end in our own one-line error, exit 2.

Hypothesis mutates the tiny digits experiment (any key of any table set to a number, a huge or
negative integer, nan, inf, a string, a list, a table, or deleted) and draws command lines from
the real subcommands and options. Whatever it draws, `cl` must either accept the input and reach
training (`run_one` and `run_stacked`, replaced here by a sentinel so that nothing trains) or print exactly one line
on stderr and exit with code 2: never a traceback, never another exit code.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cl.runner
from cl.cli import main
from tests.conftest import make_raw, to_toml


class ReachedTraining(Exception):
    """Raised instead of training: the input passed every check that comes before it."""


def _no_training(*args: Any, **kwargs: Any) -> None:
    raise ReachedTraining


@contextlib.contextmanager
def in_fresh_folder():
    """A temporary working directory (relative store paths and output folders land there)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(old)


def outcome(argv: list[str]) -> tuple[str, int, str]:
    """('trained' | 'exit', exit code, stderr) of `cl ARGV` run in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return "exit", main(argv), err.getvalue()
        except SystemExit as exc:
            return "exit", int(exc.code or 0), err.getvalue()
        except ReachedTraining:
            return "trained", 0, err.getvalue()


FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def check_cl(argv: list[str], experiment_text: str) -> None:
    """Run `cl ARGV` in a fresh folder holding exp.toml, training replaced by a sentinel, and check
    that it reached training or ended in one line with exit 2."""
    with in_fresh_folder() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(cl.runner, "run_one", _no_training)
        patch.setattr(cl.runner, "run_stacked", _no_training)
        (folder / "exp.toml").write_text(experiment_text, errors="surrogatepass")
        assert_one_line_or_accepted(*outcome(argv))


def assert_one_line_or_accepted(kind: str, rc: int, err: str) -> None:
    event(f"{kind} {rc}")
    if kind == "trained" or rc == 0:
        return
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}: {err}"
    assert len(lines) == 1 and "Traceback" not in err, err


NUMBERS = st.one_of(st.integers(-10, 10), st.integers(-2**63, 2**63 - 1), st.sampled_from([0, 1, -1, 2**62]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"),
                                                                                       -float("inf"), 1e308, -0.0]))
SCALARS = st.one_of(NUMBERS, st.booleans(), st.text(max_size=8),
                    st.sampled_from(["mlp", "cnn", "vit", "er", "naive", "digits", "rotated", "permuted", ""]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.sampled_from(["a", "name", "lr"]),
                                                                           SCALARS, max_size=2))
DELETE = object()

# Keys worth mutating: every key of the tiny experiment, and every parameter its components declare.
TABLE_KEYS = {
    "dataset": ["name", "test_fraction", "split_seed", "data_dir"],
    "scenario": ["name", "n_experiences", "class_order", "classes_per_experience", "train_per_experience",
                 "task_labels", "shuffle_classes", "seed", "min_angle", "max_angle", "fraction", "overlap"],
    "model": ["name", "hidden", "multi_head", "channels", "width", "patch_size", "heads", "depth"],
    "training": ["epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "grad_clip_norm",
                 "freeze", "lr_scale", "eval_batch_size", "optimizer_policy"],
    "transforms": ["resize", "crop_padding", "normalize", "mean", "std", "horizontal_flip"],
    "divergence": ["check_every", "factor", "patience", "learned_margin"],
    "strategy": ["name", "label", "buffer_size", "replay_batch_size", "buffer", "alpha", "temperature",
                 "memory_per_task", "ewc_lambda", "gamma", "c", "xi", "hidden", "chunk_size", "beta", "pool_size",
                 "top_k"],
    "top": ["name", "seeds", "description", "dataset", "scenario", "model", "training", "strategies"],
}


@st.composite
def malformed_experiments(draw) -> dict[str, Any]:
    raw = make_raw()
    raw["strategies"] = [draw(st.sampled_from([{"name": "naive"}, {"name": "er", "buffer_size": 20},
                                               {"name": "lwf"}, {"name": "ewc"}, {"name": "si"},
                                               {"name": "hnet", "chunk_size": 0}]))]
    for _ in range(draw(st.integers(1, 3))):
        table = draw(st.sampled_from(sorted(TABLE_KEYS)))
        key = draw(st.sampled_from(TABLE_KEYS[table]))
        value = draw(st.one_of(VALUES, st.just(DELETE)))
        strategies = raw.get("strategies")
        if table == "top":
            target = raw
        elif table == "strategy":
            target = strategies[0] if isinstance(strategies, list) and strategies else None
        else:
            target = raw.setdefault(table, {})
        if not isinstance(target, dict):  # an earlier mutation replaced the table itself
            continue
        if value is DELETE:
            target.pop(key, None)
        else:
            target[key] = value
    return raw


@settings(FUZZ, max_examples=120)
@given(raw=malformed_experiments())
def test_malformed_experiment_files_get_one_line_errors(raw):
    try:
        text = to_toml(raw)
    except (TypeError, ValueError):  # a value our small TOML writer cannot express
        return
    check_cl(["run", "exp.toml", "--no-progress", "--device", "cpu"], text)


OPTION_VALUES = st.one_of(st.sampled_from(["0", "1", "-1", "nan", "x", "", "0 0", "9" * 30, "exp.toml",
                                           "sqlite:///s.db", "sqlite:////nonexistent/dir/s.db", "bogus://x",
                                           "training.lr=0.5", "training.lr=nan", "model.hidden=[0]", "a=", "=1",
                                           "strategies.er.buffer_size=-3", "strategies.zz.x=1", "cpu", "cuda:7",
                                           "naive", "er", "strategies", "models", "out"]),
                          st.text(max_size=6))
OPTIONS = {
    "run": ["--seeds", "--set", "--strategy", "--store", "--busy-timeout", "--device", "--data-dir", "--no-progress",
            "--resume"],
    "list": [], "show": ["--json", "--store"], "runs": ["--experiment", "--json", "--store"],
    "import": ["--store"], "leaderboard": ["--store", "--out", "--no-plots"], "pretrain": ["--set", "--device"],
}
FLAGS = {"--no-progress", "--resume", "--json", "--no-plots"}


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(OPTIONS) + ["bogus"]))
    argv = [command]
    if command in ("run", "pretrain", "import"):
        argv.append(draw(st.sampled_from(["exp.toml", "missing.toml", "", "exp.toml"])))
    elif command in ("list", "show"):
        argv.append(draw(OPTION_VALUES))
    for _ in range(draw(st.integers(0, 4))):
        option = draw(st.sampled_from(OPTIONS.get(command, []) + ["--bogus", "--seeds"]))
        argv.append(option)
        if option not in FLAGS:
            argv += [draw(OPTION_VALUES) for _ in range(draw(st.integers(0, 2)))]
    return argv


@settings(FUZZ, max_examples=300)
@given(argv=command_lines())
def test_malformed_command_lines_get_one_line_errors(argv):
    check_cl(argv, to_toml(make_raw()))
