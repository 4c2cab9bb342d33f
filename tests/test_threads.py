"""The thread budget (cl/threads.py): the cores shared among the cl processes running."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cl import threads


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "REGISTRY", tmp_path)
    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(threads, "_requested", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return tmp_path


def test_cores_are_shared_among_live_processes_and_dead_ones_are_forgotten(registry):
    (registry / str(os.getpid())).touch()
    assert threads.live_processes() == 1 and threads.share() == 8
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    try:
        for proc in [*sleepers, finished]:
            (registry / str(proc.pid)).touch()
        (registry / "not-a-pid").touch()
        assert threads.live_processes() == 3
        assert threads.share() == 8 // 3
        assert not (registry / str(finished.pid)).exists()  # a dead process's entry is removed
        sleepers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        (registry / str(sleepers[-1].pid)).touch()
        assert threads.share() == 8 // 4
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()
    assert threads.share() == 8  # the others ended: this process gets every core back
    monkeypatch_cores = 1
    threads.cores = lambda: monkeypatch_cores  # restored by the fixture's monkeypatch
    (registry / "1").touch()  # init: always running
    assert threads.share() == 1  # more processes than cores: one thread each, never zero


@pytest.mark.skipif(threads.started(os.getpid()) is None, reason="no /proc: entries cannot name start times")
def test_an_entry_whose_id_now_belongs_to_a_later_process_is_stale(registry):
    """A cl process killed with SIGKILL leaves its entry; a later process given its id is not a cl process."""
    (registry / str(os.getpid())).write_text(threads.started(os.getpid()))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        entry = registry / str(sleeper.pid)
        entry.write_text(str(int(threads.started(sleeper.pid)) - 1))  # the killed process started earlier
        assert threads.live_processes() == 1 and not entry.exists()
        entry.write_text(threads.started(sleeper.pid))  # its own entry
        assert threads.live_processes() == 2
    finally:
        sleeper.kill()
        sleeper.wait()


def test_claim_registers_the_start_time_of_this_process(registry, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_registered", None)
    try:
        threads.claim(1)
        assert (registry / str(os.getpid())).read_text() == (threads.started(os.getpid()) or "")
    finally:
        threads.release()
        torch.set_num_threads(before)


def test_claim_sets_torch_threads_and_a_requested_count_is_kept(registry, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_registered", None)
    try:
        assert threads.claim(1) == 1 and torch.get_num_threads() == 1
        assert (registry / str(os.getpid())).exists()
        (registry / "1").touch()  # init: always alive
        assert threads.rebalance() == 1  # --threads fixes it
        threads._requested = None
        assert threads.rebalance() == 4 and torch.get_num_threads() == 4  # 8 cores, 2 processes
    finally:
        threads.release()
        torch.set_num_threads(before)
    assert not (registry / str(os.getpid())).exists()


def test_omp_num_threads_fixes_the_count_unless_threads_is_given(registry, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_registered", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    try:
        assert threads.claim() == 3 and torch.get_num_threads() == 3
        assert threads.claim(2) == 2  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "zero")
        assert threads.claim() == 8  # not a count: the shared default
    finally:
        threads.release()
        torch.set_num_threads(before)


def test_the_registry_is_shared_by_every_user_and_an_unusable_one_is_said_in_one_line(
        registry, monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_registered", None)
    shared = registry / "cl-processes"
    monkeypatch.setattr(threads, "REGISTRY", shared)
    try:
        threads.claim()
        assert shared.stat().st_mode & 0o7777 == 0o1777  # like /tmp: anyone registers, only owners remove
        threads.release()
        (registry / "a-file").write_text("")
        monkeypatch.setattr(threads, "REGISTRY", registry / "a-file" / "cl-processes")  # cannot be created
        assert threads.claim() == 8
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "does not share cores" in err[0] and "uses 8 threads" in err[0]
    finally:
        threads.release()
        torch.set_num_threads(before)
