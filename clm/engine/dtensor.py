"""The DTensor engine: standard PyTorch distributed, one process per device.

Launch: `torchrun --nproc-per-node N run_clm.py backend=dtensor ...` (one process per device;
without torchrun, one process). The device is torch's accelerator where there is one: CUDA, or
TorchTPU's `tpu` (torch_tpu, which torch loads as a device backend when it is installed); else
the CPU. Process group: gloo on CPU; on an accelerator its collective backend (nccl, TorchTPU's
tpu_dist) for the devices with gloo beside it for CPU tensors (the stop agreement, checkpoint
planning). Mesh: a DeviceMesh of the config's shape (dcn x fsdp x expert x tensor, as
clm.parallel.mesh_shape computes it). TorchTPU is untested here (it needs a TPU): what it uses is
this device choice, PROCESS_GROUP_BACKENDS and torch's generic device module for RNG state.

The model is transformers' model of the plan on the meta device, then FSDP2 (`fully_shard`)
on each decoder layer and on the root over the data axes (HSDP when dcn > 1: replicated over
dcn, sharded over fsdp), then materialised empty on the device and filled one parameter at a
time: clm's mesh-independent random init (clm.model.init: the same values as on XLA, each
process keeping its shard) or the pretrained weights (each process reading only its slice).
model.compute_dtype is FSDP2's MixedPrecisionPolicy (Megatron's scheme: parameters, gradient
reduction and optimizer in model.dtype, forward and backward in the compute dtype).
The MoE layers run clm's capacity experts (clm.model.moe), plain PyTorch on the gathered
weights inside FSDP's forward; dropless is the static path with C = S.

Execution is eager: a step is launched as it is written, `cut` has nothing to do, and no step
waits for the host except a log step's values, which are copied to the host without blocking
(CUDA: into pinned memory behind an event) and read on the run log's thread. Each process
computes the loss terms of its own rows and `FullyShardedModel` reduces them over the data
axes inside the step (all-reduces, no host sync), so every logged value is the global batch's,
as XLA's one program computes it.

Not built yet here (each refused in one line by `check`): tensor and expert parallelism
(parallelize_module from the rule tables; expert all-to-all), activation checkpointing,
torch_xla's initial-weights checkpoints, asynchronous checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from clm import checkpoint, runtime
from clm.config import XLA_ADAMW
from clm.engine.backend import DTENSOR
from clm.errors import UserError
from clm.model import init, moe
from clm.model.build import ShardedModel, cast_parameters
from clm.model.config import meta_model
from clm.optim import prime_optimizer
from clm.parallel.mesh import AXES
from clm.parallel.sharding import model_tensors

# The collective backend of each accelerator's device type (CPU tensors go through gloo). "tpu_dist"
# is the name torch_tpu 0.2.0 registers for its `tpu` device (torch_tpu/_loader.py).
PROCESS_GROUP_BACKENDS = {"cuda": "nccl", "tpu": "tpu_dist"}


def accelerator() -> str | None:
    """The device type of this host's accelerator: 'cuda', 'tpu' (TorchTPU), ...; None on a CPU."""
    found = torch.accelerator.current_accelerator(check_available=True)
    return None if found is None else found.type


def process_group_backend(device_type: str) -> str:
    """init_process_group's backend for a process whose device is of `device_type`."""
    if device_type == "cpu":
        return "gloo"
    return f"cpu:gloo,{device_type}:{PROCESS_GROUP_BACKENDS[device_type]}"


class DTensorEngine:
    name = DTENSOR

    def __init__(self):
        self.device: torch.device | None = None  # this process's device, set by setup
        self.mesh = None  # the DeviceMesh of the run's shape, set by build_model
        self._rows: ThreadPoolExecutor | None = None  # run_async's thread
        self._queued: list[Future] = []

    # ---- the devices
    def device_count(self) -> int:
        """One device per process: the processes torchrun started (WORLD_SIZE), else 1."""
        return int(os.environ.get("WORLD_SIZE", "1"))

    def num_slices(self) -> int:
        return 1  # nothing reports slices here: a dcn axis is num_slices=N

    def device_type(self) -> str:
        return (accelerator() or "cpu").upper()

    def device_kind(self) -> str:
        return self.device_type()  # no peak FLOP/s table for these devices: MFU is n/a

    def check(self, model_plan) -> None:
        cfg, shape = model_plan.cfg, model_plan.mesh_shape
        not_built = [
            ("tensor_parallelism", shape.tensor, shape.tensor > 1, "tensor_parallelism=1"),
            ("expert_parallelism", shape.expert, shape.expert > 1, "expert_parallelism=1"),
            ("model.fsdp_config.xla_fsdp_grad_ckpt", "true", cfg.model.fsdp_config.xla_fsdp_grad_ckpt,
             "model.fsdp_config.xla_fsdp_grad_ckpt=false"),
            ("checkpoint_manager_path", cfg.checkpoint_manager_path, bool(cfg.checkpoint_manager_path),
             "model.name_or_path (hub-layout weights)"),
            ("async_checkpoint", "true", cfg.async_checkpoint, "async_checkpoint=false"),
        ]
        for knob, value, refused, instead in not_built:
            if refused:
                raise UserError(f"{knob}={value}: not built yet on backend=dtensor; use backend=xla or {instead}")

    # ---- build
    def setup(self, cfg) -> None:
        device_type = accelerator()
        if device_type is not None:
            self.device = torch.device(device_type, int(os.environ.get("LOCAL_RANK", "0")))
            torch.accelerator.set_device_index(self.device.index)
        else:
            self.device = torch.device("cpu")
        if device_type == "cuda":
            # XLA's default on TPU is reduced-precision fp32 matmuls; full_precision asks for fp32.
            torch.backends.cuda.matmul.allow_tf32 = not cfg.full_precision
        if dist.is_initialized():
            return
        # CPU tensors (the stop agreement, checkpoint planning) through gloo, the device's through its own.
        backend, device_id = process_group_backend(self.device.type), (None if device_type is None else self.device)
        with runtime.quiet_native_stdout():  # gloo prints a line per group to stdout from C++
            if "RANK" in os.environ:  # torchrun's rendezvous (env://)
                dist.init_process_group(backend, device_id=device_id)
            else:  # one process: an in-memory store, so no rendezvous file is left behind
                dist.init_process_group(backend, device_id=device_id, store=dist.HashStore(), rank=0, world_size=1)

    def process_index(self) -> int:
        return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))

    def process_count(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else self.device_count()

    def build_model(self, model_plan) -> FullyShardedModel:
        from transformers.modeling_layers import GradientCheckpointingLayer

        cfg, shape = model_plan.cfg, model_plan.mesh_shape
        with runtime.quiet_native_stdout():
            self.mesh = init_device_mesh(self.device.type, tuple(shape.sizes.values()), mesh_dim_names=AXES)
        # FSDP over the data axes: sharded over fsdp, replicated over dcn (HSDP) when there are slices.
        data_mesh = self.mesh["dcn", "fsdp"] if shape.dcn > 1 else self.mesh["fsdp"]

        module = meta_model(model_plan.hf_config)  # its own, as on XLA: the plan's stays a description
        module.set_attn_implementation(model_plan.attention.implementation)
        cast_parameters(module, getattr(torch, cfg.model.dtype))
        # One FSDP unit per decoder layer (its weights gathered for its forward and backward
        # only), and the root for the rest (embeddings, final norm, head).
        fsdp = {"mesh": data_mesh, "mp_policy": mixed_precision(cfg.model.dtype, cfg.model.compute_dtype)}
        for layer in [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]:
            fully_shard(layer, **fsdp)
        fully_shard(module, **fsdp)
        module.to_empty(device=self.device)

        init.initialize_buffers(module, put)
        if model_plan.checkpoint is not None:
            load_pretrained(module, model_plan.checkpoint)
        else:
            init.initialize_parameters(module, cfg.seed, put)
        routing = moe.Routing(module, model_plan.capacity_factor) if model_plan.is_moe else None
        return FullyShardedModel(module, self.mesh, shape, routing, model_plan.attention,
                                 model_plan.router_bias_update_rate)

    def load_weights(self, model, path: str) -> None:
        raise AssertionError("check() refuses checkpoint_manager_path on backend=dtensor")

    def optimizer_class(self, name: str) -> type:
        # torch_xla's syncfree AdamW is torch's AdamW without the host sync on an inf check: on
        # an eager engine, torch's own.
        return torch.optim.AdamW if name == XLA_ADAMW else getattr(torch.optim, name)

    def prime_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        prime_optimizer(optimizer)

    def rng_state(self) -> RNGState:
        return RNGState(self.device)

    def checkpointer(self, cfg, model: ShardedModel, optimizer, host_state: dict,
                     before_save) -> checkpoint.DistributedCheckpointer:
        return checkpoint.DistributedCheckpointer(cfg, model.module, optimizer, host_state,
                                                  process_index=self.process_index(), before_save=before_save)

    # ---- steps
    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows, on its device (asynchronously from pinned memory on CUDA)."""
        tensors = [torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["labels"]).long()]
        if self.device.type == "cuda":
            tensors = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        return tensors[0], tensors[1]

    def cut(self) -> None:
        """Eager: every operation was launched as the trainer called it."""

    def run_async(self, fn, *args) -> None:
        """fn(*args) on this engine's one thread, in order. A device tensor in `args` starts its
        copy to pinned host memory here without blocking; the thread waits for that copy (an
        event), so the caller never waits for the device."""
        if self._rows is None:
            self._rows = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clm-rows")
        copies, ready = [], None
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.device.type == "cuda":
                host = torch.empty(arg.shape, dtype=arg.dtype, pin_memory=True)
                host.copy_(arg, non_blocking=True)
                copies.append(host)
            else:
                copies.append(arg)
        if any(isinstance(arg, torch.Tensor) and arg.device.type == "cuda" for arg in args):
            ready = torch.cuda.Event()
            ready.record()  # after the copies: fn reads them once the device has done them

        def run():
            if ready is not None:
                ready.synchronize()
            fn(*copies)

        # Done rows need no wait; a failed one stays until wait_for_async re-raises its error.
        self._queued = [f for f in self._queued if not f.done() or f.exception() is not None]
        self._queued.append(self._rows.submit(run))

    def wait_for_async(self) -> None:
        queued, self._queued = self._queued, []
        for future in queued:
            error = future.exception()  # waits
            if error is not None:
                raise RuntimeError("a logging step closure failed") from error

    def compile_count(self) -> int:
        return 0  # nothing is compiled (no torch.compile yet)

    def compile_analysis_file(self) -> str | None:
        return None

    @contextlib.contextmanager
    def profile(self, run_dir: str):
        """torch.profiler into run_dir/profile (TensorBoard's trace format)."""
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities,
                     on_trace_ready=tensorboard_trace_handler(os.path.join(run_dir, "profile"))):
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # the trace must cover the device's execution, not just its launch


# ------------------------------------------------------------------------------ the model


def mixed_precision(dtype: str, compute_dtype: str | None) -> MixedPrecisionPolicy:
    """model.compute_dtype: FSDP gathers the parameters (kept in model.dtype) in the compute
    dtype for the forward and backward and reduces the gradients in model.dtype (Megatron's
    scheme with float32 and bfloat16); null computes in model.dtype."""
    if compute_dtype is None or compute_dtype == dtype:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=getattr(torch, compute_dtype), reduce_dtype=getattr(torch, dtype))


@torch.no_grad()
def put(name: str, tensor: torch.Tensor, host: torch.Tensor) -> None:
    """Fill a model tensor from the host's full values: a DTensor keeps only this process's
    shard (taken locally: every process computed the same values, so nothing is sent)."""
    if isinstance(tensor, DTensor):
        shard = distribute_tensor(host.to(tensor.dtype), tensor.device_mesh, tensor.placements, src_data_rank=None)
        tensor.to_local().copy_(shard.to_local())
    else:
        tensor.copy_(host)


@torch.no_grad()
def load_pretrained(module: torch.nn.Module, hub_checkpoint) -> None:
    """The pretrained weights (clm.model.weights.HubCheckpoint), each process reading only the
    slice of each tensor its shard holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    recipes = hub_checkpoint.sources(module)
    for name, tensor in model_tensors(module).items():
        if isinstance(tensor, DTensor):
            shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
            index = tuple(slice(start, start + size) for start, size in zip(offset, shape))
            tensor.to_local().copy_(recipes[name].read(index))
        else:
            tensor.copy_(recipes[name].full())


class FullyShardedModel(ShardedModel):
    """The ShardedModel of the DTensor engine: each process runs its own rows, and the terms the
    trainer reads are reduced over the data axes inside the step, so that they are the global
    batch's, as on XLA:

    - the loss sum and the token counts are summed over processes; the loss sum through
      autograd, whose backward sums the processes' (equal) upstream gradients, so that with
      FSDP's averaging each parameter's gradient is that of the global token-weighted loss;
    - the expert loads (routing metrics, the correction-bias update) are gathered, so every
      process sees every sequence's and updates its correction biases alike;
    - the load-balancing loss is the family's function of this process's rows, averaged over
      the processes. XLA computes it once over the pooled global batch; the per-process
      product of means differs from the global one by the rows' routing differences
      (Megatron computes it per micro-batch too). The next slice can pool the fractions.
    """

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = super().__call__(input_ids)
        if self.routing is not None:
            for layer in self.routing.layers:
                layer.expert_load = _gather_rows(layer.expert_load)
        return logits

    def loss_terms(self, input_ids, labels, ignore_index):
        from torch.distributed.nn.functional import all_reduce

        terms = super().loss_terms(input_ids, labels, ignore_index)
        processes = dist.get_world_size()
        if processes == 1:
            return terms
        losses = all_reduce(torch.stack([terms.loss_sum, terms.aux_loss.to(terms.loss_sum.dtype)]))
        terms.loss_sum, terms.aux_loss = losses[0], losses[1] / processes
        counts = torch.stack([terms.num_scored, terms.num_inputs])
        dist.all_reduce(counts)
        terms.num_scored, terms.num_inputs = counts[0], counts[1]
        return terms

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = super().clip_grad_norm(max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `tensor`, in process order (as XLA's global batch holds them)."""
    if dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class RNGState:
    """Every random generator a step could use: Python, NumPy, torch's CPU one and this process's device's."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.device.type != "cpu":  # torch.cuda, or TorchTPU's torch.tpu
            state[self.device.type] = torch.get_device_module(self.device.type).get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if self.device.type != "cpu":
            torch.get_device_module(self.device.type).set_rng_state(state[self.device.type], self.device)

