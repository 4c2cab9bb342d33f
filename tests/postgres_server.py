"""A throwaway PostgreSQL server for tests: ``with postgres_server() as url: ...``.

The server lives in a fresh temporary directory, listens only on 127.0.0.1 on a free
port, trusts every local connection (superuser ``cl``, no password) and is stopped and
deleted on exit. Tests that need it should skip with ``postgres_unavailable()``'s reason.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

PROGRAMS = ("initdb", "pg_ctl", "postgres")
USER = "cl"
DBNAME = "cl_test"
START_TIMEOUT_S = 60


def _version_key(bin_dir: str) -> tuple[int, ...]:
    """/usr/lib/postgresql/15/bin -> (15,); 9.6 -> (9, 6); anything else sorts last."""
    try:
        return tuple(int(part) for part in Path(bin_dir).parent.name.split("."))
    except ValueError:
        return ()


def _binaries() -> dict[str, str] | None:
    """Paths of initdb, pg_ctl and postgres, or None.

    Debian keeps them off PATH, in /usr/lib/postgresql/<version>/bin, so look there first
    (highest version first), then on PATH.
    """
    for bin_dir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        paths = {name: os.path.join(bin_dir, name) for name in PROGRAMS}
        if all(os.access(path, os.X_OK) for path in paths.values()):
            return paths
    found = {name: shutil.which(name) for name in PROGRAMS}
    return found if all(found.values()) else None  # type: ignore[return-value]


def _server_user() -> str | None:
    """The unprivileged user to run the server as, or None to run it as ourselves.

    PostgreSQL refuses to run as root, and CI runs the tests as root: then use Debian's
    ``postgres`` system user if there is one, else ``nobody``.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name).pw_name
    return None


def postgres_unavailable() -> str | None:
    """One line saying why ``postgres_server()`` cannot work here, or None if it can."""
    if _binaries() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        return f"psycopg (3) not importable: {exc}"
    if os.geteuid() == 0:
        if _server_user() is None:
            return "running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is not available to drop privileges"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no server log: {exc})"


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a fresh PostgreSQL server and yield ``postgresql+psycopg://cl@127.0.0.1:PORT/cl_test``.

    The unix socket goes into the temporary directory rather than the default
    /var/run/postgresql, which may not exist or not be writable by the server's user.
    Raises RuntimeError, with the server log's last lines, if the server does not start.
    """
    import psycopg

    bins = _binaries()
    if bins is None:
        raise RuntimeError(postgres_unavailable())
    user = _server_user()
    prefix = ["runuser", "-u", user, "--"] if user else []
    tmp = Path(tempfile.mkdtemp(prefix="cl-postgres-"))
    data, log = tmp / "data", tmp / "server.log"
    if user:
        # mkdtemp makes a 0700 root-owned directory; the server's user must own it.
        shutil.chown(tmp, user=user, group=pwd.getpwnam(user).pw_gid)

    def run(*args: str, timeout: float = START_TIMEOUT_S + 30) -> subprocess.CompletedProcess[str]:
        # cwd=tmp: the server's user may not be allowed into our working directory.
        return subprocess.run(prefix + list(args), cwd=tmp, capture_output=True, text=True, timeout=timeout)

    try:
        done = run(bins["initdb"], "-D", str(data), "-A", "trust", "-U", USER,
                   "--no-sync", "--no-locale", "-E", "UTF8")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        port = _free_port()
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                f"unix_socket_directories = '{tmp}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        done = run(bins["pg_ctl"], "-D", str(data), "-l", str(log),
                   "-w", "-t", str(START_TIMEOUT_S), "start")
        if done.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start ({done.returncode}): {done.stdout}{done.stderr}\n"
                f"last lines of {log}:\n{_log_tail(log)}"
            )
        with psycopg.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DBNAME}")
        yield f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{DBNAME}"
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                run(bins["pg_ctl"], "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
