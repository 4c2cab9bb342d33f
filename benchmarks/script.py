"""What the benchmark scripts share at their command line: bad input (a CUDA device that is not there, a
missing dataset file or library) as one line and exit code 2, as `cl` gives it, instead of a traceback.
Counts are checked by argparse with `cl`'s own `positive_int`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from cl.cli import one_line
from cl.errors import UserError


def run_script(main: Callable[[], None]) -> None:
    """main(), a UserError turned into one line on stderr and exit code 2."""
    try:
        main()
    except UserError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
