"""The result store (round trip, replacement, atomic writes, URLs) and run reproducibility."""
from __future__ import annotations

import copy
import sqlite3

import pytest
import torch

from cl.config import build_experiment
from cl.errors import UserError
from cl.runner import build_scenario, load_datasets, run_experiment, run_one
from cl.store import HEADLINE, ResultStore

CPU = torch.device("cpu")


def run_tiny(raw, strategy: str = "er", seed: int = 0) -> dict:
    """Train one strategy of `raw` on the CPU and return its record (not stored)."""
    config = build_experiment(raw, only_strategies=[strategy])
    scenario = build_scenario(config, load_datasets(config.datasets), seed)
    return run_one(config, config.strategies[0], scenario, seed, CPU, progress=False)


@pytest.fixture(scope="module")
def record(tiny_raw) -> dict:
    """A real record: ER on 2-experience split digits (computed once for the module)."""
    return run_tiny(tiny_raw())


@pytest.fixture
def rec(record) -> dict:
    return copy.deepcopy(record)


def count_rows(url: str) -> int:
    return sqlite3.connect(url.removeprefix("sqlite:///")).execute("select count(*) from runs").fetchone()[0]


# ---------------------------------------------------------------- round trip


def test_write_list_get_round_trip(store_url, rec):
    store = ResultStore(store_url)
    run_id = store.write(rec)
    assert isinstance(run_id, int)

    (row,) = store.list_runs()
    assert row["id"] == run_id
    assert (row["experiment"], row["strategy"], row["seed"], row["status"]) == ("tiny", "er", 0, "completed")
    assert row["params"] == {"buffer_size": 50, "replay_batch_size": 10, "buffer": "reservoir"}
    assert "record" not in row
    for name in HEADLINE:
        assert row[name] == rec["metrics"][name]
    assert row["wall_seconds"] == rec["budgets"]["wall_seconds"]
    assert row["forward_samples"] == rec["budgets"]["forward_samples"] > 0
    assert row["memory_bytes"] == rec["budgets"]["memory_bytes"] > 0  # the buffer holds samples

    run = store.get(run_id)
    assert run["id"] == run_id
    for key in ("matrix", "task_il_matrix", "metrics", "budgets", "config", "versions", "git_commit", "device",
                "scenario", "setting", "run_key", "created_at"):
        assert key in run, key
    assert run["matrix"] == rec["matrix"]
    assert run["task_il_matrix"] == rec["task_il_matrix"]
    assert run["metrics"] == rec["metrics"]
    assert run["budgets"] == rec["budgets"]
    assert run["config"] == rec["config"]
    assert run["versions"]["torch"] == torch.__version__
    assert run["run_key"] == rec["run_key"]


def test_record_contents_are_consistent(rec):
    T = 2
    assert rec["setting"] == "class-il"
    assert len(rec["matrix"]) == T + 1 and all(len(r) == T for r in rec["matrix"])
    assert all(v is not None and 0.0 <= v <= 1.0 for row in rec["matrix"] for v in row)
    assert rec["metrics"]["acc"] == pytest.approx(sum(rec["matrix"][T]) / T)
    assert rec["config"]["strategy"] == {"name": "er", "label": "er", "buffer_size": 50, "replay_batch_size": 10,
                                         "buffer": "reservoir"}
    assert rec["config"]["model"]["hidden"] == [32]
    b = rec["budgets"]
    assert b["wall_seconds"] >= b["eval_seconds"] >= 0
    assert b["backward_samples"] == b["forward_samples"]


def test_list_runs_filters_by_experiment(store_url, rec):
    store = ResultStore(store_url)
    store.write(rec)
    other = copy.deepcopy(rec)
    other.update(run_key="other", experiment="other")
    store.write(other)
    assert [r["experiment"] for r in store.list_runs()] == ["tiny", "other"]
    assert [r["experiment"] for r in store.list_runs("other")] == ["other"]
    assert store.list_runs("none") == []


def test_same_run_key_is_replaced(store_url, rec):
    store = ResultStore(store_url)
    store.write(rec)
    rec["metrics"]["acc"] = 0.123
    second = store.write(rec)
    rows = store.list_runs()
    assert len(rows) == 1
    assert rows[0]["id"] == second
    assert rows[0]["acc"] == 0.123
    assert store.get(second)["metrics"]["acc"] == 0.123
    # (SQLite may hand the replaced row's id to the new row; either way no second row exists)
    assert count_rows(store_url) == 1


def test_failed_write_leaves_store_unchanged(store_url, rec):
    store = ResultStore(store_url)
    run_id = store.write(rec)
    before = store.get(run_id)

    broken = copy.deepcopy(rec)
    broken["scenario"] = {"unserialisable": object()}
    with pytest.raises(Exception):  # replacing the same run_key: the delete must be rolled back
        store.write(broken)
    broken["run_key"] = "new key"
    with pytest.raises(Exception):  # a new run: no partial row
        store.write(broken)

    assert count_rows(store_url) == 1
    assert store.get(run_id) == before
    assert ResultStore(store_url).get(run_id) == before  # as seen by a fresh connection


def test_store_can_be_reopened(store_url, rec):
    run_id = ResultStore(store_url).write(rec)
    assert ResultStore(store_url).get(run_id)["matrix"] == rec["matrix"]


def test_sqlite_parent_folder_is_created(tmp_path, rec):
    url = f"sqlite:///{tmp_path}/a/b/results.db"
    ResultStore(url).write(rec)
    assert (tmp_path / "a" / "b" / "results.db").is_file()


def test_in_memory_store(rec):
    store = ResultStore("sqlite://")
    store.write(rec)
    assert len(store.list_runs()) == 1


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://x/y", "sqlite+nosuchdriver:///x.db"])
def test_bad_url(url):
    with pytest.raises(UserError) as info:
        ResultStore(url)
    assert repr(url) in str(info.value)


def test_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("this is not an sqlite file\n" * 100)
    with pytest.raises(UserError, match="cannot open result store"):
        ResultStore(f"sqlite:///{path}")


def test_parent_folder_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError):
        ResultStore(f"sqlite:///{tmp_path}/afile/x.db")


def test_get_unknown_id(store_url, rec):
    store = ResultStore(store_url)
    store.write(rec)
    with pytest.raises(UserError, match="no run with id 999"):
        store.get(999)


def test_empty_store(store_url):
    assert ResultStore(store_url).list_runs() == []


# ---------------------------------------------------------------- run identity and reproducibility


def test_run_key_depends_on_what_changes_results(tiny_raw, record):
    a = build_experiment(tiny_raw(), only_strategies=["er"])
    raw = tiny_raw()
    raw["training"]["lr"] = 0.05
    b = build_experiment(raw, only_strategies=["er"])
    assert a.setup_identity() != b.setup_identity()
    rec_b = run_tiny(raw)
    assert rec_b["run_key"] != record["run_key"]
    assert run_tiny(tiny_raw(), seed=1)["run_key"] != record["run_key"]


def test_same_seed_gives_identical_matrix(tiny_raw, record):
    again = run_tiny(tiny_raw())
    assert again["matrix"] == record["matrix"]  # exact, on the CPU
    assert again["task_il_matrix"] == record["task_il_matrix"]
    assert again["metrics"] == record["metrics"]
    assert again["run_key"] == record["run_key"]


def test_different_seed_gives_different_matrix(tiny_raw, record):
    other = run_tiny(tiny_raw(), seed=1)
    assert other["matrix"] != record["matrix"]
    assert other["seed"] == 1


def test_result_does_not_depend_on_other_strategies_in_the_experiment(tmp_path, tiny_raw, record):
    """ER trained after naive and joint in one experiment equals ER trained alone."""
    config = build_experiment(tiny_raw(strategies=[{"name": "naive"}, {"name": "joint"},
                                                   {"name": "er", "buffer_size": 50, "replay_batch_size": 10}]))
    store = ResultStore(f"sqlite:///{tmp_path}/r.db")
    records = run_experiment(config, store, CPU, progress=False, log=lambda _: None)
    assert [r["strategy"] for r in records] == ["naive", "joint", "er"]
    assert records[2]["matrix"] == record["matrix"]
    assert records[2]["run_key"] == record["run_key"]
    assert [r["id"] for r in store.list_runs()] == [r["id"] for r in records]
