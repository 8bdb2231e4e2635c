"""The one exception type for bad input, and how command-line entry points report it.

Anything raised as UserError reaches the user as a single line on stderr and exit code 2,
with no traceback. Its message must name the knob or path and say what would work.
Everything else is a bug and keeps its traceback.
"""

import sys
from typing import Callable

# Exit codes, defined once: deployment restart policies (helm/, clm.launch) retry
# EXIT_PREEMPTED and never EXIT_USER_ERROR.
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM or the kill switch after a complete checkpoint


class UserError(Exception):
    """Bad input: a config value, a path, a data file. The message is shown as is."""


def run_command(command: Callable[[], int | None]) -> int:
    """Run a command-line entry point: its exit code (None is EXIT_OK), or EXIT_USER_ERROR with
    one `error:` line on bad input.

    Python logging and the console's quiet defaults are set up here, once, for every command.
    """
    from clm.observe import console

    console.setup()
    try:
        code = command()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK if code is None else code
