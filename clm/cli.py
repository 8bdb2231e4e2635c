"""How every command-line entry point runs (run_clm.py and each `python -m clm.*` tool).

Python logging and the console's quiet defaults are set up here, once per command; a
clm.errors.UserError reaches the user as one `error:` line on stderr and exit code 2, with
no traceback. Everything else is a bug and keeps its traceback.

Under torchrun (one process per device) every process checks the same config and finds the
same error; process 0 says it. torchrun stops all processes as soon as one exits, so the
others give process 0 time to say it first (`ERROR_GRACE_SECONDS`); one still running after
that found an error of its own (its share of the data, say) and says it, naming itself.

Under a launcher that keeps no exit codes (torchrun exits 1 whatever its workers exited with,
so a preempted worker's 75 would read as a crash), the per-host wrapper (clm.launch.host)
names a directory in CLM_EXIT_CODE_DIR and every command leaves its exit code there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from clm.errors import EXIT_OK, EXIT_USER_ERROR, UserError
from clm.observe import console
from clm.secrets import redact_text

EXIT_CODE_DIR_ENV = "CLM_EXIT_CODE_DIR"
EXIT_CODE_SUFFIX = ".exit"  # <pid>.exit holds that process's exit code
UNCAUGHT_EXCEPTION_CODE = 1  # what Python exits with after an uncaught exception's traceback
ERROR_GRACE_SECONDS = 20


def run_command(command: Callable[[], int | None]) -> int:
    """Run a command-line entry point: its exit code (None is EXIT_OK), or EXIT_USER_ERROR with
    one `error:` line on bad input."""
    console.setup()
    code = UNCAUGHT_EXCEPTION_CODE
    try:
        result = command()
        code = EXIT_OK if result is None else result
    except UserError as e:
        if console.reports():
            print(redact_text(f"error: {e}"), file=sys.stderr)
        else:
            time.sleep(ERROR_GRACE_SECONDS)  # torchrun ends this process here when process 0 has exited
            print(redact_text(f"error: process {os.environ['RANK']}: {e}"), file=sys.stderr)
        code = EXIT_USER_ERROR
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else UNCAUGHT_EXCEPTION_CODE)
        raise
    finally:
        leave_exit_code(code)
    return code


def leave_exit_code(code: int) -> None:
    """Write this process's exit code where CLM_EXIT_CODE_DIR says, if it says."""
    directory = os.environ.get(EXIT_CODE_DIR_ENV)
    if directory:
        (Path(directory) / f"{os.getpid()}{EXIT_CODE_SUFFIX}").write_text(str(code))
