"""The leaderboard's text outputs: README.md, results.csv and index.html (one static page, no network).

Every text that comes from runs or experiment files is escaped for its format: HTML-escaped in the page
and the Markdown (where table pipes are escaped too), and a CSV cell that starts with `=`, `+`, `-` or
`@` gets a leading apostrophe so that no spreadsheet runs it as a formula.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from cl.leaderboard.summary import CONFIDENCE, Protocol, StrategyRow, run_values
from cl.report import count

DEFINITIONS = [
    ("R", "the accuracy matrix: R[i, j] is the test accuracy on experience j after training experiences 1..i "
          "(row 0: before training)"),
    ("ACC", "final average accuracy, mean over j of R[T, j]; class-IL takes the argmax over the classes seen, "
            "task-IL over the experience's classes, domain-IL over all classes"),
    ("task-IL ACC", "ACC of the task-IL matrix of a class-IL run: the argmax restricted to each test experience's "
                    "classes, which separates forgetting from confusing old with new classes"),
    ("BWT", "backward transfer, 1/(T-1) sum over j < T of R[T, j] - R[j, j] (GEM paper)"),
    ("Forgetting", "1/(T-1) sum over j < T of max over 1 <= l < T of R[l, j] - R[T, j] (Chaudhry et al. 2018)"),
    ("FWT", "forward transfer, 1/(T-1) sum over j >= 2 of R[j-1, j] - R[0, j] (GEM paper); class-IL tables give "
            "it on the task-IL matrix, since class-IL accuracy on an unseen experience is 0 for every strategy"),
    ("memory MiB", "what the strategy keeps beyond its trainable modules (buffers, old models, importances)"),
    ("compute", "samples through forward passes plus samples through backward passes in training"),
    ("wall s", "seconds of one run on the machine named in the setup line: a budget, not a headline metric"),
    ("±", f"half-width of the {CONFIDENCE:.0%} Student-t interval over seeds (t with n-1 degrees of freedom "
          f"times the sample std over sqrt(n)); no interval with one seed"),
    ("bold", "the best mean in its column"),
    ("≈", "tied: the ACC interval overlaps the interval of the best ACC (rows of one seed have none)"),
]


def md(text: Any) -> str:
    """Text from runs or experiment files, safe in Markdown: no HTML, no table breaks, one line."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def csv_cell(value: Any) -> Any:
    """Strings a spreadsheet would run as a formula (=, +, -, @ first) get a leading apostrophe."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@") else value


def hyperparameters(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"


def _number(key: str, value: float) -> str:
    if key == "memory_mib":
        return f"{value:.2f}"
    if key == "compute":
        return count(value)
    return f"{value:.1f}" if key == "wall_seconds" else f"{value:.3f}"


def cell_text(row: StrategyRow, key: str) -> str:
    """A table cell without emphasis: mean ± interval half-width (metrics and wall time), mean (memory,
    compute), "-" where the column has no value for this row."""
    e = row.estimates.get(key)
    if e is None:
        return "-"
    if key in ("memory_mib", "compute") or e.half_width is None:
        return _number(key, e.mean)
    return f"{_number(key, e.mean)} ± {_number(key, e.half_width)}"


def table(protocol: Protocol) -> tuple[list[str], list[list[tuple[str, Any, bool]]], list[str]]:
    """Headers, rows of (text, sort value, emphasised) cells, and the footnotes of the published column."""
    columns = protocol.columns
    headers = ["strategy", "hyperparameters", "seeds"] + [h for _, h, _ in columns]
    compression = any(r.compression is not None for r in protocol.rows)
    if compression:
        headers.append("hnet/target params")
    published = [r.published for r in protocol.rows if r.published is not None]
    notes = list(dict.fromkeys((p.source, p.differs) for p in published))
    if notes:
        headers.append("published ACC")
    body = []
    for row in protocol.rows:
        cells = [(row.label, row.label, False), (hyperparameters(row.params), hyperparameters(row.params), False),
                 (str(len(row.records)), len(row.records), False)]
        for key, _, _ in columns:
            text = cell_text(row, key)
            if key == "acc" and row.tied:
                text += " ≈"
            e = row.estimates.get(key)
            cells.append((text, "" if e is None else e.mean, key in row.best))
        if compression:
            cells.append(("-" if row.compression is None else f"{row.compression:.3f}", row.compression or "", False))
        if notes:
            p = row.published
            cells.append(("-" if p is None else f"{p.acc:.3f} [{notes.index((p.source, p.differs)) + 1}]",
                          "" if p is None else p.acc, False))
        body.append(cells)
    footnotes = [f"[{i}] {source}. What differs: {differs}." for i, (source, differs) in enumerate(notes, 1)]
    return headers, body, footnotes


def markdown(protocols: list[Protocol], plots: dict[str, dict[str, Path]]) -> str:
    lines = ["# Leaderboard", "",
             f"Generated by `cl leaderboard` from the result store. Every number is the mean over seeds with the "
             f"half-width of its {CONFIDENCE:.0%} Student-t interval; **bold** is the best mean of its column, ≈ "
             f"marks strategies whose ACC interval overlaps the best's. Definitions are at the end.", ""]
    if not protocols:
        lines.append("No runs in the store yet: run `cl run experiments/quickstart.toml`.")
    for p in protocols:
        headers, body, footnotes = table(p)
        lines += [f"## {md(p.title)}", "", md(p.description), "", f"Setup: {md(p.setup_line)}", ""]
        if p.differences:
            lines += [f"Differs from the newest setup (newest -> this): {md('; '.join(p.differences))}", ""]
        if body:
            lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(f"**{md(t)}**" if bold else md(t) for t, _, bold in cells) + " |"
                      for cells in body]
            lines += [""] + [md(f) for f in footnotes] + ([""] if footnotes else [])
        if p.stopped:
            lines += ["Runs that did not complete (not in the table above):", ""]
            lines += [f"- {md(label)} seed {r.seed}: {md(r.stopped())}" for label, r in p.stopped] + [""]
        for kind, path in plots.get(p.slug, {}).items():
            lines += [f"![{md(p.title)}: {kind}]({path.name})", ""]
    lines += ["## Definitions", ""] + [f"- **{md(term)}**: {md(text)}" for term, text in DEFINITIONS]
    return "\n".join(lines) + "\n"


SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, i) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var ascending = th.getAttribute('data-order') !== 'asc';
    rows.sort(function (a, b) {
      var x = a.cells[i].getAttribute('data-v'), y = b.cells[i].getAttribute('data-v');
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
      return ascending ? c : -c;
    });
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
    th.setAttribute('data-order', ascending ? 'asc' : 'desc');
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

STYLE = ("body{font-family:sans-serif;max-width:1250px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
         "td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}th{cursor:pointer;background:#f4f4f4}"
         "td.best{font-weight:bold}p.setup,p.note{font-size:13px;color:#333}img{max-width:100%;display:block;margin:1em 0}")


def page(protocols: list[Protocol], plots: dict[str, dict[str, Path]]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Leaderboard</title>"
             f"<style>{STYLE}</style></head><body><h1>Leaderboard</h1>",
             f"<p>Mean over seeds ± the half-width of the {CONFIDENCE:.0%} Student-t interval; bold: the best mean "
             f"of its column; ≈: ACC interval overlapping the best's. Click a column header to sort.</p>"]
    if not protocols:
        parts.append("<p>No runs in the store yet: run <code>cl run experiments/quickstart.toml</code>.</p>")
    for p in protocols:
        headers, body, footnotes = table(p)
        parts.append(f"<section class='protocol' id='{e(p.slug)}'><h2>{e(p.title)}</h2><p>{e(p.description)}</p>"
                     f"<p class='setup'>Setup: {e(p.setup_line)}</p>")
        if p.differences:
            parts.append(f"<p class='setup'>Differs from the newest setup (newest -&gt; this): "
                         f"{e('; '.join(p.differences))}</p>")
        if body:
            parts.append("<table class='sortable'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers)
                         + "</tr></thead><tbody>")
            for cells in body:
                parts.append("<tr>" + "".join(
                    f"<td data-v='{e(str(v))}'{' class=best' if bold else ''}>{e(t)}</td>" for t, v, bold in cells)
                    + "</tr>")
            parts.append("</tbody></table>" + "".join(f"<p class='note'>{e(f)}</p>" for f in footnotes))
        if p.stopped:
            parts.append("<p>Runs that did not complete (not in the table above):</p><ul>"
                         + "".join(f"<li>{e(label)} seed {r.seed}: {e(r.stopped())}</li>" for label, r in p.stopped)
                         + "</ul>")
        for kind, path in plots.get(p.slug, {}).items():
            parts.append(f"<img class='plot' src='{e(path.name)}' alt='{e(p.title)}: {e(kind)}' "
                         f"onload=\"this.setAttribute('data-loaded','1')\" "
                         f"onerror=\"this.setAttribute('data-broken','1')\">")  # a browser test reads these
        parts.append("</section>")
    parts.append("<h2>Definitions</h2><dl>" + "".join(f"<dt><b>{e(t)}</b></dt><dd>{e(d)}</dd>" for t, d in DEFINITIONS)
                 + f"</dl><script>{SORT_SCRIPT}</script></body></html>\n")
    return "".join(parts)


ROUNDING = {"memory_mib": 4, "wall_seconds": 2}


def csv_rows(protocols: list[Protocol]) -> list[dict[str, Any]]:
    """One row per run (every status), with its protocol, code version, hyperparameters (one column each,
    `param.NAME`) and numbers: enough to recompute every table."""
    rows = []
    for p in protocols:
        for label, r in p.runs:
            values = run_values(r)
            row = {"protocol": p.title, "experiment": r.experiment, "setup_key": r.setup_key,
                   "code_version": r.provenance.get("code_version"), "device": r.provenance.get("device"),
                   "setting": r.setting, "strategy": label, "strategy_name": r.strategy_name, "seed": r.seed,
                   "status": r.status, "run_id": r.id,
                   "params": json.dumps(r.params, sort_keys=True)}
            row.update({f"param.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
                        for k, v in sorted(r.params.items())})
            for key, value in values.items():
                row[key] = None if value is None else round(value, ROUNDING.get(key, 4))
            row["avg_inc_acc"] = None if r.metrics.avg_inc_acc is None else round(r.metrics.avg_inc_acc, 4)
            row["stopped"] = r.stopped()
            rows.append({k: csv_cell(v) for k, v in row.items()})
    return rows


def write_csv(protocols: list[Protocol], path: Path) -> None:
    pd.DataFrame(csv_rows(protocols), dtype=object).to_csv(path, index=False)  # object: ints stay ints
