"""What every launch of clm shares, whichever tool submits it (xpk, Helm, kubectl, docker run)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from clm import gpu, tpu
from clm.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError

# Retried by JobSet: a preempted run that saved a complete checkpoint. Never retried:
# EXIT_USER_ERROR (a bad config stays bad) and any other failure (a bug).
RESTART_EXIT_CODES = (EXIT_PREEMPTED,)
NEVER_RESTART_EXIT_CODES = (EXIT_USER_ERROR,)

# Secrets the job may need, passed as Kubernetes Secret references, never as values:
# environment variable -> key in the Secret (one Secret, default name below).
SECRET_KEYS = {"HF_TOKEN": "hf-token", "WANDB_API_KEY": "wandb-api-key"}
DEFAULT_SECRET_NAME = "clm-secrets"

# Async collectives that overlap the FSDP all-gathers / reduce-scatters with compute
# (the flags torchprime and MaxText use on these generations).
_ASYNC_COLLECTIVES = (
    "--xla_tpu_enable_async_collective_fusion=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
    "--xla_tpu_overlap_compute_collective_tc=true "
    "--xla_enable_async_all_gather=true")
# Generations with one TensorCore per chip (v5e, v6e) gain from fusing data-parallel all-reduces.
_DATA_PARALLEL_ALL_REDUCE = (
    " --xla_tpu_enable_data_parallel_all_reduce_opt=true"
    " --xla_tpu_data_parallel_opt_different_sized_ops=true")
LIBTPU_INIT_ARGS = {name: _ASYNC_COLLECTIVES + (_DATA_PARALLEL_ALL_REDUCE if generation.cores_per_chip == 1 else "")
                    for name, generation in tpu.GENERATIONS.items()}


def tpu_generation(tpu_type: str) -> str:
    """'v5p' for 'v5p-512', 'v5e' for 'v5litepod-256' (clm.tpu's table); a UserError for anything else."""
    parsed = tpu.parse_accelerator_type(tpu_type)
    if parsed is None:
        raise UserError(f"--tpu-type {tpu_type!r}: expected GENERATION-SIZE with generation one of "
                        f"{tpu.names()} (e.g. v5p-512, v4-8, v5litepod-256, v6e-256)")
    return parsed[0].name


def runtime_env(tpu_type: str) -> dict[str, str]:
    """The environment every TPU host needs (multislice topology comes from GKE/JobSet)."""
    return {
        "PJRT_DEVICE": "TPU",
        "LIBTPU_INIT_ARGS": LIBTPU_INIT_ARGS[tpu_generation(tpu_type)],
        # Python scalars must not become graph constants (see clm.runtime.device_count).
        "XLA_NO_SPECIAL_SCALARS": "1",
    }


def gpu_accelerator(gpu_type: str) -> gpu.Accelerator:
    """clm.gpu's row for `gpu_type` ('h100-80gb'); a UserError for anything else."""
    found = gpu.accelerator(gpu_type)
    if found is None:
        raise UserError(f"--gpu-type {gpu_type!r}: expected one of {gpu.names()}")
    return found


def gpu_device_type(device_type: str) -> tuple[gpu.Accelerator, int]:
    """(accelerator, GPUs per node) of an xpk GPU device type ('h100-80gb-8'); a UserError for
    anything else."""
    parsed = gpu.parse_device_type(device_type)
    if parsed is None:
        raise UserError(f"--device-type {device_type!r}: expected GPU-COUNT with GPU one of {gpu.names()} "
                        f"and COUNT the GPUs per node (e.g. h100-80gb-8, h200-141gb-8, b200-8)")
    return parsed


# torchrun reads every option it is not given from PET_<OPTION> (torch.distributed.argparse_util.env).
# The node rank and the rendezvous host differ from pod to pod, so they come from each pod's
# environment and every pod runs the same command; the port is torchrun's default, 29500.
NODE_RANK_ENV = "PET_NODE_RANK"
MASTER_ADDR_ENV = "PET_MASTER_ADDR"
# After it passes SIGTERM on to its workers torchrun SIGKILLs them in 30 s unless this says
# otherwise (torch >= 2.12; older versions ignore it); a preempted worker's checkpoint may need
# the pod's whole termination grace period.
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def gpu_runtime_env(grace_period: int) -> dict[str, str]:
    """The environment every GPU node needs besides its node rank and rendezvous host."""
    return {SHUTDOWN_TIMEOUT_ENV: str(grace_period)}


@dataclass
class Job:
    """One training run on N TPU slices: the same command and resolved config on every host."""

    overrides: list[str]
    num_slices: int = 1
    compile_cache_dir: str | None = None  # shared across hosts and launches, e.g. a GCS FUSE path
    host_error_dir: str | None = None  # shared: a failing host's error reaches process 0

    def launch_overrides(self) -> dict[str, object]:
        """The overrides the launch sets (None: not set)."""
        return {"num_slices": self.num_slices, "local_compile_cache_dir": self.compile_cache_dir}

    def program(self) -> list[str]:
        """What runs run_clm.py on each host: one trainer process per TPU host."""
        return ["python"]

    def hydra_overrides(self) -> list[str]:
        extra = self.launch_overrides()
        # An override the user gives wins (Hydra rejects the same key twice).
        given = {override.split("=", 1)[0].lstrip("+~") for override in self.overrides}
        return [f"{key}={value}" for key, value in extra.items() if value is not None and key not in given] \
            + list(self.overrides)

    def argv(self) -> list[str]:
        wrapper = ["python", "-m", "clm.launch.host"]
        if self.host_error_dir:
            wrapper += ["--error-dir", self.host_error_dir]
        return wrapper + ["--", *self.program(), "run_clm.py", *self.hydra_overrides()]

    def command(self) -> str:
        return shlex.join(self.argv())


@dataclass
class GpuJob(Job):
    """One training run on N GPU nodes (num_slices is TPU's and unused): one pod per node runs
    torchrun, which starts one trainer process per GPU, on the DTensor backend and NCCL."""

    num_nodes: int = 1
    gpus_per_node: int = 8

    def launch_overrides(self) -> dict[str, object]:
        return {"backend": "dtensor", "local_compile_cache_dir": self.compile_cache_dir}

    def program(self) -> list[str]:
        # --nnodes fixed (no elastic range): every node must join or none starts.
        return ["torchrun", "--nnodes", str(self.num_nodes), "--nproc-per-node", str(self.gpus_per_node)]
