"""python -m clm.launch xpk --cluster C --tpu-type v5p-512 --num-slices N --docker-image IMAGE [--dry-run] -- OVERRIDES"""

import argparse
import sys

from clm.cli import run_command
from clm.launch import xpk


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clm.launch", description="Launch clm training on GKE TPU slices.")
    launchers = parser.add_subparsers(dest="launcher", required=True)
    xpk.add_arguments(launchers.add_parser("xpk", help="submit with `xpk workload create`", description=xpk.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return xpk.launch(args)


if __name__ == "__main__":
    codes = []
    status = run_command(lambda: codes.append(main(sys.argv[1:])))
    sys.exit(codes[0] if codes else status)
