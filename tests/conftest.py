"""Shared fixtures: tiny digits experiments, a throwaway result store, the CLI in-process and as a subprocess."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from cl.cli import main

CL_EXE = Path(sys.executable).parent / "cl"

# cuBLAS reads its workspace setting once, when the first CUDA test starts it; deterministic algorithms
# (the `deterministic_cuda` fixture of tests/test_stacking.py) need this one, so it is set before any test.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# The smallest experiment that still exercises everything: scikit-learn's 8x8 digits,
# 2 class-incremental experiences, a one-hidden-layer MLP, one epoch.
TINY: dict[str, Any] = {
    "name": "tiny",
    "seeds": [0],
    "dataset": {"name": "digits"},
    "scenario": {"name": "class_incremental", "n_experiences": 2},
    "model": {"name": "mlp", "hidden": [32]},
    "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    "strategies": [
        {"name": "naive"},
        {"name": "er", "buffer_size": 50, "replay_batch_size": 10},
        {"name": "joint"},
    ],
}


def make_raw(**changes: Any) -> dict[str, Any]:
    """A fresh copy of TINY with top-level keys replaced (value None deletes the key)."""
    raw = copy.deepcopy(TINY)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = copy.deepcopy(value)
    return raw


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(raw: dict[str, Any]) -> str:
    """Enough of a TOML writer for experiment files: scalars, [tables] and [[arrays of tables]]."""
    lines, tables = [], []
    for key, value in raw.items():
        if isinstance(value, dict):
            tables.append((f"[{key}]", value))
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            tables.extend((f"[[{key}]]", x) for x in value)
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for header, table in tables:
        lines += ["", header] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_raw() -> Callable[..., dict[str, Any]]:
    """Factory: `tiny_raw(strategies=[...], seeds=[1])` -> experiment dict."""
    return make_raw


@pytest.fixture
def write_experiment(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `write_experiment(raw_or_text, name="exp.toml")` -> path of the written file."""

    def write(raw: dict[str, Any] | str | None = None, name: str = "exp.toml") -> Path:
        path = tmp_path / name
        path.write_text(raw if isinstance(raw, str) else to_toml(raw if raw is not None else make_raw()))
        return path

    return write


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/x.db"


@dataclasses.dataclass
class CliResult:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run `cl ARGS...` in-process; returns exit code, stdout and stderr of that call only."""

    def run(*argv: Any) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        rc = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(rc, captured.out, captured.err)

    return run


@pytest.fixture
def cl_subprocess(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the installed `cl` script in a subprocess (cwd = tmp_path), optionally with extra PYTHONPATH."""

    def run(*argv: Any, pythonpath: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        return subprocess.run([str(CL_EXE), *map(str, argv)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=timeout)

    return run


def assert_one_line_error(err: str, prefix: str = "cl: error:") -> str:
    """stderr is exactly one line starting with `prefix`, without a traceback; returns that line."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.fixture
def one_line_error() -> Callable[..., str]:
    return assert_one_line_error


@pytest.fixture
def run_tiny(cli, write_experiment, tiny_raw, store_url):
    """`run_tiny(raw=None, *extra_args)` -> CliResult of `cl run` on a tiny experiment file, on the CPU
    unless extra_args give a --device."""

    def run(raw=None, *extra):
        path = write_experiment(raw if raw is not None else tiny_raw())
        device = [] if "--device" in extra else ["--device", "cpu"]
        return cli("run", path, "--store", store_url, "--no-progress", *device, *extra)

    return run


@pytest.fixture
def stored(cli, store_url):
    """The stored runs, as `cl runs --json` lists them."""

    def runs(*extra):
        if not Path(store_url.removeprefix("sqlite:///")).exists():
            return []  # nothing was ever stored: `cl runs` refuses to create the store
        result = cli("runs", "--json", "--store", store_url, *extra)
        assert result.rc == 0, result.err
        return result.json()

    return runs
