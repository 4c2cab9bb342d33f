"""The result store: one row per (experiment, strategy, hyperparameters, seed, setup, code version).

Any SQLAlchemy URL works; the default is an SQLite file `results/cl.db`
(PostgreSQL URLs let many machines share one store). Headline numbers are
columns so they can be queried and sorted; the full `RunRecord` (matrices,
metrics, budgets, logs, scenario description, config, provenance) is one JSON
column. Each run is written in a single transaction, replacing an earlier run
with the same key, so a run is stored completely or not at all.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, OperationalError, ProgrammingError, SQLAlchemyError

from cl.config import MAX_LABEL, MAX_NAME
from cl.errors import UserError
from cl.record import RunRecord

DEFAULT_STORE = "sqlite:///results/cl.db"
HEADLINE = ("acc", "task_il_acc", "bwt", "fwt", "forgetting", "avg_inc_acc")
BUDGET_COLUMNS = ("wall_seconds", "memory_bytes", "model_bytes", "forward_samples", "backward_samples")

# Import names of SQLAlchemy's database drivers -> the PyPI package that provides them.
DRIVER_PACKAGES = {"psycopg": "psycopg", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "pymysql"}

metadata = sa.MetaData()
runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_key", sa.String(64), nullable=False, unique=True),
    sa.Column("setup_key", sa.String(16), nullable=False, index=True),
    sa.Column("code_version", sa.String(200), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("experiment", sa.String(MAX_NAME), nullable=False, index=True),
    sa.Column("strategy", sa.String(MAX_LABEL), nullable=False),
    sa.Column("strategy_name", sa.String(100), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),  # seeds go up to 2**63 - 1
    sa.Column("status", sa.String(20), nullable=False),
    *[sa.Column(name, sa.Float) for name in HEADLINE],
    sa.Column("wall_seconds", sa.Float),
    *[sa.Column(name, sa.BigInteger) for name in BUDGET_COLUMNS[1:]],
    sa.Column("evaluated_on", sa.String(20), nullable=False),
    sa.Column("study", sa.String(MAX_NAME), index=True),
    sa.Column("record", sa.JSON, nullable=False),
)
COLUMNS = [c.name for c in runs.c if c.name not in ("id", "record")]


def sqlite_file(url: sa.engine.URL) -> Path | None:
    """The file of an SQLite store (None for other databases and in-memory ones). With `?uri=true` the
    database part is an SQLite URI, `file:PATH?mode=ro`, whose path is the file."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    database = url.database
    if url.query.get("uri") == "true" and database.startswith("file:"):
        if url.query.get("mode") == "memory":
            return None
        database = database[len("file:"):]
        if database.startswith("//"):  # file://host/path: the host is empty or localhost
            database = "/" + database[2:].partition("/")[2]
    return Path(database)


def _checkpoint_folder(url: sa.engine.URL, database: Path | None) -> str:
    """The store's own checkpoint folder name: the whole file name (cl.db and cl.sqlite are two stores),
    for a server its backend and a hash of its URL without the password (every server store used to
    share one folder, "default")."""
    if database is not None:
        return database.name
    digest = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()
    return f"{url.get_backend_name()}-{digest[:12]}"


class ResultStore:
    def __init__(self, url: str = DEFAULT_STORE, must_exist: bool = False, busy_timeout: float = 60.0):
        """Open (and create, unless `must_exist`: the reading commands never create a store at a
        mistyped path) the store at `url`. SQLite waits up to `busy_timeout` seconds for a lock
        that another program holds."""
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
        except ArgumentError:
            raise UserError(f"store URL {url!r} is not an SQLAlchemy URL; "
                            f"use e.g. {DEFAULT_STORE} or postgresql://user@host/db") from None
        database = sqlite_file(parsed)
        if must_exist and database is not None and not database.is_file():
            raise UserError(f"no result store at {database}; check --store, or create it with `cl run`")
        try:
            if database is not None:
                database.parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(parsed, connect_args={"timeout": busy_timeout}) \
                if parsed.get_backend_name() == "sqlite" else sa.create_engine(parsed)
            home = database.parent if database is not None else Path("results")
            self.spill_dir = home / "unsaved"  # runs the store refused (cl import)
            # Unfinished runs (cl run --resume), one folder per store: two stores side by side (two
            # processes running one experiment into each) must not share checkpoint files.
            self.checkpoint_root = home / "checkpoints" / _checkpoint_folder(parsed, database)
            if must_exist:  # a reading command never writes into a database it did not make
                if not sa.inspect(self.engine).has_table("runs"):
                    raise UserError(f"{url!r} holds no cl result store (it has no table 'runs'); check --store")
            else:
                self._create_tables()
            existing = {c["name"] for c in sa.inspect(self.engine).get_columns("runs")}
        except ImportError as exc:  # the URL's database driver is not installed
            module = (exc.name or "the driver").split(".")[0]
            raise UserError(f"cannot open result store {url!r}: its database driver {module!r} is not installed; "
                            f"pip install {DRIVER_PACKAGES.get(module, module)}, or use a sqlite:/// URL") from None
        except (SQLAlchemyError, OSError) as exc:
            first = str(exc).splitlines()[0]
            fix = f"; another program holds its lock: wait for it (cl run waits up to --busy-timeout, " \
                  f"now {busy_timeout:g} s)" \
                if "database is locked" in first else ""
            raise UserError(f"cannot open result store {url!r}: {first}{fix}") from None
        missing = sorted(set(COLUMNS) - existing)
        if missing:
            raise UserError(f"result store {url!r} was written by an older cl (no column {', '.join(missing)}); "
                            f"use a new --store file, or move the old one away")

    def _create_tables(self) -> None:
        """The store's table and indexes where missing. Processes that open a new store at the same
        moment race between looking and creating; the loser finds the table made and looks again."""
        for attempt in range(3):
            try:
                metadata.create_all(self.engine)
                return
            except (OperationalError, ProgrammingError) as exc:
                if "already exists" not in str(exc) or attempt == 2:
                    raise

    def check_writable(self) -> None:
        """Refuse, before anything trains, a store that cannot take a run (read-only file or folder,
        no permission) or that forgets it (an in-memory database): a write transaction that changes
        nothing."""
        parsed = self.engine.url
        if parsed.get_backend_name() == "sqlite" and sqlite_file(parsed) is None:
            raise UserError(f"store {self.url!r} is an in-memory database, whose runs are gone when cl exits; "
                            f"pass a file, e.g. --store {DEFAULT_STORE}")
        try:
            with self.engine.begin() as conn:
                conn.execute(runs.delete().where(runs.c.id == -1))
        except SQLAlchemyError as exc:
            raise UserError(f"result store {self.url!r} cannot be written: {str(exc).splitlines()[0]}; "
                            f"fix its permissions or pass another --store") from None

    def write_or_keep(self, record: RunRecord) -> int | Path:
        """Store a finished run and return its id; if the store refuses it (still locked after the busy
        timeout, gone read-only), keep the record as a JSON file in `spill_dir` for `cl import`, and
        return that file's path instead. A finished run is never lost."""
        try:
            return self.write(record)
        except SQLAlchemyError:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"run-{record.run_key[:16]}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record.to_json()))
            tmp.replace(path)
            return path

    def import_file(self, path: Path) -> int:
        """Store a run kept by `write_or_keep` (`cl import`); returns its id."""
        try:
            record = RunRecord.from_json(json.loads(Path(path).read_text()))
            record.check()
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise UserError(f"cannot import {path}: not a run kept by cl ({type(exc).__name__}: {exc})") from None
        try:
            return self.write(record)
        except SQLAlchemyError as exc:
            raise UserError(f"cannot write to result store {self.url!r}: {str(exc).splitlines()[0]}") from None

    def write(self, record: RunRecord) -> int:
        """Store one finished run atomically; returns its id."""
        headline = record.headline()
        row = {name: headline[name] for name in COLUMNS if name != "run_key"}
        row.update(run_key=record.run_key, record=record.to_json())
        with self.engine.begin() as conn:  # one transaction: all or nothing
            conn.execute(runs.delete().where(runs.c.run_key == record.run_key))
            result = conn.execute(runs.insert().values(**row))
            return int(result.inserted_primary_key[0])

    def list_runs(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Headline columns of the stored runs, oldest first."""
        cols = [c for c in runs.c if c.name != "record"]
        query = sa.select(*cols).order_by(runs.c.id)
        if experiment is not None:
            query = query.where(runs.c.experiment == experiment)
        with self._reading() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def records(self, status: str | None = None, study: str | None = None) -> list[RunRecord]:
        """Full records of the stored runs (optionally of one status, or of one sweep's study), oldest first."""
        query = sa.select(runs.c.id, runs.c.record).order_by(runs.c.id)
        if status is not None:
            query = query.where(runs.c.status == status)
        if study is not None:
            query = query.where(runs.c.study == study)
        with self._reading() as conn:
            return [self._record(row) for row in conn.execute(query)]

    def completed(self, run_key: str) -> RunRecord | None:
        """The completed run with this key, if the store has one."""
        query = sa.select(runs.c.id, runs.c.record).where(runs.c.run_key == run_key, runs.c.status == "completed")
        with self._reading() as conn:
            row = conn.execute(query).first()
        return None if row is None else self._record(row)

    def get(self, run_id: int) -> RunRecord:
        with self._reading() as conn:
            row = conn.execute(sa.select(runs.c.id, runs.c.record).where(runs.c.id == run_id)).first()
        if row is None:
            raise UserError(f"no run with id {run_id} in {self.url}; list them with `cl runs`")
        return self._record(row)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        """A connection for reading; a store that cannot be read (locked past the busy timeout, a
        server gone, a table missing) is one line naming it, not a traceback."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except OperationalError as exc:
            raise UserError(f"cannot read result store {self.url!r}: {str(exc).splitlines()[0]}") from None

    @staticmethod
    def _record(row: Any) -> RunRecord:
        record = RunRecord.from_json(row.record)
        record.id = row.id
        return record
