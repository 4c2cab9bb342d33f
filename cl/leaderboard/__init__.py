"""Regenerate the leaderboard from the result store.

One section per protocol (an experiment with one setup: scenario, datasets, model, training budget,
transforms, device type and code version, so runs of different code or settings are never averaged
together): a table of strategies with their hyperparameters, the mean and Student-t 95% interval over seeds
of ACC, task-IL ACC, BWT, forgetting and FWT, the budgets (memory, compute, wall time), the best value of
each column and the strategies tied with the best ACC marked, and a published number where the reference
has one for the same method on a comparable protocol (cl/leaderboard/published.py); then the figures
(cl/leaderboard/plots.py). Runs that failed or diverged are listed under their section's table, never
averaged. Runs evaluated on a validation split (a sweep's trials, cl/sweep.py) are never shown: the
leaderboard reports test metrics only. Outputs, all derived from the store alone: README.md, results.csv (one row per run), index.html
(one static page, tables sortable) and three PNG figures per protocol.
"""
from __future__ import annotations

import re
from pathlib import Path

from cl.errors import UserError
from cl.leaderboard.page import markdown, page, write_csv
from cl.leaderboard.plots import PLOTS, write_plots
from cl.leaderboard.summary import protocols
from cl.store import ResultStore


def generate(store: ResultStore, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write the leaderboard files for every protocol in the store; returns the paths written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".cl-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"leaderboard --out {out}: cannot write there ({exc.strerror or exc}); "
                        f"pass a folder you can write to") from None
    sections = protocols([r for r in store.records() if r.evaluated_on == "test"])
    figures = {p.slug: write_plots(p, out) for p in sections if plots and p.rows}
    (out / "README.md").write_text(markdown(sections, figures))
    write_csv(sections, out / "results.csv")
    (out / "index.html").write_text(page(sections, figures))
    remove_stale_figures(out, {path for kinds in figures.values() for path in kinds.values()})
    return [path for kinds in figures.values() for path in kinds.values()] + \
        [out / "README.md", out / "results.csv", out / "index.html"]


def remove_stale_figures(out: Path, written: set[Path]) -> None:
    """Delete figures of earlier generations that this one did not write: a section whose title changed
    (an experiment's second setup appended "(setup ..., newest)") or that is gone, or every figure after
    --no-plots. Only files named as write_plots names them (<slug>-<8 hex>-<kind>.png) are touched."""
    named = re.compile(rf".+-[0-9a-f]{{8}}-({'|'.join(PLOTS)})\.png")
    for path in out.glob("*.png"):
        if named.fullmatch(path.name) and path not in written:
            path.unlink(missing_ok=True)


__all__ = ["generate"]
