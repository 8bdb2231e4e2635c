"""The one exception type for bad input.

Anything raised as UserError reaches the user as a single line on stderr and a non-zero
exit, with no traceback (see run_clm.py). Its message must name the knob or path and say
what would work. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config value, a path, a data file. The message is shown as is."""
