"""The MLPerf compliance rules for this benchmark, and running the official checker on a log.

mlperf-logging ships no rules for Mixtral-8x22B (the benchmark was retired), so clm ships
them in rules/, written for mlperf-logging's own checker:

- `closed` (rules/common.yaml): the benchmark as MLPerf's closed division would run it;
  it enqueues closed_common.yaml, which enqueues closed_mixtral_8x22b.yaml.
- `dryrun` (rules/dryrun.yaml): the same log structure and algorithm at any scale.

The judge is always `python -m mlperf_logging.compliance_checker`, run as its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clm.errors import UserError

RULES_DIR = Path(__file__).resolve().parent / "rules"
RULESETS = {"closed": RULES_DIR / "common.yaml", "dryrun": RULES_DIR / "dryrun.yaml"}
# The checker's log-format version: the round in which the Mixtral benchmark was proposed.
CHECKER_RULESET = "5.0.0"
LOG_NAME = "mlperf_compliance.log"


@dataclass
class Verdict:
    passed: bool
    output: str  # the checker's own report


def checker_command(log_path: str, rules: str, report_path: str) -> list[str]:
    return [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
            "--ruleset", CHECKER_RULESET, "--config", str(RULESETS[rules]),
            "--log_output", report_path, str(log_path)]


def check(log_path: str, rules: str = "closed") -> Verdict:
    """Run the official checker on one log with one of the shipped rulesets."""
    if rules not in RULESETS:
        raise UserError(f"--rules {rules}: unknown; use one of {', '.join(RULESETS)}")
    if not os.path.isfile(log_path):
        raise UserError(f"{log_path}: no such MLPerf log (a run writes run_dir/{LOG_NAME})")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(checker_command(log_path, rules, os.path.join(tmp, "report.log")),
                              capture_output=True, text=True)
    return Verdict(done.returncode == 0, done.stdout + done.stderr)
