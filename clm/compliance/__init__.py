"""The MLPerf compliance rules of a run's benchmark, and running the official checker on its log.

The benchmark is the log's own submission_benchmark.

- gpt_oss_20b (MLPerf Training 6.0): mlperf-logging's own training_6.0.0 rules, as the package
  ships them (its common.yaml enqueues the division's and the benchmark's files); no copy here.
- mixtral_8x22b: mlperf-logging ships no rules for it (the benchmark was retired before a
  scored round), so clm ships them in rules/, written for the same checker:
  `closed` (rules/common.yaml), the benchmark as MLPerf's closed division would run it (it
  enqueues closed_common.yaml, which enqueues closed_mixtral_8x22b.yaml), and `dryrun`
  (rules/dryrun.yaml), the same log structure and algorithm at any scale.

The judge is always `python -m mlperf_logging.compliance_checker`, run as its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clm.errors import UserError

RULES_DIR = Path(__file__).resolve().parent / "rules"
RULESETS = {"closed": RULES_DIR / "common.yaml", "dryrun": RULES_DIR / "dryrun.yaml"}
# The checker's log-format version for clm's own rules: the round in which the Mixtral benchmark was proposed.
CHECKER_RULESET = "5.0.0"
# Benchmarks the official package has rules for, and the round whose rules judge them.
OFFICIAL_RULESETS = {"gpt_oss_20b": "6.0.0"}
LOG_NAME = "mlperf_compliance.log"
MLLOG_PREFIX = ":::MLLOG "


@dataclass
class Verdict:
    passed: bool
    output: str  # the checker's own report


def logged_benchmark(log_path: str) -> str | None:
    """The log's submission_benchmark value, if it has one."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(MLLOG_PREFIX) and '"submission_benchmark"' in line:
                try:
                    return json.loads(line[len(MLLOG_PREFIX):]).get("value")
                except json.JSONDecodeError:
                    return None
    return None


def checker_command(log_path: str, rules: str, report_path: str, benchmark: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training"]
    if benchmark in OFFICIAL_RULESETS:
        if rules != "closed":
            raise UserError(f"--rules {rules}: {benchmark} is judged by mlperf-logging's own training_"
                            f"{OFFICIAL_RULESETS[benchmark]} rules only; use --rules closed")
        # No --config: the checker starts from its own training_<round>/common.yaml.
        return [*command, "--ruleset", OFFICIAL_RULESETS[benchmark], "--log_output", report_path, str(log_path)]
    return [*command, "--ruleset", CHECKER_RULESET, "--config", str(RULESETS[rules]),
            "--log_output", report_path, str(log_path)]


def check(log_path: str, rules: str = "closed") -> Verdict:
    """Run the official checker on one log with its benchmark's rules."""
    if rules not in RULESETS:
        raise UserError(f"--rules {rules}: unknown; use one of {', '.join(RULESETS)}")
    if not os.path.isfile(log_path):
        raise UserError(f"{log_path}: no such MLPerf log (a run writes run_dir/{LOG_NAME})")
    benchmark = logged_benchmark(log_path)
    with tempfile.TemporaryDirectory() as tmp:
        command = checker_command(log_path, rules, os.path.join(tmp, "report.log"), benchmark)
        done = subprocess.run(command, capture_output=True, text=True)
    return Verdict(done.returncode == 0, done.stdout + done.stderr)
