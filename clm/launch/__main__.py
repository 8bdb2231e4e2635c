"""python -m clm.launch xpk --cluster C (--tpu-type v5p-512 --num-slices N | --device-type h100-80gb-8 --num-nodes N) --docker-image IMAGE [--dry-run] -- OVERRIDES
python -m clm.launch gke-gpu --gpu-type h100-80gb --nodes N --docker-image IMAGE [--dry-run] -- OVERRIDES"""

import argparse
import sys

from clm.cli import run_command
from clm.launch import gke, xpk


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clm.launch",
                                     description="Launch clm training on GKE TPU slices or GPU node pools.")
    launchers = parser.add_subparsers(dest="launcher", required=True)
    xpk.add_arguments(launchers.add_parser("xpk", help="submit with `xpk workload create` (TPU or GPU)",
                                           description=xpk.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    gke.add_arguments(launchers.add_parser("gke-gpu", help="apply a JobSet of GPU nodes with kubectl",
                                           description=gke.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return {"xpk": xpk.launch, "gke-gpu": gke.launch}[args.launcher](args)


if __name__ == "__main__":
    sys.exit(run_command(lambda: main(sys.argv[1:])))
