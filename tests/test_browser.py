"""The leaderboard page in a real browser: headless Chromium renders index.html from disk.

The test finds `chromium` or installs Debian's package (as root, through apt-get); it skips, naming
the reason, only where chromium can be neither found nor installed. It takes a screenshot and reads the
DOM after load (`--dump-dom`): every protocol's section has its table and its three figures, and every
image was decoded (the page marks each <img> with data-loaded or data-broken from its onload/onerror).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cl.leaderboard import generate
from cl.runner import build_scenario, load_datasets, run_one
from cl.store import ResultStore
from tests.helpers import digits_experiment

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]


def find_or_install_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root): "
                    "apt-get install chromium to run this test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"chromium could not be installed with apt-get: {done.stderr.strip()[-300:]}")
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    """A leaderboard of two protocols (naive and er on digits, the second under another name)."""
    folder = tmp_path_factory.mktemp("browser")
    store = ResultStore(f"sqlite:///{folder}/runs.db")
    cfg = digits_experiment([{"name": "naive"}, {"name": "er", "buffer_size": 50}], n_experiences=3)
    data = load_datasets(cfg.datasets)
    for seed in (0, 1):
        scenario = build_scenario(cfg, data, seed)
        for component in cfg.strategies:
            record = run_one(cfg, component, scenario, seed, torch.device("cpu"), progress=False)
            store.write(record)
            store.write(dataclasses.replace(record, experiment="second <protocol>", run_key=record.run_key + "b"))
    generate(store, folder / "board")
    return folder / "board"


def test_the_page_renders_in_headless_chromium_with_every_table_and_plot(board, tmp_path):
    chromium = find_or_install_chromium()
    page = (board / "index.html").as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    shot = tmp_path / "leaderboard.png"
    subprocess.run([chromium, *BROWSER_FLAGS, *profile, "--window-size=1300,3000", f"--screenshot={shot}", page],
                   capture_output=True, timeout=180, check=True)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000  # something was drawn
    shutil.copy(shot, board / "screenshot-test.png")  # kept beside the page for a look
    dom = subprocess.run([chromium, *BROWSER_FLAGS, "--user-data-dir=" + str(tmp_path / "profile2"),
                          "--virtual-time-budget=10000", "--dump-dom", page],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    sections = re.findall(r"<section class=\"protocol\".*?</section>", dom, flags=re.S)
    assert len(sections) == 2
    for section in sections:
        assert "<table class=\"sortable\">" in section and section.count("<tr>") == 3  # header + 2 strategies
        images = re.findall(r"<img[^>]*>", section)
        assert len(images) == 3 and all('data-loaded="1"' in img for img in images), images
    assert 'data-broken="1"' not in dom
    assert "&lt;protocol&gt;" in dom and "<protocol>" not in dom  # names from runs stay text
    assert "Definitions" in dom

