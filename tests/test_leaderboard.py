import csv
import dataclasses

import pytest
import torch

from cl.leaderboard import _slug, generate
from cl.runner import build_scenario, load_datasets, run_one
from cl.store import ResultStore
from tests.helpers import digits_experiment


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = ResultStore(f"sqlite:///{tmp_path_factory.mktemp('lb')}/runs.db")
    cfg = digits_experiment([{"name": "naive"}, {"name": "er", "buffer_size": 50}], n_experiences=3)
    data = load_datasets(cfg.datasets)
    for seed in (0, 1):
        scenario = build_scenario(cfg, data, seed)
        for component in cfg.strategies:
            store.write(run_one(cfg, component, scenario, seed, torch.device("cpu"), progress=False))
    return store


def test_leaderboard_tables_are_the_mean_and_std_of_stored_runs(store, tmp_path):
    paths = generate(store, tmp_path)
    png = slug_png("test-digits")
    assert {p.name for p in paths} == {"README.md", "results.csv", "index.html", png}
    runs = store.list_runs()
    er = [r["acc"] for r in runs if r["strategy"] == "er"]
    mean = sum(er) / 2
    std = abs(er[0] - er[1]) / 2**0.5  # sample std of two values
    md = (tmp_path / "README.md").read_text()
    er_line = next(line for line in md.splitlines() if line.startswith("| er |"))
    assert f"{mean:.3f} ± {std:.3f}" in er_line
    assert "| 2 |" in er_line  # two seeds
    header = next(line for line in md.splitlines() if line.startswith("| strategy"))
    assert "memory MiB" in header and "task-IL FWT" in header  # class-IL: FWT on task-IL accuracy
    fwt = [r.task_il_metrics.fwt for r in store.records() if r.strategy == "er"]
    assert f"{sum(fwt) / 2:.3f} ± {abs(fwt[0] - fwt[1]) / 2**0.5:.3f}" in er_line
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["strategy"] for r in rows} == {"naive", "er"}
    assert {r["params"] for r in rows if r["strategy"] == "er"} == {
        '{"buffer": "reservoir", "buffer_size": 50, "replay_batch_size": 10}'}
    assert all(r["code_version"].startswith("cl-bench ") for r in rows)
    html = (tmp_path / "index.html").read_text()
    assert "<table>" in html and png in html
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_empty_store_gives_a_page_that_says_so(tmp_path):
    generate(ResultStore(f"sqlite:///{tmp_path}/empty.db"), tmp_path / "out", plots=False)
    assert "No runs in the store yet" in (tmp_path / "out" / "README.md").read_text()


def test_runs_with_other_settings_are_never_averaged_together(tmp_path):
    store = ResultStore(f"sqlite:///{tmp_path}/runs.db")
    for lr, buffers in ((0.05, (20, 50)), (0.1, (50,))):
        for size in buffers:
            cfg = digits_experiment([{"name": "er", "buffer_size": size}], n_experiences=2, lr=lr)
            scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
            store.write(run_one(cfg, cfg.strategies[0], scenario, 0, torch.device("cpu"), progress=False))
    generate(store, tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "README.md").read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert len(sections) == 2  # lr 0.05 and lr 0.1 are two setups
    assert sum("newest" in s for s in sections) == 1
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| er")]
    # Same label, two hyperparameter sets under lr 0.05: two table rows, each of one seed.
    assert sorted(rows) == ["| er", "| er (buffer_size=20)", "| er (buffer_size=50)"]


def test_runs_of_other_code_versions_are_never_averaged_together(tmp_path):
    store = ResultStore(f"sqlite:///{tmp_path}/runs.db")
    cfg = digits_experiment([{"name": "naive"}], n_experiences=2)
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
    record = run_one(cfg, cfg.strategies[0], scenario, 0, torch.device("cpu"), progress=False)
    store.write(record)
    older = dataclasses.replace(record, run_key="older", setup_key="0" * 16, created_at="2000-01-01T00:00:00+00:00",
                                provenance={**record.provenance, "code_version": "cl-bench 0.0.1 (feedbeef)"})
    store.write(older)
    generate(store, tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "README.md").read_text()
    assert sum(line.startswith("## ") for line in md.splitlines()) == 2
    assert "code cl-bench 0.0.1 (feedbeef)" in md and f"code {record.provenance['code_version']}" in md
    assert md.count("| naive | 1 |") == 2  # one seed per section, not one row of two seeds


def slug_png(title: str) -> str:
    return f"{_slug(title)}.png"


def test_text_from_experiment_files_is_escaped_everywhere_and_plot_names_never_collide(tmp_path):
    store = ResultStore(f"sqlite:///{tmp_path}/runs.db")
    for name in ("a b", "a-b", "=HYPERLINK(1)|<script>x</script>"):
        cfg = digits_experiment([{"name": "naive"}], n_experiences=2)
        cfg.name, cfg.description = name, "uses | pipes and <b>tags</b>"
        scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
        store.write(run_one(cfg, cfg.strategies[0], scenario, 0, torch.device("cpu"), progress=False))
    paths = generate(store, tmp_path / "board")
    pngs = sorted(p.name for p in paths if p.suffix == ".png")
    assert len(pngs) == 3 and pngs[0] != pngs[1]  # "a b" and "a-b" used to share a-b.png
    md = (tmp_path / "board" / "README.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md and "uses \\| pipes and &lt;b&gt;" in md
    assert "<script>" not in (tmp_path / "board" / "index.html").read_text()
    with open(tmp_path / "board" / "results.csv") as f:
        experiments = {r["experiment"] for r in csv.DictReader(f)}
    assert "'=HYPERLINK(1)|<script>x</script>" in experiments  # not run as a formula by a spreadsheet


WRITER = """
import dataclasses, sys
from cl.store import ResultStore
store = ResultStore(sys.argv[1])
record = store.records()[0]
for seed in range(100, 100 + int(sys.argv[2])):
    store.write(dataclasses.replace(record, run_key=f"concurrent-{seed}", seed=seed, id=None))
"""


def test_the_leaderboard_regenerates_while_runs_are_being_written(store, tmp_path):
    """A second process writes runs (as `cl run` does) while the leaderboard is regenerated again and
    again: every regeneration succeeds and sees a consistent store, and the last one counts every run."""
    import shutil
    import subprocess
    import sys

    db = tmp_path / "busy.db"
    shutil.copy(store.url.removeprefix("sqlite:///"), db)
    url = f"sqlite:///{db}"
    n_before, n_new = len(store.list_runs()), 40
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url, str(n_new)])
    regenerations = 0
    while writer.poll() is None or regenerations == 0:
        generate(ResultStore(url), tmp_path / "board", plots=False)
        regenerations += 1
    assert writer.returncode == 0
    generate(ResultStore(url), tmp_path / "board", plots=False)
    with open(tmp_path / "board" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == n_before + n_new
    assert regenerations >= 2
