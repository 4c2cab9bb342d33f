"""How many compute threads a `cl` process uses.

PyTorch starts one compute thread per core in every process. Several processes
on one machine (a user's parallel experiments, sweep workers) then run more
threads than there are cores, and PyTorch's threads spin while they wait for
each other: on 2-core machines, four runs started at once took 76-79 s each
against 3.6-4.1 s when each used one thread.

So by default the cores are shared out among the `cl` processes running on the
machine. Each process registers itself (a file named after its process id in a
folder under the system's temporary directory, holding the process's start
time so that a later process given the same id is not taken for it) and, at the start of every
experience, takes max(1, cores // live cl processes) threads. A process that
starts alone keeps every core; when others start, it gives cores up at its next
experience. `--threads N` fixes the count instead, and so does OMP_NUM_THREADS
when it is set (what users of PyTorch expect it to do). The folder is shared by
every user of the machine (mode 1777, as the temporary directory itself); a
process that cannot register there says so and keeps its count unshared.
"""
from __future__ import annotations

import atexit
import os
import sys
import tempfile
from pathlib import Path

import torch

REGISTRY = Path(tempfile.gettempdir()) / "cl-processes"

_requested: int | None = None
_registered: Path | None = None


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def started(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot: field 22 of /proc/PID/stat), or None where
    /proc does not say. With the id it names one process: an id is reused only after its process ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # after the command name, which may hold spaces


def live_processes() -> int:
    """Registered cl processes that are still running (this one included); stale entries are removed:
    those of processes that ended, and those whose id now belongs to a process started later (a cl
    process killed with SIGKILL leaves its entry behind)."""
    alive = 0
    for entry in REGISTRY.glob("*"):
        try:
            pid = int(entry.name)
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _forget(entry)
            continue
        except PermissionError:  # another user's process: alive
            pass
        try:
            registered = entry.read_text().strip()
        except OSError:
            registered = ""
        now = started(pid)
        if registered and now is not None and registered != now:  # the id was given to another process
            _forget(entry)
            continue
        alive += 1
    return max(alive, 1)


def _forget(entry: Path) -> None:
    try:
        entry.unlink(missing_ok=True)
    except OSError:  # another user's entry in the sticky folder: that user's processes remove it
        pass


def share() -> int:
    """The threads this process should use now."""
    return _requested if _requested is not None else max(1, cores() // live_processes())


def requested_by_environment() -> int | None:
    """OMP_NUM_THREADS as a positive count, else None."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n >= 1 else None


def claim(requested: int | None = None) -> int:
    """Register this process (for the life of the process) and set its thread count; `requested`
    (else OMP_NUM_THREADS) fixes it. Returns the count set."""
    global _requested, _registered
    _requested = requested if requested is not None else requested_by_environment()
    if _registered is None:
        entry = REGISTRY / str(os.getpid())
        try:
            REGISTRY.mkdir(parents=True, exist_ok=True)
            folder = REGISTRY.stat()
            if folder.st_uid == os.getuid() and folder.st_mode & 0o1777 != 0o1777:
                REGISTRY.chmod(0o1777)  # other users' cl processes register here too
            entry.write_text(started(os.getpid()) or "")
        except OSError as exc:
            n = share()
            print(f"cl: cannot register in {REGISTRY} ({exc.strerror}), so this process does not share cores "
                  f"with other cl processes: it uses {n} threads (--threads N sets them)", file=sys.stderr)
            torch.set_num_threads(n)
            return n
        _registered = entry
        atexit.register(release)
    return rebalance()


def rebalance() -> int:
    """Set this process's thread count to its current share (a no-op unless `claim` was called)."""
    if _registered is None:
        return torch.get_num_threads()
    n = share()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def release() -> None:
    global _registered
    if _registered is not None:
        _registered.unlink(missing_ok=True)
        _registered = None
