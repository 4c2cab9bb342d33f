"""The `cl` command line: run, runs, show, list; exit codes and one-line errors."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cl.params import NoParams
from cl.registry import STRATEGIES, Entry
from cl.store import HEADLINE, ResultStore
from cl.strategy import Strategy


# ---------------------------------------------------------------- cl run / runs / show


def test_run_prints_comparison_and_stores_each_strategy(run_tiny, stored, store_url):
    result = run_tiny()
    assert result.rc == 0, result.err
    assert result.err == ""
    assert f"experiment tiny: 3 strategies x 1 seeds on cpu, results -> {store_url}" in result.out
    header = next(line for line in result.out.splitlines() if line.startswith("strategy"))
    for column in ("seeds", "ACC", "task-IL ACC", "BWT", "Forgetting", "task-IL FWT", "time s", "memory MiB"):
        assert column in header
    table = result.out[result.out.index(header):].splitlines()[2:]
    note = "mean ± standard deviation over seeds (the leaderboard gives 95% confidence half-widths)"
    table = table[:table.index(note)]  # what ± means follows the rows
    assert sorted(line.split()[0] for line in table) == ["er", "joint", "naive"]
    for line in table:
        assert line.split()[1] == "1"  # one seed each

    runs = stored()
    assert [(r["strategy"], r["seed"], r["status"], r["experiment"]) for r in runs] == [
        ("naive", 0, "completed", "tiny"), ("er", 0, "completed", "tiny"), ("joint", 0, "completed", "tiny")]
    assert len({r["id"] for r in runs}) == 3
    for r in runs:
        for key in ("id", "experiment", "strategy", "seed", "status", "params", "created_at", "wall_seconds",
                    "memory_bytes", "forward_samples", *HEADLINE):
            assert key in r, key
        assert 0.0 <= r["acc"] <= 1.0
        assert 0.0 <= r["task_il_acc"] <= 1.0
    naive = runs[0]
    assert isinstance(naive["bwt"], float) and isinstance(naive["forgetting"], float)
    assert naive["forgetting"] > 0  # fine-tuning on class-IL digits forgets
    assert runs[1]["params"] == {"buffer_size": 50, "replay_batch_size": 10, "buffer": "reservoir"}
    # every stored run is announced with its id
    for r in runs:
        assert f"run {r['id']}: {r['strategy']}" in result.out


def test_runs_table_and_experiment_filter(run_tiny, cli, store_url, stored):
    assert run_tiny().rc == 0
    result = cli("runs", "--store", store_url)
    assert result.rc == 0
    lines = result.out.splitlines()
    assert lines[0].split()[:5] == ["id", "experiment", "strategy", "seed", "status"]
    assert len(lines) == 4
    assert stored("--experiment", "tiny") == stored()
    assert stored("--experiment", "other") == []


def test_runs_on_empty_store(cli, store_url):
    ResultStore(store_url)  # created, with no runs
    result = cli("runs", "--store", store_url)
    assert result.rc == 0 and f"no runs in {store_url}" in result.out
    assert cli("runs", "--json", "--store", store_url).json() == []


def test_rerun_replaces_runs(run_tiny, stored, tiny_raw):
    assert run_tiny(tiny_raw(strategies=[{"name": "naive"}])).rc == 0
    first = stored()
    assert run_tiny(tiny_raw(strategies=[{"name": "naive"}])).rc == 0
    again = stored()
    assert len(again) == 1
    assert again[0]["acc"] == first[0]["acc"]  # same seed, same result
    # a changed hyperparameter is a different run
    assert run_tiny(tiny_raw(strategies=[{"name": "naive"}]), "--set", "training.lr=0.05").rc == 0
    assert len(stored()) == 2


def test_a_stacked_run_shows_its_share_of_the_wall_time(run_tiny, tiny_raw, cli, store_url, stored):
    raw = tiny_raw(strategies=[{"name": "er", "buffer_size": 50}])
    raw["seeds"] = [0, 1]
    result = run_tiny(raw)
    assert result.rc == 0, result.err
    run = stored()[0]
    share, group = map(float, re.search(r"([\d.]+)s \(([\d.]+)s for 2 stacked\)", result.out).groups())
    assert share == pytest.approx(group / 2, abs=0.06) and share == pytest.approx(run["wall_seconds"], abs=0.06)
    shown = cli("show", run["id"], "--store", store_url).out
    assert f"budgets: wall {share:.1f}s (its share of {group:.1f}s for 2 runs trained stacked)" in shown


def test_show_prints_matrix_with_init_row(run_tiny, cli, store_url, stored):
    assert run_tiny().rc == 0
    naive = stored()[0]
    result = cli("show", naive["id"], "--store", store_url)
    assert result.rc == 0, result.err
    out = result.out
    assert f"run {naive['id']}: tiny / naive / seed 0 (completed)" in out
    assert "accuracy matrix (class-il):" in out
    assert "task-IL accuracy matrix:" in out
    lines = out.splitlines()
    start = lines.index("accuracy matrix (class-il):")
    assert lines[start + 1].split() == ["after", "\\", "on", "exp", "1", "exp", "2"]
    assert lines[start + 2].startswith("init")
    assert lines[start + 3].startswith("exp 1")
    assert lines[start + 4].startswith("exp 2")
    final = [float(v) for v in lines[start + 4].split()[2:]]
    assert sum(final) / 2 == pytest.approx(naive["acc"], abs=1e-3)
    assert f"acc              {naive['acc']:.4f}" in out
    assert "budgets: wall" in out and "device: cpu" in out
    assert "code: cl-bench" in out and "strategy from cl-bench" in out


def test_show_json(run_tiny, cli, store_url, stored):
    assert run_tiny().rc == 0
    er = stored()[1]
    run = cli("show", er["id"], "--json", "--store", store_url).json()
    for key in ("matrix", "metrics", "config", "task_il_matrix", "task_il_metrics", "budgets", "logs", "provenance",
                "scenario"):
        assert key in run, key
    assert run["provenance"]["strategy_package"]["name"] == "cl-bench"
    assert run["id"] == er["id"] and run["strategy"] == "er"
    assert len(run["matrix"]) == 3 and len(run["task_il_matrix"]) == 3
    assert run["metrics"]["acc"] == er["acc"]
    assert run["config"]["strategy"]["buffer_size"] == 50
    assert run["config"]["model"] == {"name": "mlp", "multi_head": False, "hidden": [32]}
    assert run["config"]["training"]["batch_size"] == 32


def test_joint_run_has_only_first_and_last_rows(run_tiny, cli, store_url, stored, tiny_raw):
    raw = tiny_raw(strategies=[{"name": "joint"}])
    raw["scenario"]["n_experiences"] = 3
    assert run_tiny(raw).rc == 0
    (row,) = stored()
    assert row["bwt"] is None and row["fwt"] is None and row["forgetting"] is None
    assert row["acc"] is not None
    run = cli("show", row["id"], "--json", "--store", store_url).json()
    T = 3
    assert len(run["matrix"]) == T + 1
    assert all(v is not None for v in run["matrix"][0])
    assert all(v is not None for v in run["matrix"][T])
    for i in range(1, T):
        assert run["matrix"][i] == [None] * T
        assert run["task_il_matrix"][i] == [None] * T
    for name in ("bwt", "fwt", "forgetting"):
        assert run["metrics"][name] is None
    assert run["metrics"]["acc"] == pytest.approx(sum(run["matrix"][T]) / T)
    text = cli("show", row["id"], "--store", store_url).out
    assert "exp 1             -       -       -" in text
    assert "bwt                   -" in text


def test_seeds_option_overrides_file(run_tiny, stored, tiny_raw):
    result = run_tiny(tiny_raw(seeds=[0, 1, 2], strategies=[{"name": "naive"}]), "--seeds", "3", "4")
    assert result.rc == 0, result.err
    assert "1 strategies x 2 seeds" in result.out
    assert sorted(r["seed"] for r in stored()) == [3, 4]
    (row,) = [line.split() for line in result.out.splitlines() if line.startswith("naive ")]
    assert row[1] == "2" and row[3] == "±"  # the table aggregates the two seeds: mean ± std


def test_seed_out_of_range(run_tiny, tiny_raw, one_line_error):
    result = run_tiny(tiny_raw(strategies=[{"name": "naive"}]), "--seeds", str(2**63))
    assert result.rc == 2
    one_line_error(result.err)


def test_strategy_option_runs_only_that_strategy(run_tiny, stored):
    result = run_tiny(None, "--strategy", "er")
    assert result.rc == 0, result.err
    assert [r["strategy"] for r in stored()] == ["er"]


def test_set_option_reaches_the_stored_run(run_tiny, stored, cli, store_url):
    result = run_tiny(None, "--strategy", "er", "--set", "strategies.er.buffer_size=20",
                      "--set", "training.lr=0.05")
    assert result.rc == 0, result.err
    (row,) = stored()
    assert row["params"]["buffer_size"] == 20
    assert cli("show", row["id"], "--json", "--store", store_url).json()["config"]["training"]["lr"] == 0.05


# ---------------------------------------------------------------- cl list


def list_output(cli, what: str) -> str:
    result = cli("list", what)
    assert result.rc == 0, result.err
    return result.out


def test_list_strategies(cli):
    out = list_output(cli, "strategies")
    names = [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")]
    for name in ("naive", "er", "joint", "cumulative", "gem", "agem", "lwf", "icarl", "der", "der_pp", "ewc", "si",
                 "hnet", "l2p", "dualprompt"):
        assert name in names
    assert names == sorted(names)
    summaries = [line for line in out.splitlines() if not line.startswith(" ")]
    assert all(line.endswith((".", ")")) for line in summaries), "a summary cut off at its docstring's first line"
    er_block = out[out.index("\ner:"):]
    assert "    buffer_size (int >= 1, default 500): samples kept in memory" in er_block
    assert "    replay_batch_size (int >= 1, default 10)" in er_block
    assert "buffer ('reservoir'|'class_balanced', default 'reservoir')" in er_block
    gem_block = out[out.index("\ngem:"):]
    assert gem_block.splitlines()[2] == "    settings: class-il, task-il, domain-il; models: any"
    for text in ("memory_per_task (int >= 1, default 256)", "memory_strength (float >= 0, default 0.5)",
                 "ridge (float >= 0, default 0.001)", "solver ('auto'|'quadprog'|'active_set', default 'auto')"):
        assert text in gem_block
    icarl_block = out[out.index("\nicarl:"):]
    assert icarl_block.splitlines()[2] == "    settings: class-il, task-il; models: any"
    assert "classifier ('nme'|'head', default 'nme')" in icarl_block
    for name, text in (("der_pp", "beta (float >= 0, default 0.5)"), ("ewc", "ewc_lambda (float >= 0, default 100.0)"),
                       ("si", "xi (float > 0, default 1.0)"), ("lwf", "temperature (float > 0, default 2.0)")):
        assert text in out[out.index(f"\n{name}:"):]
    assert "sample_size (int >= 1, default 256)" in ("\n" + out)[("\n" + out).index("\nagem:"):]
    hnet_block = out[out.index("\nhnet:"):]
    assert hnet_block.splitlines()[2] == ("    settings: class-il, task-il, domain-il; models: any without batch-norm "
                                          "running statistics (mlp, cnn)")
    for text in ("chunk_size (int >= 0, default 42000)", "beta (float >= 0, default 0.01)", "lookahead (bool, default False)",
                 "task_inference ('entropy'|'latest', default 'entropy')"):
        assert text in hnet_block
    l2p_block = out[out.index("\nl2p:"):]
    assert l2p_block.splitlines()[2] == "    settings: class-il, task-il, domain-il; models: vit"
    assert "top_k (int >= 1, default 5)" in l2p_block


def test_hnet_run_show_and_leaderboard_report_the_compression_ratio(run_tiny, tiny_raw, cli, store_url, stored,
                                                                     tmp_path):
    raw = tiny_raw(strategies=[{"name": "naive"}, {"name": "hnet", "hidden": [4], "chunk_size": 300,
                                                    "embedding_dim": 8, "chunk_embedding_dim": 8}])
    result = run_tiny(raw)
    assert result.rc == 0, result.err
    assert "hnet/target params" in result.out
    hnet = next(r for r in stored() if r["strategy"] == "hnet")
    n_target = 64 * 32 + 32 + 32 * 10 + 10
    n_hnet = 16 * 4 + 4 + 4 * 300 + 300 + -(-n_target // 300) * 8 + 2 * 8
    shown = cli("show", hnet["id"], "--store", store_url).out
    assert f"model: target_parameters {n_target}, hypernetwork_parameters {n_hnet}, " \
           f"compression_ratio {n_hnet / n_target:.4g}" in shown
    assert cli("leaderboard", "--store", store_url, "--out", tmp_path / "lb").rc == 0
    table = (tmp_path / "lb" / "README.md").read_text()
    assert "| hnet/target params |" in table
    row = next(line for line in table.splitlines() if line.startswith("| hnet |"))
    assert row.endswith(f"| {n_hnet / n_target:.3f} |")


def test_hnet_refuses_a_target_with_batch_norm_in_one_line(run_tiny, tiny_raw, stored, one_line_error):
    raw = tiny_raw(strategies=[{"name": "naive"}, {"name": "hnet"}], model={"name": "resnet18_reduced"})
    result = run_tiny(raw)
    assert result.rc == 2
    assert "'resnet18_reduced' keeps batch-norm running statistics" in one_line_error(result.err)
    assert stored() == []  # refused before the first strategy trained


@pytest.mark.parametrize("what, expected", [
    ("scenarios", {"class_incremental": "n_experiences (int in [1, 1000], default 5)",
                   "permuted": "fraction (float in [0, 1], default 1.0)",
                   "rotated": "max_angle (float, default 180.0)", "blurry": "overlap (float in [0, 1], default 0.1)",
                   "domain_incremental": "resize (bool, default True)"}),
    ("datasets", {"digits": "test_fraction (float in (0, 1), default 0.2)", "fashion_mnist": "data_dir (str, default",
                  "mnist": "data_dir (str, default 'data/mnist')", "cifar10": "data_dir",
                  "mnist1d": "n_samples (int in [10, 10000000], default 5000)"}),
    ("models", {"mlp": "hidden (list[int] >= 1, default [100, 100])",
                "cnn": "channels (list[int] >= 1, default [32, 64])", "resnet18_reduced": "width (int >= 1, default 20)"}),
])
def test_list_builtins_with_params(cli, what, expected):
    out = list_output(cli, what)
    blocks = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.split(":")[0]
            blocks[current] = line
        else:
            blocks[current] += "\n" + line
    for name, param_text in expected.items():
        assert name in blocks, f"{name} not listed"
        assert param_text in blocks[name]
        assert len(blocks[name].splitlines()[0]) > len(name) + 2  # a one-line description


def test_list_training_and_transforms(cli):
    training = list_output(cli, "training")
    for text in ("optimizer_policy ('reset'|'keep', default 'reset')", "freeze (list[str], default [])",
                 "lr_scale (table of float > 0, default {})", "grad_clip_norm (float >= 0, default 0.0)",
                 "task_il_mask (bool, default True)"):
        assert text in training
    transforms = list_output(cli, "transforms")
    for text in ("crop_padding (int >= 0, default 0)", "horizontal_flip (bool, default False)",
                 "normalize (bool, default False)", "resize (list[int] in [1, 4096], default [])"):
        assert text in transforms


# ---------------------------------------------------------------- bad input: exit 2, one line


class ClassILOnly(Strategy):
    """Test strategy that supports class-IL scenarios only."""

    supported_settings = ("class-il",)


@pytest.fixture
def class_il_only(monkeypatch):
    STRATEGIES.names()  # load the built-ins first
    monkeypatch.setitem(STRATEGIES._entries, "class_il_only",
                        Entry("class_il_only", ClassILOnly, NoParams, "class-IL only", __name__))
    ClassILOnly.registered_name = "class_il_only"


def test_incompatible_strategy_is_refused_before_anything_trains(run_tiny, tiny_raw, class_il_only,
                                                                 one_line_error, stored, store_url):
    raw = tiny_raw(strategies=[{"name": "naive"}, {"name": "class_il_only"}])
    raw["scenario"]["task_labels"] = True
    result = run_tiny(raw)
    assert result.rc == 2
    line = one_line_error(result.err)
    assert "strategy 'class_il_only' supports class-il scenarios, but this one is task-il" in line
    assert stored() == []  # naive, listed first, did not run either
    assert "run 1" not in result.out
    assert not store_file(store_url).exists()  # refused before the store was created


@pytest.mark.parametrize("n_samples, empty", [(100, "experience 7 of 10 (seed 0) has no test samples"),
                                              (10, "experience 3 of 10 (seed 0) has no training samples")])
def test_an_experience_without_samples_is_refused(n_samples, empty, run_tiny, tiny_raw, one_line_error, store_url):
    """MNIST-1D's split is not stratified: 100 or 10 samples over 10 classes leave some experience empty,
    which used to be stored as a completed run without metrics, or a failed one."""
    raw = tiny_raw(strategies=[{"name": "naive"}], dataset={"name": "mnist1d", "n_samples": n_samples})
    raw["scenario"]["n_experiences"] = 10
    result = run_tiny(raw)
    assert result.rc == 2 and empty in one_line_error(result.err)
    assert not store_file(store_url).exists()


def test_unknown_strategy_in_file(run_tiny, tiny_raw, one_line_error, stored):
    result = run_tiny(tiny_raw(strategies=[{"name": "hat"}]))
    assert result.rc == 2
    line = one_line_error(result.err)
    assert "unknown strategy 'hat'" in line and "naive" in line
    assert stored() == []


def test_wrong_parameter_type(run_tiny, tiny_raw, one_line_error):
    raw = tiny_raw()
    raw["training"]["lr"] = "fast"
    result = run_tiny(raw)
    assert result.rc == 2
    assert "lr must be float, got 'fast'" in one_line_error(result.err)


def test_bad_set_on_command_line(run_tiny, one_line_error):
    result = run_tiny(None, "--set", "strategies.nope.x=1")
    assert result.rc == 2
    assert "no strategy 'nope'" in one_line_error(result.err)


def test_unknown_strategy_option(run_tiny, one_line_error):
    result = run_tiny(None, "--strategy", "ewc")
    assert result.rc == 2
    assert "--strategy 'ewc' is not in this experiment" in one_line_error(result.err)


def test_missing_experiment_file(cli, tmp_path, store_url, one_line_error):
    result = cli("run", tmp_path / "missing.toml", "--store", store_url, "--no-progress")
    assert result.rc == 2
    assert "missing.toml" in one_line_error(result.err)


def store_file(store_url: str) -> Path:
    return Path(store_url.removeprefix("sqlite:///"))


def test_missing_dataset_folder(run_tiny, tiny_raw, tmp_path, one_line_error, store_url):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_tiny(tiny_raw(dataset={"name": "fashion_mnist"}), "--data-dir", empty)
    assert result.rc == 2
    line = one_line_error(result.err)
    assert "fashion_mnist" in line and str(empty) in line
    assert not store_file(store_url).exists()  # refused before the store was created


def test_missing_dataset_folder_that_does_not_exist(run_tiny, tiny_raw, tmp_path, one_line_error, store_url):
    result = run_tiny(tiny_raw(dataset={"name": "fashion_mnist"}), "--data-dir", tmp_path / "nope")
    assert result.rc == 2
    line = one_line_error(result.err)
    assert f"folder {tmp_path / 'nope'} not found" in line and "point --data-dir at a folder holding" in line
    assert not store_file(store_url).exists()


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://x/y"])
def test_bad_store_url(cli, write_experiment, url, one_line_error):
    result = cli("run", write_experiment(), "--store", url, "--no-progress")
    assert result.rc == 2
    assert repr(url) in one_line_error(result.err)
    assert cli("runs", "--store", url).rc == 2
    assert cli("show", "1", "--store", url).rc == 2


def test_store_path_under_a_file(cli, write_experiment, tmp_path, one_line_error):
    (tmp_path / "afile").write_text("x")
    result = cli("run", write_experiment(), "--store", f"sqlite:///{tmp_path}/afile/x.db", "--no-progress")
    assert result.rc == 2
    one_line_error(result.err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_cuda(run_tiny, device, one_line_error, stored):
    result = run_tiny(None, "--device", device)
    assert result.rc == 2
    line = one_line_error(result.err)
    assert "no CUDA device" in line and "--device cpu" in line
    assert stored() == []


@pytest.mark.parametrize("device", ["tpu", "mps", "meta", "cuda:x"])
def test_unknown_device(run_tiny, one_line_error, device):
    result = run_tiny(None, "--device", device)
    assert result.rc == 2
    assert "expected auto, cpu, cuda or cuda:N" in one_line_error(result.err)


def test_usage_errors_are_one_line():
    import subprocess
    import sys
    from pathlib import Path

    cl = Path(sys.executable).with_name("cl")
    for args in ([], ["run"], ["frobnicate"], ["list", "nothing"]):
        result = subprocess.run([str(cl), *args], capture_output=True, text=True)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("cl") and "error:" in result.stderr


def test_show_unknown_id(cli, store_url, one_line_error):
    ResultStore(store_url)
    result = cli("show", "999", "--store", store_url)
    assert result.rc == 2
    assert "no run with id 999" in one_line_error(result.err)


# ---------------------------------------------------------------- failed runs: stored with their status, exit 1


def test_nan_loss_is_stored_as_diverged(run_tiny, tiny_raw, stored):
    result = run_tiny(tiny_raw(strategies=[{"name": "naive"}]), "--set", "training.lr=1e30")
    assert result.rc == 1
    summary, line = result.err.strip().splitlines()
    assert summary.startswith("cl: 1 of 1 runs did not complete")
    assert "naive" in line and "diverged at experience 1" in line and "NaN/inf" in line and "training.lr" in line
    assert [(r["strategy"], r["status"], r["acc"]) for r in stored()] == [("naive", "diverged", None)]


class NanLoss(Strategy):
    """Test strategy whose loss is NaN from the first step."""

    def loss(self, batch):
        return F.cross_entropy(self.forward(batch.x, batch.t), batch.y) * float("nan")


@pytest.fixture
def nan_strategy(monkeypatch):
    STRATEGIES.names()  # load the built-ins first
    monkeypatch.setitem(STRATEGIES._entries, "nan_loss",
                        Entry("nan_loss", NanLoss, NoParams, "NaN loss", __name__))


def test_the_runs_after_a_failure_still_run(run_tiny, tiny_raw, nan_strategy, stored):
    raw = tiny_raw(seeds=[0, 1], strategies=[{"name": "naive"}, {"name": "er", "buffer_size": 50},
                                             {"name": "nan_loss"}, {"name": "joint"}])
    result = run_tiny(raw)
    assert result.rc == 1
    assert result.err.startswith("cl: 2 of 8 runs did not complete")
    assert [(r["strategy"], r["seed"], r["status"]) for r in stored()] == [
        ("naive", 0, "completed"), ("naive", 1, "completed"), ("er", 0, "completed"), ("er", 1, "completed"),
        ("nan_loss", 0, "diverged"), ("nan_loss", 1, "diverged"), ("joint", 0, "completed"), ("joint", 1, "completed")]
    announced = [line.split()[2] for line in result.out.splitlines() if line.startswith("run ")]
    assert announced == ["naive", "naive", "er", "er", "nan_loss", "nan_loss", "joint", "joint"]
    assert "nan_loss" not in result.out.split("strategy")[-1]  # not in the comparison table


# ---------------------------------------------------------------- the real executable


def test_subprocess_exit_codes_and_one_line_errors(cl_subprocess, run_tiny, write_experiment, tiny_raw,
                                                   store_url, one_line_error, stored):
    bad = write_experiment(tiny_raw(strategies=[{"name": "hat"}]), name="bad.toml")
    proc = cl_subprocess("run", bad, "--store", store_url, "--no-progress")
    assert proc.returncode == 2
    assert "unknown strategy 'hat'" in one_line_error(proc.stderr)

    good = write_experiment(tiny_raw(strategies=[{"name": "naive"}]), name="good.toml")
    proc = cl_subprocess("run", good, "--store", store_url, "--no-progress", "--set", "training.lr=1e30")
    assert proc.returncode == 1 and proc.stderr.startswith("cl: 1 of 1 runs did not complete")
    assert [r["status"] for r in stored()] == ["diverged"]

    proc = cl_subprocess("show", "999", "--store", store_url)
    assert proc.returncode == 2
    assert "no run with id 999" in one_line_error(proc.stderr)

    assert run_tiny(tiny_raw(strategies=[{"name": "naive"}]), "--seeds", "5").rc == 0  # in-process, faster
    row = stored()[-1]
    proc = cl_subprocess("show", row["id"], "--store", store_url)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "tiny / naive / seed 5 (completed)" in proc.stdout


# ---------------------------------------------------------------- plugins through entry points

PLUGIN_SRC = Path(__file__).parent / "plugin_example"


def pip_available() -> bool:
    return importlib.util.find_spec("pip") is not None


@pytest.fixture
def plugin_site(tmp_path) -> Path:
    """tests/plugin_example installed for real with pip into tmp_path/site (a copy is built, so the
    source folder gets no build/ or egg-info)."""
    src = tmp_path / "plugin_src"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "cl_example_plugin" / "__init__.py").is_file()
    return site


@pytest.mark.skipif(not pip_available(), reason="pip is not available to install tests/plugin_example")
def test_installed_plugin_is_listed_and_runs(plugin_site, cl_subprocess, write_experiment, tiny_raw,
                                            store_url):
    proc = cl_subprocess("list", "strategies", pythonpath=plugin_site)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("example_l2: "))
    assert "squared parameters" in lines[i]  # the first line of the class docstring
    assert lines[i + 1] == "    settings: class-il, task-il, domain-il; models: any"
    assert lines[i + 2] == "    weight (float, default 0.01): L2 penalty on the weights"
    assert any(line.startswith("naive: ") for line in lines)  # built-ins are still there

    raw = tiny_raw(name="plugin", strategies=[
        {"name": "naive"},
        {"name": "example_l2", "label": "l2_zero", "weight": 0.0},
        {"name": "example_l2", "weight": 0.05},  # 0.5 shrinks the weights so far that nothing is learned
    ])
    proc = cl_subprocess("run", write_experiment(raw), "--store", store_url, "--no-progress", "--device", "cpu",
                         pythonpath=plugin_site)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    store = ResultStore(store_url)
    runs = {r["strategy"]: r for r in store.list_runs("plugin")}
    assert set(runs) == {"naive", "l2_zero", "example_l2"}
    assert runs["example_l2"]["status"] == "completed"
    assert runs["example_l2"]["params"] == {"weight": 0.05}
    records = {name: store.get(r["id"]) for name, r in runs.items()}
    # the overridden loss is what trains: weight 0 is exactly fine-tuning, weight 0.05 is not
    assert records["l2_zero"].matrix == records["naive"].matrix
    assert records["example_l2"].matrix != records["naive"].matrix
    plugin = records["example_l2"]
    assert plugin.config["strategy"]["name"] == "example_l2"
    # a plugin's results trace to its package, and what it logs is stored per experience
    assert plugin.provenance["strategy_package"] == {"name": "cl-example-plugin", "version": "0.1.0"}
    assert records["naive"].provenance["strategy_package"]["name"] == "cl-bench"
    assert len(plugin.logs["l2"]) == 2 and all(v > 0 for v in plugin.logs["l2"])


def write_broken_plugin(site: Path) -> None:
    """What pip would install for a package whose entry-point module fails to import."""
    site.mkdir()
    (site / "cl_broken_plugin.py").write_text('raise ImportError("No module named \'some_missing_lib\'")\n')
    info = site / "cl_broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cl-broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cl.strategies]\nbroken = cl_broken_plugin\n")


def test_broken_plugin_gives_one_line_error(tmp_path, cl_subprocess, write_experiment, store_url,
                                            one_line_error):
    site = tmp_path / "site"
    write_broken_plugin(site)
    proc = cl_subprocess("list", "strategies", pythonpath=site)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert "'broken'" in line and "cl_broken_plugin" in line and "some_missing_lib" in line
    assert "uninstall" in line

    proc = cl_subprocess("run", write_experiment(), "--store", store_url, "--no-progress", pythonpath=site)
    assert proc.returncode == 2
    assert "cl_broken_plugin" in one_line_error(proc.stderr)


def test_run_takes_several_files_and_validates_them_all_first(cli, tiny_raw, write_experiment, store_url, stored,
                                                             class_il_only):
    first = write_experiment(tiny_raw(name="first", strategies=[{"name": "naive"}]), name="a.toml")
    second = write_experiment(tiny_raw(name="second", strategies=[{"name": "naive"}]), name="b.toml")
    broken = write_experiment(tiny_raw(name="third", strategies=[{"name": "nope"}]), name="c.toml")
    result = cli("run", first, broken, "--store", store_url, "--no-progress", "--device", "cpu")
    assert result.rc == 2 and "nope" in result.err and stored() == []  # nothing trained
    unfit = tiny_raw(name="third", strategies=[{"name": "naive"}, {"name": "class_il_only"}])
    unfit["scenario"]["task_labels"] = True
    result = cli("run", first, write_experiment(unfit, name="e.toml"), "--store", store_url, "--no-progress",
                 "--device", "cpu")
    assert result.rc == 2 and "e.toml: [[strategies]] 'class_il_only'" in result.err  # found before the
    assert not store_file(store_url).exists()  # first file trained: no store, nothing written
    frozen = tiny_raw(name="third", strategies=[{"name": "naive"}])
    frozen["training"]["freeze"] = ["encoder"]  # the MLP's parameters are features.* and head.*
    result = cli("run", first, write_experiment(frozen, name="f.toml"), "--store", store_url, "--no-progress",
                 "--device", "cpu")
    assert result.rc == 2 and "f.toml: training.freeze: 'encoder' matches no parameter" in result.err
    assert not store_file(store_url).exists()
    same = write_experiment(tiny_raw(name="first", strategies=[{"name": "naive"}]), name="d.toml")
    result = cli("run", first, same, "--store", store_url, "--no-progress", "--device", "cpu")
    assert result.rc == 2 and "experiment name 'first' appears in two of the files" in result.err
    result = cli("run", first, second, "--store", store_url, "--no-progress", "--device", "cpu")
    assert result.rc == 0, result.err
    assert sorted(r["experiment"] for r in stored()) == ["first", "second"]
    assert "\nfirst:" in result.out and "\nsecond:" in result.out


def test_strategy_picks_from_every_file_that_has_it(cli, tiny_raw, write_experiment, store_url, stored):
    """`cl run a.toml b.toml --strategy joint` runs joint where it is and leaves the other files out; a name in
    no file is refused before anything trains."""
    both = write_experiment(tiny_raw(name="both", strategies=[{"name": "naive"}, {"name": "joint"}]), name="a.toml")
    one = write_experiment(tiny_raw(name="one", strategies=[{"name": "naive"}]), name="b.toml")
    result = cli("run", both, one, "--strategy", "joint", "--store", store_url, "--no-progress", "--device", "cpu")
    assert result.rc == 0, result.err
    assert f"{one}: has none of --strategy joint; left out" in result.out
    assert [(r["experiment"], r["strategy"]) for r in stored()] == [("both", "joint")]
    result = cli("run", both, one, "--strategy", "icarl", "--store", store_url, "--no-progress", "--device", "cpu")
    assert result.rc == 2 and "--strategy 'icarl' is in none of the 2 files" in result.err
    assert len(stored()) == 1


def test_run_options_of_the_fast_engine(run_tiny, tiny_raw, one_line_error, stored):
    """--cuda-graphs without CUDA is refused in one line; --no-stack and --threads run as asked."""
    result = run_tiny(None, "--cuda-graphs")
    assert result.rc == 2 and "--cuda-graphs needs a CUDA device" in one_line_error(result.err)
    with pytest.raises(SystemExit) as exit_:
        run_tiny(None, "--threads", "0")
    assert exit_.value.code == 2
    raw = tiny_raw(seeds=[0, 1], strategies=[{"name": "naive"}])
    stacked = run_tiny(raw, "--threads", "1")
    assert stacked.rc == 0 and stacked.out.count("for 2 stacked") == 2
    alone = run_tiny(raw, "--no-stack", "--threads", "1")
    assert alone.rc == 0 and "stacked" not in alone.out
    assert [r["seed"] for r in stored()] == [0, 1]  # the same runs: the second invocation replaced them
