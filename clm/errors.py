"""The one exception type for bad input, and the exit codes: the bottom layer, it imports
nothing of clm.

Anything raised as UserError reaches the user as a single line on stderr and exit code 2,
with no traceback (clm.cli.run_command). Its message must name the knob or path and say
what would work. Everything else is a bug and keeps its traceback.
"""

# Exit codes, defined once: deployment restart policies (helm/, clm.launch) retry
# EXIT_PREEMPTED and never EXIT_USER_ERROR.
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM or the kill switch after a complete checkpoint


class UserError(Exception):
    """Bad input: a config value, a path, a data file. The message is shown as is."""

