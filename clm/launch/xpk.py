"""python -m clm.launch xpk: build and run `xpk workload create` for a clm training run.

The command every host runs is clm.launch.job's (the host wrapper, then run_clm.py with the
Hydra overrides on a TPU host, torchrun with run_clm.py backend=dtensor on a GPU node). The
environment carries the TPU runtime's settings, or on GPUs torchrun's node rank and
rendezvous host taken from the variables xpk sets on every GPU pod (NODE_RANK, the pod's
completion index; JAX_COORDINATOR_ADDRESS, pod 0's name), and, for secrets, only the names
of Kubernetes Secret keys (CLM_SECRET_REFS, resolved in the pod by clm.launch.secrets): xpk
cannot reference a Secret, and its --env-file copies values from the local environment into
the manifest, so it is never used. JobSet restarts the job on the preemption exit code
(--restart-on-exit-codes, up to --max-restarts times) and fails it on a config error
(exit 2) or any other failure.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from clm.errors import UserError
from clm.launch import job, secrets

XPK_ENV = "CLM_XPK"  # the xpk executable, when it is not `xpk` on PATH (e.g. in its own venv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", required=True, help="GKE cluster created with `xpk cluster create`")
    accelerator = parser.add_mutually_exclusive_group(required=True)
    accelerator.add_argument("--tpu-type", help="e.g. v5p-512, v4-8, v5litepod-256, v6e-256")
    accelerator.add_argument("--device-type", help="a GPU node type as xpk names it: h100-80gb-8, h200-141gb-8, b200-8")
    parser.add_argument("--num-slices", type=int, default=None, help="TPU slices (default 1)")
    parser.add_argument("--num-nodes", type=int, default=None, help="GPU nodes (default 1)")
    parser.add_argument("--docker-image", required=True,
                        help="the image of docker/tpu/Dockerfile or, for GPUs, docker/gpu/Dockerfile "
                             "(docker/build_and_push_image.sh prints it)")
    parser.add_argument("--workload", default=None, help="workload name (default clm-MMDD-HHMMSS)")
    parser.add_argument("--project", default=None)
    parser.add_argument("--zone", default=None)
    parser.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts after a preemption")
    parser.add_argument("--grace-period", type=int, default=300,
                        help="seconds a pod gets after SIGTERM to finish its checkpoint")
    parser.add_argument("--secret", default=job.DEFAULT_SECRET_NAME,
                        help="Kubernetes Secret with keys " + ", ".join(job.SECRET_KEYS.values()))
    parser.add_argument("--storage", action="append", default=[],
                        help="an xpk storage (GCS FUSE bucket) to mount, e.g. for output_dir and the compile cache")
    parser.add_argument("--compile-cache-dir", default=None,
                        help="XLA compile cache shared by all hosts and launches, e.g. /gcs/BUCKET/compile_cache")
    parser.add_argument("--error-dir", default=None,
                        help="shared directory where a failing host leaves its error for the others")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the xpk command and the JobSet manifest; contact no cluster")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="-- Hydra overrides for run_clm.py")


# Variables xpk sets on every GPU pod before the user's (xpk/core/docker_resources.py,
# get_gpu_env); Kubernetes expands $(NAME) in a later variable's value.
XPK_GPU_ENV = {job.NODE_RANK_ENV: "$(NODE_RANK)", job.MASTER_ADDR_ENV: "$(JAX_COORDINATOR_ADDRESS)"}


def tpu_job(args: argparse.Namespace, overrides: list[str]) -> tuple[job.Job, list[str], dict[str, str]]:
    """The job, xpk's accelerator arguments and the environment of a TPU workload."""
    if args.num_nodes is not None:
        raise UserError(f"--num-nodes {args.num_nodes}: GPU nodes; a TPU workload takes --num-slices")
    num_slices = 1 if args.num_slices is None else args.num_slices
    if num_slices < 1:
        raise UserError(f"--num-slices {num_slices}: must be at least 1")
    run = job.Job(overrides=overrides, num_slices=num_slices,
                  compile_cache_dir=args.compile_cache_dir, host_error_dir=args.error_dir)
    return run, ["--tpu-type", args.tpu_type, "--num-slices", str(num_slices)], job.runtime_env(args.tpu_type)


def gpu_job(args: argparse.Namespace, overrides: list[str]) -> tuple[job.GpuJob, list[str], dict[str, str]]:
    """The job, xpk's accelerator arguments and the environment of a GPU workload."""
    if args.num_slices is not None:
        raise UserError(f"--num-slices {args.num_slices}: TPU slices; a GPU workload (--device-type) takes --num-nodes")
    num_nodes = 1 if args.num_nodes is None else args.num_nodes
    if num_nodes < 1:
        raise UserError(f"--num-nodes {num_nodes}: must be at least 1")
    _, gpus_per_node = job.gpu_device_type(args.device_type)
    run = job.GpuJob(overrides=overrides, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
                     compile_cache_dir=args.compile_cache_dir, host_error_dir=args.error_dir)
    env = {**XPK_GPU_ENV, **job.gpu_runtime_env(args.grace_period)}
    return run, ["--device-type", args.device_type, "--num-nodes", str(num_nodes)], env


def xpk_argv(args: argparse.Namespace) -> list[str]:
    """`xpk workload create ...` without the executable and without --dry-run."""
    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    run, accelerator, env = (gpu_job if args.device_type else tpu_job)(args, overrides)
    env[secrets.REFS_ENV] = secrets.format_refs(
        {name: (args.secret, key) for name, key in job.SECRET_KEYS.items()})
    argv = ["workload", "create",
            "--cluster", args.cluster,
            "--workload", args.workload or time.strftime("clm-%m%d-%H%M%S"),
            *accelerator,
            "--docker-image", args.docker_image,
            "--command", run.command(),
            "--max-restarts", str(args.max_restarts),
            # xpk also restarts on 42 and 127-255 (signals: a host killed mid-step); exit 2
            # (config error) and 1 (a bug) fail the JobSet.
            "--restart-on-exit-codes", ",".join(map(str, job.RESTART_EXIT_CODES)),
            "--termination-grace-period-seconds", str(args.grace_period)]
    for name, value in env.items():
        argv += ["--env", f"{name}={value}"]
    for storage in args.storage:
        argv += ["--storage", storage]
    if args.project:
        argv += ["--project", args.project]
    if args.zone:
        argv += ["--zone", args.zone]
    return argv


def xpk_executable() -> str:
    xpk = shutil.which(os.environ.get(XPK_ENV) or "xpk")
    if not xpk:
        raise UserError(f"xpk not found ({XPK_ENV}={os.environ.get(XPK_ENV) or 'unset'}): `pip install xpk` "
                        f"(in its own venv: its pins conflict with clm's) and set {XPK_ENV}=/path/to/xpk or put it on PATH")
    return xpk


def launch(args: argparse.Namespace) -> int:
    argv = [xpk_executable(), *xpk_argv(args)]
    if not args.dry_run:
        print("$ " + shlex.join(argv), flush=True)
        return subprocess.run(argv).returncode
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "jobset.yaml")
        # xpk's own dry run: prints the kubectl/gcloud commands it would run, writes the JobSet.
        result = subprocess.run([*argv, "--dry-run", "--output-manifest-file", manifest],
                                capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(manifest):
            sys.stderr.write(result.stdout + result.stderr)
            raise UserError(f"xpk's dry run failed (exit {result.returncode}); its output is above")
        with open(manifest) as f:
            jobset = f.read()
    print("# xpk command\n" + shlex.join(["xpk", *argv[1:]]) + "\n# JobSet manifest\n" + jobset, end="")
    return 0
