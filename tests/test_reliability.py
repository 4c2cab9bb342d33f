"""Reliability: divergence rules, failed and diverged runs recorded without stopping the invocation."""
import math

import pytest
import torch

from cl.divergence import Diverged, DivergenceParams, LossMonitor, learned_nothing
from cl.registry import STRATEGIES
from cl.store import ResultStore


def feed(monitor, losses):
    for value in losses:
        monitor.add(torch.tensor(value))


def test_a_non_finite_loss_is_caught_at_the_next_check_not_before():
    monitor = LossMonitor(DivergenceParams(check_every=4))
    feed(monitor, [2.0, float("nan"), 2.0])  # no check yet: no host synchronisation per step
    with pytest.raises(Diverged, match="NaN/inf"):
        feed(monitor, [2.0])


def test_the_loss_explodes_after_patience_windows_far_above_the_first():
    # First loss 2.0 -> limit 10 x max(2.0, 1) = 20.
    monitor = LossMonitor(DivergenceParams(check_every=2, factor=10.0, patience=3))
    feed(monitor, [2.0, 3.0])
    feed(monitor, [30.0, 30.0, 25.0, 25.0])  # two exploding windows (30, 25)
    feed(monitor, [5.0, 5.0])  # back under the limit: the count restarts
    feed(monitor, [21.0, 21.0, 21.0, 21.0])  # two more
    with pytest.raises(Diverged, match=r"mean 50 over the last 2 steps, above 20 "):
        feed(monitor, [50.0, 50.0])  # the third in a row


def test_small_and_negative_losses_use_a_floor_of_one():
    # A first loss of -0.2 (prompt losses can be negative): the limit is 10 x 1, not 10 x 0.2.
    monitor = LossMonitor(DivergenceParams(check_every=1, factor=10.0, patience=1))
    feed(monitor, [-0.2, 9.9, 0.5])
    with pytest.raises(Diverged):
        feed(monitor, [10.5])


def test_learned_nothing_compares_with_the_majority_class():
    assert learned_nothing(0.505, 0.5, 0.01) is not None  # within the margin of always answering one class
    assert learned_nothing(0.52, 0.5, 0.01) is None
    assert learned_nothing(0.1, 0.5, -1.0) is None  # a negative margin turns the rule off
    assert learned_nothing(1.0, 1.0, 0.01) is None  # one class: nothing to tell apart


def test_a_stream_of_one_class_experiences_completes():
    """Split digits into 10 experiences: the first experience's task-IL accuracy and its majority share
    are both 1, which rule 3 used to call diverged."""
    from tests.helpers import digits_experiment, run
    record = run(digits_experiment([{"name": "naive"}], n_experiences=10))
    assert record.status == "completed" and record.matrix[1][0] == 1.0


@pytest.mark.parametrize("table, message", [
    ({"factor": 0.5}, "factor must be > 1, got 0.5"),
    ({"check_every": 0}, "check_every must be >= 1"),
    ({"learned_margin": math.nan}, "learned_margin must be finite"),
])
def test_bad_divergence_settings_are_one_line_errors(cli, tiny_raw, write_experiment, store_url, table, message):
    result = cli("run", write_experiment(tiny_raw(divergence=table)), "--store", store_url, "--no-progress")
    assert result.rc == 2 and message in result.err and len(result.err.strip().splitlines()) == 1


def test_repeated_seeds_are_refused(cli, tiny_raw, write_experiment, store_url):
    result = cli("run", write_experiment(tiny_raw()), "--seeds", "0", "0", "--store", store_url, "--no-progress")
    assert result.rc == 2 and "seed 0 is listed twice" in result.err


@pytest.mark.parametrize("training", [
    {"optimizer": "sgd", "lr": 1e6, "batch_size": 32, "epochs": 1},
    {"optimizer": "sgd", "lr": 10.0, "batch_size": 32, "epochs": 1},
    {"optimizer": "adam", "lr": 1e3, "batch_size": 32, "epochs": 1},
])
def test_a_diverging_run_is_stored_as_diverged_and_the_others_still_run(cli, tiny_raw, write_experiment,
                                                                        store_url, tmp_path, training):
    raw = tiny_raw(training=training, strategies=[{"name": "naive"}], divergence={"check_every": 5})
    raw["seeds"] = [0, 1]
    result = cli("run", write_experiment(raw), "--store", store_url, "--no-progress")
    assert result.rc == 1
    assert "2 of 2 runs did not complete" in result.err
    runs = ResultStore(store_url).records()
    assert [r.status for r in runs] == ["diverged", "diverged"]
    assert all(r.metrics.acc is None and r.failure["experience"] >= 1 for r in runs)


def test_a_failing_strategy_is_recorded_where_it_stopped(cli, tiny_raw, write_experiment, store_url, monkeypatch,
                                                         tmp_path):
    er = STRATEGIES.get("er").obj
    original = er.after_step

    def breaks_later(self, batch, out):
        if self.experience.id == 1 and self.step == 3:
            raise RuntimeError("boom: a bug in a plugin")
        original(self, batch, out)

    monkeypatch.setattr(er, "after_step", breaks_later)
    result = cli("run", write_experiment(tiny_raw()), "--store", store_url, "--no-progress")
    assert result.rc == 1
    assert "1 of 3 runs did not complete" in result.err
    assert "failed at experience 2, step 3: RuntimeError: boom: a bug in a plugin" in result.err
    runs = {r.strategy: r for r in ResultStore(store_url).records()}
    assert runs["naive"].status == runs["joint"].status == "completed"  # the run after it still ran
    failed = runs["er"]
    assert failed.status == "failed" and failed.failure["step"] == 3 and "breaks_later" in failed.failure["traceback"]
    assert failed.matrix[1][0] is not None and failed.matrix[2][0] is None  # measured up to where it stopped
    shown = cli("show", failed.id, "--store", store_url)
    assert "failed at experience 2, step 3: RuntimeError: boom" in shown.out
    board = cli("leaderboard", "--store", store_url, "--out", tmp_path / "board", "--no-plots")
    assert board.rc == 0
    text = (tmp_path / "board" / "README.md").read_text()
    assert "- er seed 0: failed at experience 2, step 3: RuntimeError: boom" in text
    table = text.split("Runs that did not complete")[0]
    assert "| naive |" in table and "| er |" not in table  # never averaged into the table
    assert "failed" in (tmp_path / "board" / "results.csv").read_text()


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("hook", ["setup", "incompatibility"])
def test_a_strategy_that_cannot_be_built_fails_its_runs_and_the_others_still_run(
        cli, tiny_raw, write_experiment, store_url, monkeypatch, stack, hook):
    er = STRATEGIES.get("er").obj

    def broken(*args):
        raise RuntimeError(f"boom in {hook}")

    monkeypatch.setattr(er, hook, classmethod(broken) if hook == "incompatibility" else broken)
    raw = tiny_raw()
    raw["seeds"] = [0, 1]
    result = cli("run", write_experiment(raw), "--store", store_url, "--no-progress", *([] if stack else ["--no-stack"]))
    assert result.rc == 1 and "2 of 6 runs did not complete" in result.err
    assert f"failed before training: RuntimeError: boom in {hook}" in result.err
    runs = ResultStore(store_url).records()
    assert sorted((r.strategy, r.status) for r in runs) == [
        ("er", "failed"), ("er", "failed"), ("joint", "completed"), ("joint", "completed"),
        ("naive", "completed"), ("naive", "completed")]
    failed = [r for r in runs if r.status == "failed"]
    assert all(r.failure["experience"] == 0 and r.matrix[0][0] is None and r.metrics.acc is None for r in failed)
    assert all(f"boom in {hook}" in r.failure["traceback"] for r in failed)


def test_a_diverging_pretraining_stops_with_one_line(cli, tmp_path):
    (tmp_path / "pre.toml").write_text(
        f'name = "p"\nseed = 0\noutput = "{tmp_path / "p.pt"}"\n[dataset]\nname = "digits"\n[model]\nname = "mlp"\n'
        f'[training]\nepochs = 3\nbatch_size = 16\noptimizer = "sgd"\nlr = 1e8\n')
    result = cli("pretrain", tmp_path / "pre.toml", "--no-progress", "--device", "cpu")
    assert result.rc == 1 and len(result.err.strip().splitlines()) == 1 and "diverg" not in result.out
    assert not (tmp_path / "p.pt").exists()


def test_reading_commands_never_create_a_store_at_a_mistyped_path(cli, tmp_path):
    url = f"sqlite:///{tmp_path / 'typo' / 'cl.db'}"
    for argv in (("runs", "--store", url), ("show", "1", "--store", url),
                 ("leaderboard", "--store", url, "--out", tmp_path / "board")):
        result = cli(*argv)
        assert result.rc == 2 and "no result store at" in result.err
    assert not (tmp_path / "typo").exists()


def test_version_names_the_package_and_commit(cl_subprocess):
    result = cl_subprocess("--version")
    assert result.returncode == 0 and result.stdout.startswith("cl-bench ")


def test_a_read_only_store_is_refused_before_training(cli, tiny_raw, write_experiment, tmp_path, monkeypatch):
    from cl.store import ResultStore
    path = tmp_path / "ro.db"
    ResultStore(f"sqlite:///{path}")
    url = f"sqlite:///file:{path}?mode=ro&uri=true"  # read-only even for root, who ignores file modes
    monkeypatch.chdir(tmp_path / "..")
    result = cli("run", write_experiment(tiny_raw()), "--store", url, "--no-progress")
    assert result.rc == 2 and len(result.err.strip().splitlines()) == 1
    assert "cannot be written" in result.err and "readonly" in result.err
    assert "run " not in result.out  # nothing trained
    assert not (tmp_path / ".." / "file:").exists()  # the URI's path is the file, not a folder to create
    assert cli("runs", "--store", url).rc == 0  # and the reading commands find it


def test_a_lock_held_for_a_while_is_waited_for(cli, tiny_raw, write_experiment, store_url, tmp_path):
    import sqlite3
    import threading
    ResultStore(store_url)
    locked = threading.Event()

    def hold_lock():
        other = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        locked.set()
        threading.Event().wait(1.5)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=hold_lock)
    thread.start()
    locked.wait()
    result = cli("run", write_experiment(tiny_raw(strategies=[{"name": "naive"}])), "--store", store_url,
                 "--no-progress")
    thread.join()
    assert result.rc == 0 and [r.status for r in ResultStore(store_url).records()] == ["completed"]


def test_a_run_the_store_refuses_is_kept_in_a_file_and_imported_later(cli, tiny_raw, write_experiment,
                                                                       store_url, tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError
    real_write = ResultStore.write

    def refuse(self, record):
        raise OperationalError("INSERT INTO runs", {}, Exception("database is locked"))

    monkeypatch.setattr(ResultStore, "write", refuse)
    result = cli("run", write_experiment(tiny_raw(strategies=[{"name": "naive"}, {"name": "joint"}])),
                 "--store", store_url, "--no-progress")
    assert result.rc == 1 and "2 finished runs could not be written" in result.err
    kept = sorted((tmp_path / "unsaved").glob("run-*.json"))
    assert len(kept) == 2 and "NOT STORED" in result.out
    monkeypatch.setattr(ResultStore, "write", real_write)
    imported = cli("import", *kept, "--store", store_url)
    assert imported.rc == 0
    runs = ResultStore(store_url).records()
    assert sorted(r.strategy for r in runs) == ["joint", "naive"] and all(r.metrics.acc > 0.3 for r in runs)
    assert not any(path.exists() for path in kept)


def test_importing_something_else_is_a_one_line_error(cli, store_url, tmp_path):
    (tmp_path / "junk.json").write_text('{"not": "a run"}')
    result = cli("import", tmp_path / "junk.json", "--store", store_url)
    assert result.rc == 2 and "not a run kept by cl" in result.err and len(result.err.strip().splitlines()) == 1


def test_cl_runs_keeps_its_columns_aligned_for_long_names(cli, tiny_raw, write_experiment, store_url):
    raw = tiny_raw(name="an-experiment-name-much-longer-than-twenty-characters",
                   strategies=[{"name": "naive", "label": "a_strategy_label_longer_than_fourteen"}, {"name": "joint"}])
    assert cli("run", write_experiment(raw), "--store", store_url, "--no-progress").rc == 0
    lines = cli("runs", "--store", store_url).out.splitlines()
    starts = [line.index("status") if i == 0 else line.index("completed") for i, line in enumerate(lines)]
    assert len(lines) == 3 and len(set(starts)) == 1
    ends = {len(line) for line in lines}
    assert len(ends) == 1  # the last numeric column ends at the same place


def test_data_dir_for_a_dataset_that_reads_no_files_is_refused(cli, tiny_raw, write_experiment, store_url, tmp_path):
    result = cli("run", write_experiment(tiny_raw()), "--data-dir", tmp_path, "--store", store_url, "--no-progress")
    assert result.rc == 2 and "dataset 'digits' reads no files" in result.err


# ---------------------------------------------------------------- checkpoints and resume


def matrices(store_url):
    return {(r.strategy, r.seed): (r.matrix, r.task_il_matrix, r.budgets.forward_samples)
            for r in ResultStore(store_url).records()}


SGD = {"epochs": 2, "batch_size": 32, "lr": 0.1}
FAMILIES = {
    "replay": ([{"name": "naive"}, {"name": "er", "buffer_size": 50, "replay_batch_size": 10}], SGD),
    "gem": ([{"name": "gem", "memory_per_task": 20}, {"name": "agem", "memory_per_task": 20, "sample_size": 16}], SGD),
    "distillation": ([{"name": "lwf"}, {"name": "icarl", "buffer_size": 50}, {"name": "der", "buffer_size": 50},
                      {"name": "der_pp", "buffer_size": 50}], SGD),
    "regularisation": ([{"name": "ewc"}, {"name": "si"}], {"epochs": 2, "batch_size": 32, "lr": 0.05}),
    "hnet": ([{"name": "hnet", "chunk_size": 0, "hidden": [8]}],
             {"epochs": 4, "batch_size": 32, "optimizer": "adam", "lr": 0.003}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_interrupted_invocation_resumes_to_the_same_results_bit_for_bit(cli, tiny_raw, write_experiment,
                                                                           tmp_path, monkeypatch, family):
    from cl.resume import RunCheckpoint
    strategies, training = FAMILIES[family]
    raw = tiny_raw(strategies=strategies, scenario={"name": "class_incremental", "n_experiences": 4},
                   training=training)
    path = write_experiment(raw)
    whole = f"sqlite:///{tmp_path}/whole.db"
    assert cli("run", path, "--store", whole, "--no-progress").rc == 0

    save = RunCheckpoint.save

    def interrupt_after_the_second(self, experiences_done, *args):
        save(self, experiences_done, *args)
        if experiences_done == 2 and self.identity["label"] == strategies[-1].get("label", strategies[-1]["name"]):
            raise KeyboardInterrupt  # Ctrl-C in the last strategy's run, after its 2nd checkpoint

    monkeypatch.setattr(RunCheckpoint, "save", interrupt_after_the_second)
    parts = f"sqlite:///{tmp_path}/parts.db"
    first = cli("run", path, "--store", parts, "--no-progress")
    assert first.rc == 130 and "--resume" in first.err
    ids_before = {r["strategy"]: r["id"] for r in ResultStore(parts).list_runs()}
    assert len(ids_before) == len(strategies) - 1  # the interrupted run left no record
    monkeypatch.setattr(RunCheckpoint, "save", save)
    second = cli("run", path, "--store", parts, "--no-progress", "--resume")
    assert second.rc == 0 and second.out.count("(already stored)") == len(strategies) - 1
    assert matrices(parts) == matrices(whole)
    assert {r["strategy"]: r["id"] for r in ResultStore(parts).list_runs() if r["strategy"] in ids_before} \
        == ids_before  # finished runs keep their ids
    assert not any((tmp_path / "checkpoints").rglob("*.pt"))  # removed once stored
    assert sorted(p.name for p in (tmp_path / "checkpoints").rglob("*")) == ["parts.db", "whole.db"]  # no empty run folders


def test_a_resumed_joint_run_still_gets_the_check_of_its_only_evaluation(cli, tiny_raw, write_experiment, tmp_path,
                                                                        monkeypatch):
    """Joint training checkpoints experiences it does not evaluate; resumed from one, its first (and only)
    evaluation after training was taken for a later one, and a run that learned nothing was stored as
    completed, where the run uninterrupted is diverged (rule 3)."""
    from cl.resume import RunCheckpoint
    path = write_experiment(tiny_raw(strategies=[{"name": "joint"}], training={"epochs": 1, "lr": 1e-7},
                                     scenario={"name": "class_incremental", "n_experiences": 3}))
    whole = f"sqlite:///{tmp_path}/whole.db"
    assert cli("run", path, "--store", whole, "--no-progress").rc == 1
    save = RunCheckpoint.save

    def interrupt_after_the_second(self, experiences_done, *args):
        save(self, experiences_done, *args)
        if experiences_done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunCheckpoint, "save", interrupt_after_the_second)
    parts = f"sqlite:///{tmp_path}/parts.db"
    assert cli("run", path, "--store", parts, "--no-progress").rc == 130
    monkeypatch.setattr(RunCheckpoint, "save", save)
    continued = restores(monkeypatch)
    assert cli("run", path, "--store", parts, "--no-progress", "--resume").rc == 1
    assert continued == [2]
    (a,), (b,) = ResultStore(whole).records(), ResultStore(parts).records()
    assert a.status == b.status == "diverged" and a.failure["reason"] == b.failure["reason"]
    assert "no better than always answering its most common class" in b.failure["reason"]


def test_a_killed_run_resumes_exactly(cl_subprocess, tiny_raw, write_experiment, tmp_path):
    """SIGKILL after the second experience's checkpoint, in a real process."""
    import signal
    import subprocess
    import time
    from tests.conftest import CL_EXE
    raw = tiny_raw(strategies=[{"name": "er", "buffer_size": 50, "replay_batch_size": 10}],
                   scenario={"name": "class_incremental", "n_experiences": 5},
                   training={"epochs": 40, "batch_size": 32, "lr": 0.05})
    path = write_experiment(raw)
    whole, parts = f"sqlite:///{tmp_path}/whole.db", f"sqlite:///{tmp_path}/parts.db"
    assert cl_subprocess("run", path, "--store", whole, "--no-progress").returncode == 0
    proc = subprocess.Popen([str(CL_EXE), "run", str(path), "--store", parts, "--no-progress"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "checkpoints").rglob("checkpoint.pt"))
        if found and torch.load(found[0], weights_only=True)["experiences_done"] >= 2:
            checkpoint = found[0]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert checkpoint is not None and proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    assert ResultStore(parts).list_runs() == []
    resumed = cl_subprocess("run", path, "--store", parts, "--no-progress", "--resume")
    assert resumed.returncode == 0
    assert matrices(parts) == matrices(whole)


def interrupted_after_the_first_checkpoint(cli, tiny_raw, write_experiment, store_url, monkeypatch, *overrides):
    """A naive run (3 experiences) stopped by Ctrl-C right after its first checkpoint; its experiment file.
    `overrides`: --set values of the interrupted invocation."""
    from cl.resume import RunCheckpoint
    path = write_experiment(tiny_raw(strategies=[{"name": "naive"}],
                                     scenario={"name": "class_incremental", "n_experiences": 3}))
    save = RunCheckpoint.save

    def interrupt(self, *args):
        save(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunCheckpoint, "save", interrupt)
    sets = [arg for value in overrides for arg in ("--set", value)]
    assert cli("run", path, "--store", store_url, "--no-progress", *sets).rc == 130
    monkeypatch.setattr(RunCheckpoint, "save", save)
    return path


def restores(monkeypatch) -> list[int]:
    """The experiences done of each checkpoint that runs continue from, from now on."""
    from cl.resume import RunCheckpoint
    restore, done = RunCheckpoint.restore, []

    def counted(self, state, *args):
        done.append(state["experiences_done"])
        return restore(self, state, *args)

    monkeypatch.setattr(RunCheckpoint, "restore", counted)
    return done


def test_parallel_runs_of_one_file_with_other_set_values_keep_their_own_checkpoints(cli, tiny_raw, write_experiment,
                                                                                   store_url, tmp_path, monkeypatch):
    """Two invocations of one experiment file with different --set values (a user's parallel runs), both
    interrupted: each checkpoint stays in a folder of its own, and each resumes from its own, in any order."""
    path = interrupted_after_the_first_checkpoint(cli, tiny_raw, write_experiment, store_url, monkeypatch,
                                                  "training.lr=0.1")
    interrupted_after_the_first_checkpoint(cli, tiny_raw, write_experiment, store_url, monkeypatch, "training.lr=0.2")
    assert len(list(tmp_path.rglob("checkpoint.pt"))) == 2
    continued = restores(monkeypatch)
    for lr in ("0.2", "0.1"):
        result = cli("run", path, "--store", store_url, "--no-progress", "--resume", "--set", f"training.lr={lr}")
        assert result.rc == 0 and "another configuration" not in result.out
    assert continued == [1, 1]  # both went on from their first experience
    assert sorted(r.config["training"]["lr"] for r in ResultStore(store_url).records()) == [0.1, 0.2]
    assert not list(tmp_path.rglob("checkpoint.pt"))


def test_a_resume_with_other_set_values_starts_over_and_names_the_checkpoint_it_leaves(cli, tiny_raw,
                                                                                    write_experiment, store_url,
                                                                                    tmp_path, monkeypatch):
    path = interrupted_after_the_first_checkpoint(cli, tiny_raw, write_experiment, store_url, monkeypatch)
    continued = restores(monkeypatch)
    result = cli("run", path, "--store", store_url, "--no-progress", "--resume", "--set", "training.lr=0.2")
    assert result.rc == 0 and continued == []
    assert ("naive seed 0: starts from the beginning; a checkpoint of another configuration "
            "(setup.training.lr: 0.1 -> 0.2) is left for its own --resume") in result.out
    assert len(list(tmp_path.rglob("checkpoint.pt"))) == 1  # the lr 0.1 run's, still resumable
    assert cli("run", path, "--store", store_url, "--no-progress", "--resume").rc == 0 and continued == [1]


def test_a_checkpoint_of_another_code_version_is_refused_naming_the_change(cli, tiny_raw, write_experiment,
                                                                          store_url, monkeypatch):
    path = interrupted_after_the_first_checkpoint(cli, tiny_raw, write_experiment, store_url, monkeypatch)
    monkeypatch.setattr("cl.runner.code_version", lambda: "cl-bench 9.9 (0123abcd)")
    result = cli("run", path, "--store", store_url, "--no-progress", "--resume")
    assert result.rc == 2 and len(result.err.strip().splitlines()) == 1
    assert "another configuration (setup.code_version: " in result.err and "-> 'cl-bench 9.9 (0123abcd)'" in result.err
    assert ResultStore(store_url).list_runs() == []


def test_a_checkpoint_whose_state_does_not_fit_the_model_is_a_one_line_error(cli, tiny_raw, write_experiment,
                                                                             store_url, tmp_path, monkeypatch):
    """Code that changed outside what the code version sees (an untracked plugin file, say) can leave a
    checkpoint of the same identity whose tensors no longer fit."""
    path = interrupted_after_the_first_checkpoint(cli, tiny_raw, write_experiment, store_url, monkeypatch)
    (checkpoint,) = tmp_path.rglob("checkpoint.pt")
    state = torch.load(checkpoint, weights_only=True)
    weights = state["strategy"]["modules"]["model"]
    name = next(k for k in weights if k.endswith("weight"))
    weights[name] = torch.zeros(3, 3)
    torch.save(state, checkpoint)
    result = cli("run", path, "--store", store_url, "--no-progress", "--resume")
    assert result.rc == 2 and len(result.err.strip().splitlines()) == 1
    assert "does not fit this code (RuntimeError" in result.err and "size mismatch" in result.err
    assert "run without --resume" in result.err
    assert ResultStore(store_url).list_runs() == []


def test_a_missing_database_driver_is_named_with_the_package_to_install(cli):
    result = cli("runs", "--store", "postgresql+psycopg2://user@localhost/cl")  # psycopg (3) is installed
    assert result.rc == 2 and "driver 'psycopg2' is not installed; pip install psycopg2-binary" in result.err


def test_leaderboard_out_on_a_file_is_a_one_line_error(cli, store_url, tmp_path):
    ResultStore(store_url)
    (tmp_path / "taken").write_text("a file")
    result = cli("leaderboard", "--store", store_url, "--out", tmp_path / "taken", "--no-plots")
    assert result.rc == 2 and len(result.err.strip().splitlines()) == 1
    assert "leaderboard --out" in result.err and "cannot write there" in result.err


@pytest.mark.parametrize("freeze, gradients", [([], 4810), (["features"], 650)])
def test_the_memory_bound_counts_samples_as_stored_and_gradients_of_trained_weights_only(monkeypatch, freeze,
                                                                                         gradients):
    """The bound is a lower bound: uint8 samples cost a byte a value (buffers keep them as stored), frozen
    weights have no gradient; it used to charge 4 float32 copies of every weight and float32 inputs plus
    a row of logits per sample, refusing runs that fit (digits: 4 x 4 x 4810 + 1000 x 74 x 4 bytes)."""
    import dataclasses

    from cl.errors import UserError
    from cl.runner import build_scenario, check_compatibility, input_pipeline, load_datasets
    from tests.helpers import digits_experiment
    cfg = digits_experiment([{"name": "er", "buffer_size": 1000}], hidden=[64], freeze=freeze)
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
    as_bytes = [dataclasses.replace(e, x=e.x.to(torch.uint8)) for e in scenario.train]  # 64 bytes a sample
    scenario = dataclasses.replace(scenario, train=as_bytes)
    need = 4 * (4810 + gradients) + 1000 * 64  # MLP 64-64-10: 4810 weights
    pipeline = input_pipeline(cfg, scenario, torch.device("cpu"))
    monkeypatch.setattr("cl.runner.available_bytes", lambda device: need)
    check_compatibility(cfg, scenario, pipeline)
    monkeypatch.setattr("cl.runner.available_bytes", lambda device: need - 1)
    with pytest.raises(UserError, match=f"4,810 model parameters with {gradients:,} gradients and 1,000 stored "
                                        f"samples of 64 bytes"):
        check_compatibility(cfg, scenario, pipeline)


@pytest.mark.parametrize("override, what", [
    ("model.hidden=[1000000000000]", "model parameters with"),
    ("strategies.er.buffer_size=100000000000", "100,000,000,000 stored samples"),
])
def test_a_run_too_large_for_memory_is_refused_before_anything_is_allocated(cli, tiny_raw, write_experiment,
                                                                           store_url, override, what):
    result = cli("run", write_experiment(tiny_raw()), "--set", override, "--store", store_url, "--no-progress")
    assert result.rc == 2 and len(result.err.strip().splitlines()) == 1
    assert "needs at least" in result.err and what in result.err and "free" in result.err
    assert ResultStore(store_url).list_runs() == []
