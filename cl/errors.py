"""Exceptions that the CLI turns into one-line messages.

`UserError` means the input was wrong (exit code 2); `RunError` means training
started but could not finish, e.g. the loss became NaN. `cl run` records such a
run with its status and goes on; `cl pretrain` stops with exit code 1. Both
carry a message that names the problem and how to fix it.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none, as EOFError from torch.load)."""
    return (str(exc).strip().splitlines() or [""])[0]


class UserError(Exception):
    """Bad input: unknown name, wrong parameter, missing file, corrupt checkpoint."""


class RunError(Exception):
    """Training started but could not finish (e.g. a non-finite loss)."""


class Pruned(RunError):
    """A sweep's pruner stopped the run after an experience: its trial looked hopeless (cl/sweep.py)."""
