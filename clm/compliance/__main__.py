"""python -m clm.compliance RUN_DIR [--rules closed|dryrun]: the official MLPerf checker on a run's log.

closed  the log's benchmark's rules: gpt_oss_20b, mlperf-logging's own training_6.0.0 rules;
        mixtral_8x22b, clm's (sequence 32768, target 1.8, ...)
dryrun  mixtral_8x22b's structure and algorithm at any scale (the default job, a v4-8 dry run)
Exit code 0 when the log passes, 1 when it does not.
"""

import argparse
import os
import sys

from clm.cli import run_command


def main(argv: list[str]) -> None:
    from clm.compliance import LOG_NAME, RULESETS, check

    parser = argparse.ArgumentParser(prog="python -m clm.compliance", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help=f"a run directory (or the {LOG_NAME} file itself)")
    parser.add_argument("--rules", default="closed", choices=sorted(RULESETS))
    args = parser.parse_args(argv)
    log = args.run_dir if os.path.isfile(args.run_dir) else os.path.join(args.run_dir, LOG_NAME)
    verdict = check(log, args.rules)
    print(verdict.output.rstrip())
    print(f"compliance: rules={args.rules} passed={'yes' if verdict.passed else 'no'} log={log}")
    if not verdict.passed:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(run_command(lambda: main(sys.argv[1:])))
