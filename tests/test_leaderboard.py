import csv
import dataclasses

import pytest
import torch

from cl.leaderboard import generate
from cl.report import count, label_variants
from cl.runner import build_scenario, load_datasets, run_one
from cl.store import ResultStore
from tests.helpers import digits_experiment


import math
import statistics

from cl.leaderboard.plots import pareto_front
from cl.leaderboard.published import published_for
from cl.leaderboard.summary import Estimate, StrategyRow, mark_best_and_ties

T_975 = {1: 12.706, 2: 4.303}  # Student t quantiles, 0.975, for 1 and 2 degrees of freedom (printed tables)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = ResultStore(f"sqlite:///{tmp_path_factory.mktemp('lb')}/runs.db")
    cfg = digits_experiment([{"name": "naive"}, {"name": "er", "buffer_size": 50}], n_experiences=3)
    data = load_datasets(cfg.datasets)
    for seed in (0, 1, 2):
        scenario = build_scenario(cfg, data, seed)
        for component in cfg.strategies:
            store.write(run_one(cfg, component, scenario, seed, torch.device("cpu"), progress=False))
    return store


def direct_metrics(R):
    """ACC, BWT, forgetting and FWT of one accuracy matrix, written out from the definitions."""
    T = len(R[0])
    acc = sum(R[T]) / T
    bwt = sum(R[T][j] - R[j + 1][j] for j in range(T - 1)) / (T - 1)
    forgetting = sum(max(R[l][j] for l in range(1, T)) - R[T][j] for j in range(T - 1)) / (T - 1)
    fwt = sum(R[j][j] - R[0][j] for j in range(1, T)) / (T - 1)
    return {"acc": acc, "bwt": bwt, "forgetting": forgetting, "fwt": fwt}


def interval_text(values):
    n = len(values)
    half = T_975[n - 1] * statistics.stdev(values) / math.sqrt(n)
    return f"{statistics.fmean(values):.3f} ± {half:.3f}"


def table_rows(md):
    """{strategy: {header: cell}} of the first table in a leaderboard README (emphasis removed)."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    headers = [h.strip() for h in lines[0].strip("|").split(" | ")]
    rows = {}
    for line in lines[1:]:
        if line.startswith("| strategy"):
            break
        cells = [c.strip().replace("**", "").removesuffix(" ≈") for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = dict(zip(headers, cells))
    return rows


def test_every_table_number_is_recomputed_from_the_stored_matrices(store, tmp_path):
    paths = generate(store, tmp_path)
    md = (tmp_path / "README.md").read_text()
    rows = table_rows(md)
    assert set(rows) == {"naive", "er"}
    for strategy, row in rows.items():
        runs = [r for r in store.records() if r.strategy == strategy]
        class_il = [direct_metrics(r.matrix) for r in runs]
        task_il = [direct_metrics(r.task_il_matrix) for r in runs]
        assert row["seeds"] == "3"
        assert row["ACC"] == interval_text([m["acc"] for m in class_il])
        assert row["BWT"] == interval_text([m["bwt"] for m in class_il])
        assert row["Forgetting"] == interval_text([m["forgetting"] for m in class_il])
        assert row["task-IL ACC"] == interval_text([m["acc"] for m in task_il])
        assert row["task-IL FWT"] == interval_text([m["fwt"] for m in task_il])  # class-IL: FWT on task-IL
        assert row["memory MiB"] == f"{statistics.fmean(r.budgets.memory_bytes for r in runs) / 2**20:.2f}"
        walls = [r.budgets.wall_seconds for r in runs]
        half = T_975[2] * statistics.stdev(walls) / math.sqrt(3)
        assert row["wall s"] == f"{statistics.fmean(walls):.1f} ± {half:.1f}"
    assert rows["er"]["hyperparameters"] == "buffer=reservoir, buffer_size=50, replay_batch_size=10"
    best = max(rows, key=lambda s: float(rows[s]["ACC"].split(" ± ")[0]))
    assert f"| **{rows[best]['ACC']}" in md  # the best ACC is bold
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 6 and {r["strategy"] for r in csv_rows} == {"naive", "er"}
    for r in csv_rows:  # the CSV alone recomputes the table
        assert r["code_version"].startswith("cl-bench ") and r["status"] == "completed"
    er_acc = [float(r["acc"]) for r in csv_rows if r["strategy"] == "er"]
    assert interval_text(er_acc) == rows["er"]["ACC"]
    assert {r["param.buffer_size"] for r in csv_rows if r["strategy"] == "er"} == {"50"}
    kinds = sorted(p.name.rsplit("-", 1)[1] for p in paths if p.suffix == ".png")
    assert kinds == ["curves.png", "heatmaps.png", "pareto.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths if p.suffix == ".png")
    html_page = (tmp_path / "index.html").read_text()
    assert "class='sortable'" in html_page and "Definitions" in html_page and "Setup: " in html_page
    assert all(p.name in html_page for p in paths if p.suffix == ".png")


def test_a_student_t_interval_by_hand():
    e = Estimate([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert Estimate([0.5]).half_width is None and Estimate([0.5]).interval == (0.5, 0.5)


def _row(label, values):
    return StrategyRow(label, label, {}, [], {"acc": Estimate(values), "memory_mib": Estimate([len(label)] * 2)})


def test_best_values_and_ties_follow_the_intervals():
    rows = [_row("a", [0.80, 0.82]), _row("bb", [0.70, 0.90]), _row("ccc", [0.50, 0.52])]
    mark_best_and_ties(rows, [("acc", "ACC", 1), ("memory_mib", "memory MiB", -1)])
    # a: mean 0.81, interval 0.81 +- 12.706 * 0.0141 / 1.414 = [0.683, 0.937]; bb: mean 0.80, wide; ccc: [0.383, 0.637]
    assert "acc" in rows[0].best and "acc" not in rows[1].best
    assert rows[1].tied and rows[2].tied is False
    assert "memory_mib" in rows[0].best  # the least memory is best


def test_pareto_front_keeps_the_undominated_points():
    points = [(0.0, 0.2), (1.0, 0.5), (2.0, 0.4), (3.0, 0.9), (3.0, 0.6)]
    assert pareto_front(points) == [0, 1, 3]


def test_published_numbers_match_protocol_strategy_and_hyperparameters():
    assert published_for("split_mnist5k_class_il", "er", {"buffer_size": 500}).acc == 0.8612
    assert published_for("split_mnist5k_class_il", "er", {"buffer_size": 200}) is None
    assert published_for("rotated_mnist5k", "gem", {}).acc == 0.86
    assert published_for("quickstart", "gem", {}) is None


def test_a_protocol_with_a_published_number_gets_the_column_and_its_footnote(store, tmp_path):
    record = next(r for r in store.records() if r.strategy == "naive")
    renamed = ResultStore(f"sqlite:///{tmp_path}/p.db")
    renamed.write(dataclasses.replace(record, experiment="rotated_mnist5k", run_key="p", id=None))
    generate(renamed, tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "README.md").read_text()
    row = table_rows(md)["naive"]
    assert row["published ACC"] == "0.530 [1]"
    assert "[1] Lopez-Paz &amp; Ranzato, GEM, NeurIPS 2017, Table 3" in md  # escaped like all text
    assert "What differs:" in md


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
    sections = [line for line in md.splitlines() if line.startswith("## ") and line != "## Definitions"]
    assert len(sections) == 2  # lr 0.05 and lr 0.1 are two setups
    assert sum("newest" in s for s in sections) == 1
    # the older section says what its setup differs in, and nothing else differs
    (differs,) = [line for line in md.splitlines() if line.startswith("Differs from the newest setup")]
    assert differs.split(": ", 1)[1] in ("training.lr: 0.1 -&gt; 0.05", "training.lr: 0.05 -&gt; 0.1")
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
    assert sum(line.startswith("## test-digits") for line in md.splitlines()) == 2
    assert "code cl-bench 0.0.1 (feedbeef)" in md and f"code {record.provenance['code_version']}" in md
    assert md.count("| naive | - | 1 |") == 2  # one seed per section, not one row of two seeds
    assert (f"Differs from the newest setup (newest -> this): code_version: {record.provenance['code_version']!r} "
            f"-&gt; 'cl-bench 0.0.1 (feedbeef)'") in md


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2)])
def test_a_row_tied_with_any_of_several_best_means_is_tied_whatever_the_order(order):
    # a and b share the best mean 0.8; a's interval is [0.8, 0.8], b's 0.8 +- 4.303 * 0.1 / 1.732 = [0.552, 1.048];
    # c's [0.69, 0.79] overlaps b's only
    made = [_row("a", [0.8, 0.8, 0.8]), _row("b", [0.7, 0.8, 0.9]), _row("c", [0.72, 0.74, 0.76])]
    rows = [made[i] for i in order]
    mark_best_and_ties(rows, [("acc", "ACC", 1)])
    assert ["acc" in r.best for r in made] == [True, True, False] and made[2].tied


def test_rows_of_one_seed_have_no_interval_to_be_tied_by():
    single = [_row("a", [0.81]), _row("b", [0.8099]), _row("c", [0.70, 0.80, 0.90])]  # c: [0.552, 1.048]
    mark_best_and_ties(single, [("acc", "ACC", 1)])
    assert "acc" in single[0].best and not single[1].tied and not single[2].tied
    wide_best = [_row("a", [0.70, 0.80, 0.95]), _row("b", [0.80])]
    mark_best_and_ties(wide_best, [("acc", "ACC", 1)])
    assert not wide_best[1].tied


def test_a_parameter_missing_from_older_records_is_a_variant_of_its_own():
    """Older records lack a parameter added later with the default None: still two variants, not averaged."""
    base = {"strategy": "er", "strategy_name": "er", "strategy_package": None}
    rows = label_variants([{**base, "params": {"buffer_size": 200}},
                           {**base, "params": {"buffer_size": 200, "new_option": None}}])
    assert [r["strategy"] for r in rows] == ["er (without new_option)", "er (new_option=None)"]
    same = label_variants([{**base, "params": {"buffer_size": 200}}] * 2)
    assert [r["strategy"] for r in same] == ["er", "er"]


@pytest.mark.parametrize("n, shown", [(999.4, "999"), (999.6, "1.0k"), (999_960, "1.0M"), (1_234_567, "1.2M"),
                                      (999_940_000, "999.9M"), (999_960_000, "1.0G"), (0, "0")])
def test_sample_counts_choose_their_unit_after_rounding(n, shown):
    assert count(n) == shown


def test_one_label_with_two_strategies_or_package_versions_is_two_rows(tmp_path):
    """A label that named naive and later joint (or whose plugin package was upgraded) under one setup:
    the runs of each are a row of their own, never averaged as more seeds of one strategy."""
    store = ResultStore(f"sqlite:///{tmp_path}/runs.db")
    for name in ("naive", "joint"):
        cfg = digits_experiment([{"name": name, "label": "base"}], n_experiences=2)
        scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
        store.write(run_one(cfg, cfg.strategies[0], scenario, 0, torch.device("cpu"), progress=False))
    generate(store, tmp_path / "out", plots=False)
    rows = table_rows((tmp_path / "out" / "README.md").read_text())
    assert sorted(rows) == ["base (strategy=joint)", "base (strategy=naive)"]
    assert {row["seeds"] for row in rows.values()} == {"1"}
    (record,) = [r for r in store.records() if r.strategy_name == "naive"]
    upgraded = dataclasses.replace(record, run_key="upgraded", provenance={
        **record.provenance, "strategy_package": {"name": "my-cl", "version": "0.2"}})
    store.write(upgraded)
    generate(store, tmp_path / "out", plots=False)
    rows = table_rows((tmp_path / "out" / "README.md").read_text())
    assert "base (package=my-cl 0.2, strategy=naive)" in rows and {row["seeds"] for row in rows.values()} == {"1"}


def test_text_from_experiment_files_is_escaped_everywhere_and_plot_names_never_collide(tmp_path):
    store = ResultStore(f"sqlite:///{tmp_path}/runs.db")
    for name in ("a b", "a-b", "=HYPERLINK(1)|<script>x</script>"):
        cfg = digits_experiment([{"name": "naive"}], n_experiences=2)
        cfg.name, cfg.description = name, "uses | pipes and <b>tags</b>"
        scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0)
        store.write(run_one(cfg, cfg.strategies[0], scenario, 0, torch.device("cpu"), progress=False))
    paths = generate(store, tmp_path / "board")
    pngs = sorted(p.name for p in paths if p.name.endswith("-curves.png"))
    assert len(pngs) == 3 and pngs[0] != pngs[1]  # "a b" and "a-b" used to share a-b.png
    md = (tmp_path / "board" / "README.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md and "uses \\| pipes and &lt;b&gt;" in md
    page = (tmp_path / "board" / "index.html").read_text()
    assert page.count("<script>") == 1 and "&lt;script&gt;x" in page  # only the page's own sorting script
    with open(tmp_path / "board" / "results.csv") as f:
        experiments = {r["experiment"] for r in csv.DictReader(f)}
    assert "'=HYPERLINK(1)|<script>x</script>" in experiments  # not run as a formula by a spreadsheet
    # Figures of sections that are gone go too; other pictures in the folder stay.
    (tmp_path / "board" / "photo.png").write_bytes(b"")
    store.write(dataclasses.replace(store.records()[0], run_key="other", setup_key="0" * 16,
                                    created_at="2999-01-01T00:00:00+00:00"))  # one experiment gets a newer setup
    again = {p.name for p in generate(store, tmp_path / "board") if p.suffix == ".png"}
    assert sorted(p.name for p in (tmp_path / "board").glob("*.png")) == sorted(again | {"photo.png"})
    assert len(again) == 12 and not set(pngs) <= again  # it became two sections with new names
    generate(store, tmp_path / "board", plots=False)
    assert [p.name for p in (tmp_path / "board").glob("*.png")] == ["photo.png"]


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
