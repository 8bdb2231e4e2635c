"""How every command-line entry point runs (run_clm.py and each `python -m clm.*` tool).

Python logging and the console's quiet defaults are set up here, once per command; a
clm.errors.UserError reaches the user as one `error:` line on stderr and exit code 2, with
no traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from clm.errors import EXIT_OK, EXIT_USER_ERROR, UserError
from clm.observe import console


def run_command(command: Callable[[], int | None]) -> int:
    """Run a command-line entry point: its exit code (None is EXIT_OK), or EXIT_USER_ERROR with
    one `error:` line on bad input."""
    console.setup()
    try:
        code = command()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK if code is None else code
