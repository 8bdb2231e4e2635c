"""How every command-line entry point runs (run_clm.py and each `python -m clm.*` tool).

Python logging and the console's quiet defaults are set up here, once per command; a
clm.errors.UserError reaches the user as one `error:` line on stderr and exit code 2, with
no traceback. Everything else is a bug and keeps its traceback.

Under torchrun (one process per device) every process checks the same config and finds the
same error; process 0 says it. torchrun stops all processes as soon as one exits, so the
others give process 0 time to say it first (`ERROR_GRACE_SECONDS`); one still running after
that found an error of its own (its share of the data, say) and says it, naming itself.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from clm.errors import EXIT_OK, EXIT_USER_ERROR, UserError
from clm.observe import console

ERROR_GRACE_SECONDS = 20


def run_command(command: Callable[[], int | None]) -> int:
    """Run a command-line entry point: its exit code (None is EXIT_OK), or EXIT_USER_ERROR with
    one `error:` line on bad input."""
    console.setup()
    try:
        code = command()
    except UserError as e:
        if console.reports():
            print(f"error: {e}", file=sys.stderr)
        else:
            time.sleep(ERROR_GRACE_SECONDS)  # torchrun ends this process here when process 0 has exited
            print(f"error: process {os.environ['RANK']}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK if code is None else code
