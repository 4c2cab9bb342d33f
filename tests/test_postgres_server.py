"""tests/postgres_server.py starts a usable PostgreSQL server and cleans up after itself."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.postgres_server import postgres_server, postgres_unavailable


def test_postgres_server_round_trip_and_cleanup() -> None:
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    with postgres_server() as url:
        port = sa.engine.make_url(url).port
        engine = sa.create_engine(url)
        try:
            rows = sa.Table("rows", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                            sa.Column("name", sa.String(20)))
            rows.metadata.create_all(engine)
            with engine.begin() as conn:
                conn.execute(rows.insert().values(id=1, name="naive"))
            with engine.connect() as conn:
                assert conn.execute(sa.select(rows.c.name)).all() == [("naive",)]
                # The data directory sits inside the helper's temporary directory.
                tmp = Path(conn.execute(sa.text("SHOW data_directory")).scalar_one()).parent
            assert tmp.is_dir()
        finally:
            engine.dispose()
    assert not tmp.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
