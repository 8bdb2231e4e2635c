"""What every launch of clm shares, whichever tool submits it (xpk, Helm, docker run)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from clm import tpu
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


@dataclass
class Job:
    """One training run on N slices: the same command and resolved config on every host."""

    overrides: list[str]
    num_slices: int = 1
    compile_cache_dir: str | None = None  # shared across hosts and launches, e.g. a GCS FUSE path
    host_error_dir: str | None = None  # shared: a failing host's error reaches process 0

    def hydra_overrides(self) -> list[str]:
        extra = {"num_slices": self.num_slices, "local_compile_cache_dir": self.compile_cache_dir}
        # An override the user gives wins (Hydra rejects the same key twice).
        given = {override.split("=", 1)[0].lstrip("+~") for override in self.overrides}
        return [f"{key}={value}" for key, value in extra.items() if value is not None and key not in given] \
            + list(self.overrides)

    def argv(self) -> list[str]:
        wrapper = ["python", "-m", "clm.launch.host"]
        if self.host_error_dir:
            wrapper += ["--error-dir", self.host_error_dir]
        return wrapper + ["--", "python", "run_clm.py", *self.hydra_overrides()]

    def command(self) -> str:
        return shlex.join(self.argv())
