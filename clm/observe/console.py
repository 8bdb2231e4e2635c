"""A quiet console: Python logging configured once, XLA's noise silenced by default.

XLA's C++ side prints a warning per compilation that the user cannot act on ("GSPMD
sharding propagation is going to be deprecated ... migrate to Shardy": torch_xla 2.9 has
no Shardy path for this code), and torch_xla announces on the root logger which device it
defaulted to. By default clm sets TF_CPP_MIN_LOG_LEVEL=2 (XLA's C++ errors still show) and
drops the device announcement; `TF_CPP_MIN_LOG_LEVEL=0` brings XLA's lines back.
Python warnings and every clm log record stay visible, on stderr. The run's own lines (eval
losses, resume, a stop) go to stdout through `say`. Both write through tqdm, so that a line
never breaks the progress bar, and hide secrets.
"""

from __future__ import annotations

import logging
import os
import sys

from clm.secrets import redact_text

# Set before torch_xla loads: XLA's C++ logging reads it once.
QUIET_XLA_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# torch_xla.runtime's logging.warning when it picks a device by itself (clm's summary names it).
_DEVICE_CHOICE_MESSAGES = ("Defaulting to PJRT_DEVICE=", "libtpu.so and TPU device found")


def quiet_xla() -> None:
    """Silence XLA's C++ INFO/WARNING lines unless the user set TF_CPP_MIN_LOG_LEVEL."""
    for name, value in QUIET_XLA_ENV.items():
        os.environ.setdefault(name, value)


class _ConsoleHandler(logging.Handler):
    """Writes through tqdm so a log line never breaks the progress bar; hides secrets."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(redact_text(self.format(record)), file=sys.stderr)
        except Exception:  # a broken console must not stop training
            self.handleError(record)


def reports() -> bool:
    """Whether this process prints the run's lines (and a bad input's one line): under torchrun
    (one process per device, the DTensor engine) process 0 alone, whose RANK the launcher sets;
    elsewhere every process (XLA: one per host)."""
    return os.environ.get("RANK", "0") == "0"


def say(line: str) -> None:
    """One line of the run's own output, on stdout (eval losses, resume, a stop)."""
    from tqdm import tqdm

    if reports():
        tqdm.write(redact_text(line), file=sys.stdout)
        sys.stdout.flush()  # a line the user waits for (the summary, a stop) must not sit in a buffer


def _not_device_choice(record: logging.LogRecord) -> bool:
    return not (record.name == "root" and str(record.msg).startswith(_DEVICE_CHOICE_MESSAGES))


def setup() -> None:
    """Configure Python logging once per process: clm's INFO and everyone's WARNING on stderr."""
    root = logging.getLogger()
    if any(isinstance(handler, _ConsoleHandler) for handler in root.handlers):
        return  # set up already (the logging tree is the process's own state)
    quiet_xla()
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_not_device_choice)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("clm").setLevel(logging.INFO)
    logging.captureWarnings(True)
