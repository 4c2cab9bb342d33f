"""The leaderboard's figures, one set per protocol (matplotlib, written as PNG).

- curves: mean accuracy on the experiences seen so far after each experience, the band the 95% interval
  over seeds, one marker per strategy and a small horizontal offset each so that coinciding series stay
  visible; task-IL curves in a second panel where they exist; the y range fitted to the data.
- pareto: final ACC against memory (MiB the strategy keeps) and against compute (samples through forward
  and backward passes), interval bars, the non-dominated strategies joined (MEMO's point: compare methods
  at aligned budgets, not at equal names).
- heatmaps: each strategy's accuracy matrix (mean over seeds), row i after training experience i.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from cl.leaderboard.summary import Estimate, Protocol, StrategyRow

MARKERS = "os^Dv<>pP*XhH"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def matrix_of(raw: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in raw], dtype=float)


def seen_accuracy_curve(raw: list[list[float | None]]) -> np.ndarray:
    """Mean accuracy over experiences 1..i after training experience i (NaN where not measured)."""
    R = matrix_of(raw)
    return np.array([np.mean(R[i, :i]) for i in range(1, R.shape[0])])


def _band(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95%-interval half-width per point over seeds (no band with one seed)."""
    stacked = np.array(curves)
    mean = np.full(stacked.shape[1], np.nan)
    half = np.zeros(stacked.shape[1])
    for j in range(stacked.shape[1]):
        values = stacked[:, j][~np.isnan(stacked[:, j])]
        if len(values):
            e = Estimate(list(map(float, values)))
            mean[j], half[j] = e.mean, e.half_width or 0.0
    return mean, half


def _fitted(ax, lows: list[float], highs: list[float]) -> None:
    """A y range around the data, within [0, 1] where accuracies live."""
    lo, hi = max(0.0, min(lows, default=0.0)), min(1.0, max(highs, default=1.0))
    pad = max(0.02, 0.05 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))


def curves(protocol: Protocol, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    views = [("matrix", f"{protocol.setting} accuracy")]
    if any(r.records[0].task_il_matrix for r in protocol.rows):
        views.append(("task_il_matrix", "task-IL accuracy"))
    fig, axes = plt.subplots(1, len(views), figsize=(6.4 * len(views), 4.2), squeeze=False)
    for ax, (attribute, ylabel) in zip(axes[0], views):
        lows, highs = [], []
        for k, row in enumerate(protocol.rows):
            raws = [getattr(r, attribute) for r in row.records]
            if any(raw is None for raw in raws):
                continue
            with warnings.catch_warnings():  # joint runs leave rows unmeasured
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, half = _band([seen_accuracy_curve(raw) for raw in raws])
            ok = ~np.isnan(mean)
            x = np.arange(1, len(mean) + 1) + 0.06 * (k - (len(protocol.rows) - 1) / 2) / max(1, len(protocol.rows) / 4)
            ax.plot(x[ok], mean[ok], marker=MARKERS[k % len(MARKERS)], markersize=4, linewidth=1.2,
                    label=f"{row.label} ({len(row.records)} seeds)")
            ax.fill_between(x[ok], np.clip(mean - half, 0, 1)[ok], np.clip(mean + half, 0, 1)[ok], alpha=0.15)
            lows.append(float(np.nanmin(mean - half)))
            highs.append(float(np.nanmax(mean + half)))
        _fitted(ax, lows, highs)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("after training experience")
        ax.set_ylabel(f"mean {ylabel} on experiences seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_title(protocol.title, fontsize=10)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and ACC (higher), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto(protocol: Protocol, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in protocol.rows if "acc" in r.estimates]
    for ax, (key, xlabel) in zip(axes, [("memory_mib", "memory kept by the strategy (MiB)"),
                                        ("compute", "compute: samples through forward + backward passes")]):
        points = [(r.estimates[key].mean, r.estimates["acc"].mean) for r in rows]
        lows, highs = [], []
        for k, (row, (x, y)) in enumerate(zip(rows, points)):
            low, high = (max(0.0, v) if i == 0 else min(1.0, v) for i, v in enumerate(row.estimates["acc"].interval))
            ax.errorbar(x, y, yerr=[[y - low], [high - y]], fmt=MARKERS[k % len(MARKERS)], capsize=3, label=row.label)
            ax.annotate(row.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            lows.append(low)
            highs.append(high)
        _fitted(ax, lows, highs)
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="grey", linewidth=0.8,
                linestyle="--", zorder=0)
        positive = [x for x, _ in points if x > 0]
        if key == "compute":
            ax.set_xscale("log")
        elif positive and max(positive) > 20 * min(positive):  # e.g. joint's whole dataset beside small buffers
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final ACC")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{protocol.title}: ACC against budgets", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heatmaps(protocol: Protocol, path: Path) -> None:
    plt = _pyplot()
    rows: list[StrategyRow] = protocol.rows
    columns = min(4, len(rows))
    lines = math.ceil(len(rows) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.9 * lines), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean([matrix_of(r.matrix)[1:] for r in row.records], axis=0)
        image = ax.imshow(mean, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        T = mean.shape[1]
        if T <= 10:
            for i in range(mean.shape[0]):
                for j in range(T):
                    if not np.isnan(mean[i, j]):
                        ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if mean[i, j] < 0.6 else "black")
        ax.set_title(row.label, fontsize=8)
        ax.set_xlabel("test experience", fontsize=7)
        ax.set_ylabel("after training", fontsize=7)
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)], fontsize=6)
        ax.set_yticks(range(mean.shape[0]), [str(i + 1) for i in range(mean.shape[0])], fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy")
    fig.suptitle(f"{protocol.title}: accuracy matrices (mean over seeds)", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


PLOTS = {"curves": curves, "pareto": pareto, "heatmaps": heatmaps}


def write_plots(protocol: Protocol, out: Path) -> dict[str, Path]:
    """Every figure of one protocol; returns {kind: path}."""
    written = {}
    for kind, draw in PLOTS.items():
        path = out / f"{protocol.slug}-{kind}.png"
        draw(protocol, path)
        written[kind] = path
    return written
