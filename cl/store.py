"""The result store: one row per (experiment, strategy, hyperparameters, seed).

Any SQLAlchemy URL works; the default is an SQLite file `results/cl.db`
(PostgreSQL URLs let many machines share one store). Headline numbers are
columns so they can be queried and sorted; the full record (matrices,
metrics, budgets, scenario description, config, versions, device, commit)
is one JSON column. Each run is written in a single transaction, replacing
an earlier run with the same key, so a run is stored completely or not at all.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from cl.errors import UserError

DEFAULT_STORE = "sqlite:///results/cl.db"
HEADLINE = ("acc", "task_il_acc", "bwt", "fwt", "forgetting", "avg_inc_acc")

metadata = sa.MetaData()
runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_key", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("experiment", sa.String(200), nullable=False, index=True),
    sa.Column("strategy", sa.String(100), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    *[sa.Column(name, sa.Float) for name in HEADLINE],
    sa.Column("wall_seconds", sa.Float),
    sa.Column("memory_bytes", sa.BigInteger),
    sa.Column("model_bytes", sa.BigInteger),
    sa.Column("forward_samples", sa.BigInteger),
    sa.Column("backward_samples", sa.BigInteger),
    sa.Column("record", sa.JSON, nullable=False),
)


def run_key(experiment: str, strategy: str, params: dict, seed: int, setup: dict) -> str:
    """Identity of a run: same experiment, strategy, hyperparameters, seed and setup -> same key."""
    blob = json.dumps([experiment, strategy, params, seed, setup], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def setup_key(setup: dict) -> str:
    """Short identity of everything but strategy and seed: runs that may be averaged together."""
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
    def __init__(self, url: str = DEFAULT_STORE):
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
        except ArgumentError:
            raise UserError(f"store URL {url!r} is not an SQLAlchemy URL; "
                            f"use e.g. {DEFAULT_STORE} or postgresql://user@host/db") from None
        try:
            if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(parsed)
            metadata.create_all(self.engine)
        except (SQLAlchemyError, ImportError, OSError) as exc:
            first = str(exc).splitlines()[0]
            raise UserError(f"cannot open result store {url!r}: {first}") from None

    def write(self, record: dict[str, Any]) -> int:
        """Store one finished run atomically; returns its id."""
        metrics = record["metrics"]
        budgets = record["budgets"]
        row = {
            "run_key": record["run_key"],
            "created_at": record.get("created_at") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "experiment": record["experiment"], "strategy": record["strategy"],
            "params": record["params"], "seed": record["seed"], "status": record["status"],
            **{name: metrics.get(name) for name in HEADLINE},
            **{name: budgets.get(name) for name in ("wall_seconds", "memory_bytes", "model_bytes",
                                                      "forward_samples", "backward_samples")},
            "record": record,
        }
        with self.engine.begin() as conn:  # one transaction: all or nothing
            conn.execute(runs.delete().where(runs.c.run_key == row["run_key"]))
            result = conn.execute(runs.insert().values(**row))
            return int(result.inserted_primary_key[0])

    def list_runs(self, experiment: str | None = None) -> list[dict[str, Any]]:
        cols = [c for c in runs.c if c.name != "record"]
        query = sa.select(*cols).order_by(runs.c.id)
        if experiment is not None:
            query = query.where(runs.c.experiment == experiment)
        try:
            with self.engine.connect() as conn:
                return [dict(r._mapping) for r in conn.execute(query)]
        except OperationalError as exc:
            raise UserError(f"cannot read result store {self.url!r}: {str(exc).splitlines()[0]}") from None

    def get(self, run_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise UserError(f"no run with id {run_id} in {self.url}; list them with `cl runs`")
        out = dict(row._mapping)
        record = out.pop("record")
        return {**out, **{k: v for k, v in record.items() if k not in out}}
