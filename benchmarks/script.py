"""What the benchmark scripts share at their command line: counts that argparse checks, and bad input
(a CUDA device that is not there, a missing dataset file or library) as one line and exit code 2, as
`cl` gives it, instead of a traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from cl.errors import UserError, first_line


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more (repeats, processes, jobs)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def run_script(main: Callable[[], None]) -> None:
    """main(), a UserError turned into one line on stderr and exit code 2."""
    try:
        main()
    except UserError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {first_line(exc)}", file=sys.stderr)
        sys.exit(2)
