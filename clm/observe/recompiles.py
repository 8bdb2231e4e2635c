"""Recompilation alerts: after warm-up, every new XLA compilation is one warning with the
step and the cause torch_xla reports, and a count (`xla/compiles_after_warmup`).

torch_xla's compilation-cause analysis (PT_XLA_DEBUG_LEVEL=1, set up by
clm.runtime.enable_compile_analysis when the knob xla_compile_analysis is on) appends a block
per compilation to a file:

    Compilation Analysis: Compilation Cause
    Compilation Analysis:   user torch_xla.sync
    Compilation Analysis: Graph Info:
    Compilation Analysis:   Graph Hash: 5ac850eccceaefdc7d2fcd5a5e6659f4
    ...
    Compilation Analysis: Python Frame Triggered Execution:
    Compilation Analysis:   sync (.../torch_xla/torch_xla.py:87)
    Compilation Analysis:   train_step (.../clm/train.py:150)

This module reads the blocks written since the last look; without the file (analysis off) a
compilation is still counted and warned about, with "cause: unknown". Each kind of step ("train",
"eval") has its own warm-up: its first `warmup` runs may compile; later ones should not.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

_PREFIX = "Compilation Analysis: "
# Frames that are not where a step was written: libraries, and clm's engines (their step-end
# call is every step's; the line worth naming is the trainer's that called it).
_LIBRARY_FRAME = re.compile(r"[/\\](torch_xla|torch|transformers|site-packages|clm[/\\]engine)[/\\]")


@dataclass
class Compilation:
    cause: str
    graph_hash: str | None
    frame: str | None  # the innermost caller outside torch/torch_xla/transformers

    def describe(self) -> str:
        where = f" at {self.frame}" if self.frame else ""
        graph = f", graph {self.graph_hash}" if self.graph_hash else ""
        return f"cause: {self.cause}{graph}{where}"


def parse_analysis(text: str) -> list[Compilation]:
    """The compilations described in a stretch of torch_xla's analysis output."""
    lines = [line[len(_PREFIX):] for line in text.splitlines() if line.startswith(_PREFIX)]
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "Compilation Cause":
            i += 1
            continue
        i += 1
        cause, graph_hash, frames = [], None, []
        while i < len(lines) and lines[i].startswith("  "):
            cause.append(lines[i].strip())
            i += 1
        while i < len(lines) and not lines[i].startswith("-----") and lines[i].strip() != "Compilation Cause":
            line = lines[i].strip()
            if line.startswith("Graph Hash:"):
                graph_hash = line.split(":", 1)[1].strip()
            elif lines[i].startswith("  ") and re.search(r"\(.*:\d+\)$", line):
                frames.append(line)
            i += 1
        user_frames = [f for f in frames if not _LIBRARY_FRAME.search(f)]
        found.append(Compilation("; ".join(cause) or "unknown", graph_hash, (user_frames or frames or [None])[0]))
    return found


class RecompileWatch:
    """Call `observe(kind, step)` after each step of a kind has been cut (torch_xla.sync)."""

    def __init__(self, compile_count: Callable[[], int], analysis_path: str | None,
                 warmup: dict[str, int], enabled: bool = True):
        self._compile_count = compile_count
        self._path = analysis_path
        self._warmup = warmup
        self._enabled = enabled
        self._runs: Counter[str] = Counter()
        self._seen = compile_count()
        self._offset = self._size()
        self.after_warmup = 0

    def _size(self) -> int:
        try:
            return os.path.getsize(self._path) if self._path else 0
        except OSError:
            return 0

    def _read_new(self) -> list[Compilation]:
        if not self._path or not os.path.exists(self._path):
            return []
        with open(self._path, errors="replace") as f:
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        return parse_analysis(text)

    def observe(self, kind: str, step: int) -> int:
        """Warns about and counts this step's compilations if `kind` is past its warm-up."""
        self._runs[kind] += 1
        count = self._compile_count()
        new, self._seen = count - self._seen, count
        compilations = self._read_new()
        if new <= 0 or self._runs[kind] <= self._warmup.get(kind, 1):
            return 0
        self.after_warmup += new
        if self._enabled:
            described = [c.describe() for c in compilations[-new:]] or [
                "cause: unknown (torch_xla's compilation analysis is off: xla_compile_analysis=false, "
                "PT_XLA_DEBUG_LEVEL set by hand without PT_XLA_DEBUG_FILE, or a compilation before clm.runtime "
                "set it)"]
            for text in described:
                logger.warning("step %d: XLA compiled a new %s graph after warm-up (%s); a step that "
                               "recompiles runs at compile speed: look for a changed shape or a Python value "
                               "baked into the graph", step, kind, text)
        return new

    def state_dict(self) -> dict:
        return {"after_warmup": self.after_warmup}

    def load_state_dict(self, state: dict) -> None:
        self.after_warmup = state["after_warmup"]
