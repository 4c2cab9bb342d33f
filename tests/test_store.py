"""The result store (round trip, replacement, atomic writes, URLs) and run reproducibility."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import sqlite3
import subprocess

import pytest
import sqlalchemy as sa
import torch

import cl
import cl.provenance
from cl.config import build_experiment
from cl.errors import UserError
from cl.record import RunRecord
from cl.runner import build_scenario, check_experiment, load_datasets, run_experiment, run_one
from cl.store import HEADLINE, ResultStore, runs
from tests.postgres_server import postgres_server, postgres_unavailable

CPU = torch.device("cpu")


def run_tiny(raw, strategy: str = "er", seed: int = 0) -> RunRecord:
    """Train one strategy of `raw` on the CPU and return its record (not stored)."""
    config = build_experiment(raw, only_strategies=[strategy])
    scenario = build_scenario(config, load_datasets(config.datasets), seed)
    return run_one(config, config.strategies[0], scenario, seed, CPU, progress=False)


@pytest.fixture(scope="module")
def record(tiny_raw) -> RunRecord:
    """A real record: ER on 2-experience split digits (computed once for the module)."""
    return run_tiny(tiny_raw())


@pytest.fixture
def rec(record) -> RunRecord:
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
    headline = rec.headline()
    for name in HEADLINE:
        assert row[name] == headline[name]
    assert row["wall_seconds"] == rec.budgets.wall_seconds
    assert row["forward_samples"] == rec.budgets.forward_samples > 0
    assert row["memory_bytes"] == rec.budgets.memory_bytes > 0  # the buffer holds samples
    assert row["code_version"] == rec.provenance["code_version"]

    run = store.get(run_id)
    assert run.id == run_id
    assert dataclasses.replace(run, id=None) == rec  # every field survives the round trip
    assert run.provenance["versions"]["torch"] == torch.__version__
    assert run.provenance["strategy_package"] == {"name": "cl-bench", "version": cl.__version__}


def test_record_contents_are_consistent(rec):
    T = 2
    assert rec.setting == "class-il"
    assert len(rec.matrix) == T + 1 and all(len(r) == T for r in rec.matrix)
    assert all(v is not None and 0.0 <= v <= 1.0 for row in rec.matrix for v in row)
    assert rec.metrics.acc == pytest.approx(sum(rec.matrix[T]) / T)
    assert rec.config["strategy"] == {"name": "er", "label": "er", "buffer_size": 50, "replay_batch_size": 10,
                                      "buffer": "reservoir"}
    assert rec.config["model"]["hidden"] == [32]
    b = rec.budgets
    assert b.wall_seconds >= b.eval_seconds >= 0
    assert b.backward_samples == b.forward_samples
    assert b.scenario_bytes == 1797 * 64 * 4 + 1797 * 8  # digits: float32 pixels and int64 labels, once


def test_class_il_headline_fwt_is_the_task_il_one(rec):
    """Class-IL FWT is 0 - (init accuracy) for every strategy: the headline reports task-IL FWT."""
    assert rec.metrics.fwt == pytest.approx(-rec.matrix[0][1])  # R[1, 2] = 0 by construction
    assert rec.headline()["fwt"] == rec.task_il_metrics.fwt != rec.metrics.fwt
    assert rec.headline()["task_il_acc"] == rec.task_il_metrics.acc


def test_list_runs_filters_by_experiment(store_url, rec):
    store = ResultStore(store_url)
    store.write(rec)
    other = dataclasses.replace(rec, run_key="other", experiment="other")
    store.write(other)
    assert [r["experiment"] for r in store.list_runs()] == ["tiny", "other"]
    assert [r["experiment"] for r in store.list_runs("other")] == ["other"]
    assert store.list_runs("none") == []


def test_same_run_key_is_replaced(store_url, rec):
    store = ResultStore(store_url)
    store.write(rec)
    rec.metrics.acc = 0.123
    second = store.write(rec)
    rows = store.list_runs()
    assert len(rows) == 1
    assert rows[0]["id"] == second
    assert rows[0]["acc"] == 0.123
    assert store.get(second).metrics.acc == 0.123
    # (SQLite may hand the replaced row's id to the new row; either way no second row exists)
    assert count_rows(store_url) == 1


def test_seed_column_holds_64_bit_seeds(store_url, rec):
    """Seeds up to 2**63 - 1 are accepted, so the column must be 64-bit (PostgreSQL's INTEGER is 32)."""
    assert isinstance(runs.c.seed.type, sa.BigInteger)
    big = dataclasses.replace(rec, seed=2**63 - 1, run_key="big seed")
    store = ResultStore(store_url)
    run_id = store.write(big)
    assert store.list_runs()[0]["seed"] == 2**63 - 1 == store.get(run_id).seed


def test_store_of_an_older_schema_is_refused_with_one_line(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("create table runs (id integer primary key, run_key varchar(64), record json)")
    con.close()
    with pytest.raises(UserError, match="written by an older cl .*use a new --store file"):
        ResultStore(f"sqlite:///{path}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_non_finite_logs_are_stored_as_null(backend, tmp_path, rec):
    """A run that diverged at an experience's end keeps NaN/inf log means (EWC's penalty). JSON has no
    NaN and PostgreSQL's json type refused the token, so such a run could not be stored there."""
    rec.status, rec.logs = "diverged", {"penalty": [0.5, float("nan"), float("inf")]}
    with contextlib.ExitStack() as stack:
        if backend == "postgresql":
            reason = postgres_unavailable()
            if reason:
                pytest.skip(reason)
            url = stack.enter_context(postgres_server())
        else:
            url = f"sqlite:///{tmp_path / 'x.db'}"
        store = ResultStore(url)
        stored = store.get(store.write(rec))
    assert stored.status == "diverged" and stored.logs == {"penalty": [0.5, None, None]}
    assert dataclasses.replace(stored, id=None, logs=rec.logs) == rec  # nothing else changed


def test_a_store_that_cannot_be_read_is_one_line_for_every_read(store_url, rec):
    """`cl run --resume` (completed), `cl show` (get), the leaderboard (records) and `cl runs` (list_runs)."""
    store = ResultStore(store_url)
    run_id = store.write(rec)
    sqlite3.connect(store_url.removeprefix("sqlite:///")).execute("drop table runs")
    for read in (lambda: store.completed(rec.run_key), lambda: store.get(run_id), store.records, store.list_runs):
        with pytest.raises(UserError, match="cannot read result store .*no such table: runs"):
            read()


def test_failed_write_leaves_store_unchanged(store_url, rec):
    store = ResultStore(store_url)
    run_id = store.write(rec)
    before = store.get(run_id)

    broken = dataclasses.replace(rec, scenario={"unserialisable": object()})
    with pytest.raises(Exception):  # replacing the same run_key: the delete must be rolled back
        store.write(broken)
    broken.run_key = "new key"
    with pytest.raises(Exception):  # a new run: no partial row
        store.write(broken)

    assert count_rows(store_url) == 1
    assert store.get(run_id) == before
    assert ResultStore(store_url).get(run_id) == before  # as seen by a fresh connection


def test_store_can_be_reopened(store_url, rec):
    run_id = ResultStore(store_url).write(rec)
    assert ResultStore(store_url).get(run_id).matrix == rec.matrix


def test_sqlite_parent_folder_is_created(tmp_path, rec):
    url = f"sqlite:///{tmp_path}/a/b/results.db"
    ResultStore(url).write(rec)
    assert (tmp_path / "a" / "b" / "results.db").is_file()


def test_in_memory_store(rec):
    store = ResultStore("sqlite://")
    store.write(rec)
    assert len(store.list_runs()) == 1


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_training_commands_refuse_an_in_memory_store(url):
    with pytest.raises(UserError, match="in-memory database, whose runs are gone"):
        ResultStore(url).check_writable()


def test_reading_a_database_that_is_no_store_leaves_it_as_it_was(tmp_path):
    """cl runs / show / leaderboard on another program's SQLite file (an Optuna study, say): refused,
    and the file gets no table of ours."""
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("create table foo (x integer)")
    empty = tmp_path / "empty.db"
    empty.touch()
    for database in (path, empty):
        with pytest.raises(UserError, match="holds no cl result store"):
            ResultStore(f"sqlite:///{database}", must_exist=True)
    with sqlite3.connect(path) as conn:
        assert [row[0] for row in conn.execute("select name from sqlite_master")] == ["foo"]
    assert empty.stat().st_size == 0


def test_a_store_created_by_another_process_meanwhile_is_opened(tmp_path, monkeypatch):
    """Two processes opening a new store at once: the one whose CREATE TABLE comes second looks again."""
    real, calls = cl.store.metadata.create_all, []

    def raced(engine):
        calls.append(engine)
        if len(calls) == 1:  # the other process created the table between our look and our CREATE
            real(engine)
            raise sa.exc.OperationalError("CREATE TABLE runs", {}, Exception("table runs already exists"))
        real(engine)

    monkeypatch.setattr(cl.store.metadata, "create_all", raced)
    store = ResultStore(f"sqlite:///{tmp_path}/new.db")
    assert len(calls) == 2 and store.list_runs() == []


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
    assert rec_b.run_key != record.run_key and rec_b.setup_key != record.setup_key
    assert run_tiny(tiny_raw(), seed=1).run_key != record.run_key


def test_code_version_is_part_of_run_and_setup_identity(tiny_raw, record, monkeypatch):
    """Runs of other code are other runs, and never share a setup (so tables never average them)."""
    monkeypatch.setattr(cl.provenance, "git_commit", lambda: "0123abcd")
    other = run_tiny(tiny_raw())
    assert other.provenance["code_version"] == f"cl-bench {cl.__version__} (0123abcd)"
    assert other.run_key != record.run_key and other.setup_key != record.setup_key


def test_each_uncommitted_state_of_the_python_code_is_a_version_of_its_own(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    def version():
        cl.provenance.git_commit.cache_clear()
        return cl.provenance.git_commit(tmp_path)

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "step.py").write_text("lr = 0.1\n")
    (tmp_path / "README.md").write_text("readme\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    commit = version()
    assert len(commit) == 40
    (tmp_path / "README.md").write_text("edited\n")
    assert version() == commit  # documentation is not code
    (tmp_path / "pkg" / "step.py").write_text("lr = 0.2\n")
    first = version()
    (tmp_path / "pkg" / "step.py").write_text("lr = 0.3\n")
    second = version()
    assert first.startswith(f"{commit}-dirty.") and second.startswith(f"{commit}-dirty.") and first != second
    (tmp_path / "pkg" / "step.py").write_text("lr = 0.2\n")
    assert version() == first
    cl.provenance.git_commit.cache_clear()


def test_a_package_inside_another_repository_has_no_commit(tmp_path):
    """cl installed into a .venv inside the user's own repository: git found that repository's commit,
    so every commit to the user's project changed the code version (and the README diff missed cl's)."""
    site = tmp_path / ".venv" / "lib" / "site-packages"
    (site / "cl").mkdir(parents=True)
    (tmp_path / ".gitignore").write_text(".venv/\n")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "user's project"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    cl.provenance.git_commit.cache_clear()
    try:
        assert cl.provenance.git_commit(site) is None
        assert len(cl.provenance.git_commit(tmp_path)) == 40
    finally:
        cl.provenance.git_commit.cache_clear()


def test_same_seed_gives_identical_matrix(tiny_raw, record):
    again = run_tiny(tiny_raw())
    assert again.matrix == record.matrix  # exact, on the CPU
    assert again.task_il_matrix == record.task_il_matrix
    assert again.metrics == record.metrics
    assert again.run_key == record.run_key


def test_different_seed_gives_different_matrix(tiny_raw, record):
    other = run_tiny(tiny_raw(), seed=1)
    assert other.matrix != record.matrix
    assert other.seed == 1


def test_result_does_not_depend_on_other_strategies_in_the_experiment(tmp_path, tiny_raw, record):
    """ER trained after naive and joint in one experiment equals ER trained alone."""
    config = build_experiment(tiny_raw(strategies=[{"name": "naive"}, {"name": "joint"},
                                                   {"name": "er", "buffer_size": 50, "replay_batch_size": 10}]))
    store = ResultStore(f"sqlite:///{tmp_path}/r.db")
    records = run_experiment(config, check_experiment(config, CPU), store, CPU, progress=False, log=lambda _: None)
    assert [r.strategy for r in records] == ["naive", "joint", "er"]
    assert records[2].matrix == record.matrix
    assert records[2].run_key == record.run_key
    assert [r["id"] for r in store.list_runs()] == [r.id for r in records]


def test_a_store_locked_at_opening_is_one_line_that_says_what_to_do(tmp_path):
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # a new store: its tables cannot be created while another holds the lock
    try:
        with pytest.raises(UserError) as raised:
            ResultStore(f"sqlite:///{path}", busy_timeout=0.1)
    finally:
        holder.execute("COMMIT")
        holder.close()
    message = str(raised.value)
    assert "database is locked" in message and "--busy-timeout, now 0.1 s" in message and "\n" not in message


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(provenance=None), "provenance must be dict"),
    (lambda d: d["provenance"].pop("code_version"), "provenance.code_version must be a string"),
    (lambda d: d["budgets"].update(wall_seconds="x"), "budgets.wall_seconds must be a number, got 'x'"),
    (lambda d: d.update(seed="zero"), "seed must be int, got 'zero'"),
    (lambda d: d.update(seed=True), "seed must be int"),
    (lambda d: d["metrics"].update(acc=[0.5]), "metrics.acc must be a number"),
    (lambda d: d.update(metrics=None), "not a run kept by cl"),
    (lambda d: d.update(matrix="0.5"), "matrix must be list"),
    # the tables divide by stacked_runs: 0 was a ZeroDivisionError traceback after the import
    (lambda d: d["budgets"].update(stacked_runs=0), "budgets.stacked_runs must be at least 1, got '0'"),
    (lambda d: d["budgets"].update(stacked_runs=1.5), "budgets.stacked_runs must be an integer"),
    (lambda d: d["budgets"].update(train_seconds=-3.0), "budgets.train_seconds must be a number >= 0"),
    (lambda d: d.update(failure={"reason": "x"}), "failure must be null or a table with experience, step and reason"),
])
def test_importing_a_hand_edited_record_names_the_field(edit, message, tmp_path, rec):
    """cl import reads files a user may have edited: a wrong type is one line naming the field, and nothing
    is stored (such records used to raise AttributeError or TypeError, or be stored with a string seed)."""
    data = rec.to_json()
    edit(data)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    store = ResultStore(f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(UserError, match=re.escape(message)):
        store.import_file(path)
    assert store.list_runs() == []
    path.write_text(json.dumps(rec.to_json()))
    assert store.get(store.import_file(path)).seed == rec.seed


def test_two_stores_in_one_folder_keep_their_checkpoints_apart(tmp_path):
    """cl.db and cl.sqlite side by side shared checkpoints/cl: finishing a run in one removed the other's."""
    db, sqlite = (ResultStore(f"sqlite:///{tmp_path}/cl.{suffix}") for suffix in ("db", "sqlite"))
    assert db.checkpoint_root == tmp_path / "checkpoints" / "cl.db"
    assert sqlite.checkpoint_root == tmp_path / "checkpoints" / "cl.sqlite"
