"""Engines: how a run reaches its devices. The trainer is written once, against `Engine`.

One module per engine implements it:

- clm.engine.xla: PyTorch/XLA SPMD (torch_xla 2.9, frozen). One process per host drives all
  of its devices; the step is traced lazily and compiled as one program over the whole mesh;
  parameters are sharded by the rule tables (clm.parallel, clm.model.build).
- clm.engine.dtensor: standard PyTorch distributed. One process per device (torchrun);
  a DeviceMesh of the same shape; FSDP2 (`fully_shard`) over the data axes; eager execution;
  torch.distributed.checkpoint for checkpoints. CPU (gloo), CUDA (nccl) and TorchTPU alike.

The `backend` knob picks one (clm.engine.backend; `auto` is resolved when the config loads);
`build_engine` builds it. Everything above the engines (trainer, model, data, optimizer, schedules,
run log) is plain PyTorch and the same for both: this package, clm.runtime, clm.parallel,
clm.checkpoint and the model's XLA kernel modules are where torch_xla and
torch.distributed.tensor may be imported (tests/test_imports.py checks it).

This module stays light: the config imports clm.engine.backend, which loads it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Callable, Protocol

from clm.engine.backend import DTENSOR, XLA

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from clm.checkpoint import Checkpointer
    from clm.model.build import ShardedModel
    from clm.model.plan import ModelPlan


class Engine(Protocol):
    """What the trainer asks of an engine, in the order a run asks it."""

    name: str

    # ---- before the config's checks: the devices
    def device_count(self) -> int:
        """Devices of the whole job (the mesh's size)."""

    def num_slices(self) -> int:
        """Slices of a multislice job as the runtime reports them (num_slices=-1)."""

    def device_type(self) -> str:
        """'TPU', 'CPU', 'CUDA', ...: what the memory planner checks against."""

    def device_kind(self) -> str:
        """The chip ('v5p', ...) for MFU and MLPerf's platform; else the device type."""

    def check(self, model_plan: ModelPlan) -> None:
        """What this engine cannot run of a checked plan: one UserError line naming the knob."""

    # ---- build
    def setup(self, cfg: DictConfig) -> None:
        """Processes and devices, before anything is built (once per process)."""

    def process_index(self) -> int:
        """This process's index: process 0 writes the logs."""

    def process_count(self) -> int: ...

    def data_shard(self) -> tuple[int, int]:
        """(index, count) of this process among those that read distinct rows, after build_model
        (processes that differ only in their tensor-parallel rank read the same rows)."""

    def build_model(self, model_plan: ModelPlan) -> ShardedModel:
        """The plan's model on its mesh, sharded and filled (random init or pretrained)."""

    def load_weights(self, model: ShardedModel, path: str) -> None:
        """checkpoint_manager_path: starting weights from a checkpoint directory, in place."""

    def optimizer_class(self, name: str) -> type:
        """The optimizer class of the `optimizer` knob on this engine."""

    def prime_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimizer step with zero gradients (the reference's prime_optimizer; clm.optim)."""

    def rng_state(self) -> object:
        """Every random generator a step could use, as an object with state_dict/load_state_dict."""

    def checkpointer(self, cfg: DictConfig, model: ShardedModel, optimizer: torch.optim.Optimizer,
                     host_state: dict, before_save: Callable[[], None]) -> Checkpointer: ...

    # ---- steps
    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows (host arrays) -> (input_ids, labels) where the model reads them."""

    def cut(self) -> None:
        """The end of a unit of device work (a micro-batch, a step, an eval batch): XLA compiles
        and launches what was traced; an eager engine has launched it already."""

    def run_async(self, fn: Callable, *args) -> None:
        """fn(*args) on a thread of the engine's, after everything queued before; tensors in args
        are the step's device values, which fn reads there (the host never waits on them here)."""

    def wait_for_async(self) -> None:
        """Block until everything queued with run_async has run; re-raise its error."""

    def compile_count(self) -> int:
        """Compilations so far (0 where nothing compiles)."""

    def compile_analysis_file(self) -> str | None:
        """Where the causes of compilations are written, if anywhere (clm.observe.recompiles)."""

    def profile(self, run_dir: str) -> AbstractContextManager:
        """Record what runs inside (one train step) into run_dir/profile."""


def device_count(backend: str) -> int:
    """The device count of a resolved backend, for clm.config.load_config (before the config exists)."""
    return build_engine(backend).device_count()


def build_engine(backend: str) -> Engine:
    """The engine of a resolved `backend` knob (cfg.backend: xla or dtensor)."""
    if backend == XLA:
        from clm.engine.xla import XlaEngine

        return XlaEngine()
    if backend == DTENSOR:
        from clm.engine.dtensor import DTensorEngine

        return DTensorEngine()
    raise ValueError(f"backend {backend!r} is not resolved (clm.engine.backend.resolve)")
