"""Exceptions that the CLI turns into one-line messages.

`UserError` means the input was wrong (exit code 2); `RunError` means a run
started but could not finish, e.g. the loss became NaN (exit code 1). Both
carry a message that names the problem and how to fix it.
"""


class UserError(Exception):
    """Bad input: unknown name, wrong parameter, missing file, corrupt checkpoint."""


class RunError(Exception):
    """A run started but failed (e.g. non-finite loss); nothing is stored."""
