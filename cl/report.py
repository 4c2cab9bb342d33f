"""Tables over stored runs: mean and spread per strategy.

Rows are `RunRecord.headline()` dicts. In class-IL sections the FWT column is
the task-IL FWT (`RunRecord.headline_fwt`), and the header says so. A section
with hypernetwork runs gets a column of their compression ratio (hypernetwork
parameters, embeddings included, over target parameters).
"""
from __future__ import annotations

import json
from typing import Any

import pandas as pd

COLUMNS = [("acc", "ACC"), ("task_il_acc", "task-IL ACC"), ("bwt", "BWT"), ("forgetting", "Forgetting"),
           ("fwt", "FWT"), ("wall_seconds", "time s")]


def comparison_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per strategy: mean and sample std over seeds of the headline numbers."""
    df = pd.DataFrame(rows)
    grouped = df.groupby("strategy", sort=False)
    out = pd.DataFrame({"seeds": grouped["seed"].count()})
    for col, _ in COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        out[f"{col}_mean"] = values.groupby(df["strategy"], sort=False).mean()
        out[f"{col}_std"] = values.groupby(df["strategy"], sort=False).std(ddof=1)
    out["memory_mib"] = df.groupby("strategy", sort=False)["memory_bytes"].mean() / 2**20
    compute = df["forward_samples"] + df["backward_samples"]
    out["compute_samples"] = compute.groupby(df["strategy"], sort=False).mean()
    ratio = pd.to_numeric(df["compression_ratio"], errors="coerce")
    if ratio.notna().any():  # hnet: hypernetwork / target parameters
        out["compression_ratio"] = ratio.groupby(df["strategy"], sort=False).mean()
    return out.sort_values("acc_mean", ascending=False)


def label_variants(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose `strategy` names one table row. A label whose runs differ in the registered strategy,
    the version of the package it came from or a hyperparameter becomes one row per variant, named by
    what differs: "er (buffer_size=200)" and "er (buffer_size=500)", "base (strategy=naive)" and
    "base (strategy=joint)", "der (package=my-cl 0.2)"; runs of two variants are never averaged."""
    def variant(r: dict[str, Any]) -> dict[str, Any]:
        return {"strategy": r["strategy_name"], "package": r["strategy_package"], **r["params"]}

    by_label: dict[str, set[str]] = {}
    for r in rows:
        by_label.setdefault(r["strategy"], set()).add(json.dumps(variant(r), sort_keys=True))
    out = []
    for r in rows:
        variants = [json.loads(v) for v in sorted(by_label[r["strategy"]])]
        if len(variants) > 1:
            own = variant(r)
            keys = set().union(*variants)
            # a parameter absent from older records differs from one stored as None
            differing = sorted(k for k in keys if len({(k in v, json.dumps(v.get(k))) for v in variants}) > 1)
            settings = ", ".join(f"{k}={own[k]}" if k in own else f"without {k}" for k in differing)
            r = {**r, "strategy": f"{r['strategy']} ({settings})"}
        out.append(r)
    return out


def comparison_table(rows: list[dict[str, Any]], setting: str) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the comparison, best ACC first (for text, markdown, HTML)."""
    names = {"fwt": "task-IL FWT" if setting == "class-il" else "FWT"}
    headers = ["strategy", "seeds"] + [names.get(c, h) for c, h in COLUMNS] + ["memory MiB", "fwd+bwd samples"]
    frame = comparison_frame(rows)
    compression = "compression_ratio" in frame
    if compression:
        headers.append("hnet/target params")
    cells = []
    for name, r in frame.iterrows():
        row = [str(name), str(int(r["seeds"]))]
        row += [mean_std(r[f"{c}_mean"], r[f"{c}_std"], 1 if c == "wall_seconds" else 3) for c, _ in COLUMNS]
        row += [f"{r['memory_mib']:.2f}", count(r["compute_samples"])]
        if compression:
            row.append("-" if pd.isna(r["compression_ratio"]) else f"{r['compression_ratio']:.3f}")
        cells.append(row)
    return headers, cells


def count(n: float) -> str:
    """1234567 -> '1.2M'. A count that would read 1000 of one unit takes the next: 999960 -> '1.0M',
    not '1000.0k'."""
    units = (("G", 1e9, 1), ("M", 1e6, 1), ("k", 1e3, 1), ("", 1.0, 0))
    for (unit, size, _), (_, below, digits) in zip(units, units[1:]):
        if n >= size or round(n / below, digits) >= 1000:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def format_comparison(rows: list[dict[str, Any]], setting: str) -> str:
    """The comparison as an aligned plain-text table (printed by `cl run`)."""
    headers, lines = comparison_table(rows, setting)
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    note = "mean ± standard deviation over seeds (the leaderboard gives 95% confidence half-widths)"
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines] + [note])


def mean_std(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return "-"
    if pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
