"""Checkpoints through torch_xla's CheckpointManager (torch.distributed.checkpoint with SPMD
planners): every host reads only its own shards, local or gs://."""

from __future__ import annotations

import sys
import tempfile

import torch

from clm import storage
from clm.errors import UserError


def checkpoint_manager(path: str):
    """torch_xla's CheckpointManager for `path`, with the process group it needs."""
    import torch.distributed as dist
    import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// rendezvous)
    import torch_xla.runtime as xr
    from torch_xla.experimental.distributed_checkpoint import CheckpointManager

    if not dist.is_initialized():
        if xr.device_type() == "TPU":
            dist.init_process_group("gloo", init_method="xla://")
        else:
            # xla:// finds its peers through TPU metadata; elsewhere clm is one process.
            rendezvous = tempfile.NamedTemporaryFile(prefix="clm-rendezvous-", delete=False).name
            dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    # Saves happen only when asked (force=True); max_to_keep=0 never deletes anything;
    # preemption detection (TPU coordinator only) is for managers that save on their own.
    return CheckpointManager(path, save_interval=sys.maxsize, max_to_keep=0, chkpt_on_preemption=False)


def check_path(path: str) -> None:
    """Fail before anything is written or compiled when the checkpoint directory is missing."""
    if not storage.isdir(path):
        raise UserError(f"checkpoint_manager_path={path}: no such directory (local path or gs://bucket/prefix)")


def restore_model_weights(model: torch.nn.Module, path: str) -> int:
    """Load the model weights of the newest step under `path` into the sharded model, in place.

    This is the reference's `checkpoint_manager_path`: the starting weights (Mixtral-8x22B-v0.1
    converted once with CheckpointManager.save(0, {"model": state_dict})). Returns the step.
    """
    manager = checkpoint_manager(path)
    steps = manager.all_steps()
    if not steps:
        raise UserError(
            f"checkpoint_manager_path={path}: no CheckpointManager checkpoint in it "
            "(expected numbered step directories with a .metadata file)"
        )
    state = {"model": model.state_dict()}
    manager.restore(steps[-1], state)
    model.load_state_dict(state["model"])
    return steps[-1]
