"""Where a run's numbers come from: code version, package versions, the plugin's package, the device."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import cl

#: Packages whose code shapes the data or the training; their versions are stored with every run.
VERSIONED_PACKAGES = ("torchvision", "numpy", "scikit-learn", "mlxtend", "mnist1d")


CHECKOUT = Path(cl.__file__).resolve().parent.parent


@functools.cache
def git_commit(root: Path = CHECKOUT) -> str | None:
    """The checkout's commit, or None unless `root` is the top of a git checkout (a package installed
    into a virtual environment inside some other repository is not that repository's code).

    Uncommitted changes to tracked Python files add `-dirty.` and 8 hex digits of a hash of their
    diff, so that two different uncommitted states of the code are two versions: a run's record says
    which, and a checkpoint of one is refused by the other (its identity holds the code version).
    Other files (README, experiment files: those are in the configuration) leave the version alone."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=10)
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.decode().strip()).resolve() != Path(root).resolve():
            return None
        head = git("rev-parse", "HEAD")
        diff = git("diff", "HEAD", "--no-ext-diff", "--", "*.py")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    commit = head.stdout.decode().strip()
    return f"{commit}-dirty.{hashlib.sha256(diff.stdout).hexdigest()[:8]}" if diff.stdout.strip() else commit


def code_version() -> str:
    """What identifies the engine's code: the package version and the git commit."""
    return f"cl-bench {cl.__version__} ({git_commit() or 'no git checkout'})"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def package_of(module: str) -> dict[str, str] | None:
    """Distribution name and version of the installed package that provides `module`, if any."""
    names = _distributions().get(module.split(".")[0])
    if not names:
        return None
    try:
        return {"name": names[0], "version": importlib.metadata.version(names[0])}
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of Python, cl and every package whose code shapes the data or the training."""
    out: dict[str, str | None] = {"cl": cl.__version__, "python": platform.python_version(),
                                  "platform": platform.platform(),
                                  "torch": torch.__version__}  # includes the build, e.g. +cpu or +cu130
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def provenance(device: torch.device, strategy_module: str) -> dict[str, Any]:
    """Everything that traces a run to its code and machine."""
    return {"code_version": code_version(), "git_commit": git_commit(), "versions": versions(),
            "strategy_package": package_of(strategy_module), "device": device_name(device)}
