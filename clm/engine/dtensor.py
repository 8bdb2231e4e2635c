"""The DTensor engine: standard PyTorch distributed, one process per device.

Launch: `torchrun --nproc-per-node N run_clm.py backend=dtensor ...` (one process per device;
without torchrun, one process). The device is torch's accelerator where there is one: CUDA, or
TorchTPU's `tpu` (torch_tpu, which torch loads as a device backend when it is installed); else
the CPU. Process group: gloo on CPU; on an accelerator its collective backend (nccl, TorchTPU's
tpu_dist) for the devices with gloo beside it for CPU tensors (the stop agreement, checkpoint
planning). Mesh: a DeviceMesh of the config's shape (dcn x fsdp x expert x tensor, as
clm.parallel.mesh_shape computes it). TorchTPU is untested here (it needs a TPU): what it uses is
this device choice, PROCESS_GROUP_BACKENDS and torch's generic device module for RNG state.

The model is transformers' model of the plan on the meta device, then, in torchtitan's order:
tensor parallelism over the `tensor` axis (parallelize_module, its styles read from the rule
table: `tensor_parallel_plan`), activation checkpointing per decoder layer, torch.compile per
decoder layer (`compile=true`), and FSDP2 (`fully_shard`) on each decoder layer and on the root
over the data axes (HSDP when dcn > 1: replicated over dcn, sharded over fsdp); then it is
materialised empty on the device and filled one parameter at a time: clm's mesh-independent
random init (clm.model.init: the same values as on XLA, each process keeping its shard) or
the pretrained weights (each process reading only its slice).
model.compute_dtype is FSDP2's MixedPrecisionPolicy (Megatron's scheme: parameters, gradient
reduction and optimizer in model.dtype, forward and backward in the compute dtype).
The MoE layers run clm's capacity experts (clm.model.moe), plain PyTorch on the gathered
weights inside FSDP's forward. Dropless is transformers' `grouped_mm` experts where torch has a
grouped GEMM for the device and the experts are whole on each process (`grouped_mm_dropless`),
else the static path with C = S. Expert parallelism (`apply_expert_parallel`, torchtitan's
design): expert weights Shard(0) over the `expert` axis (and FSDP over fsdp on another dim), the
[B, E, C, H] buffer of each process's own rows moved to the experts' processes and back by
all-to-all (`ExpertParallel`), so capacity stays per sequence exactly as on XLA; the batch is
split over fsdp x expert as on XLA, and the other weights are FSDP over that product.

Execution is eager: a step is launched as it is written, `cut` has nothing to do, and no step
waits for the host except a log step's values, which are copied to the host without blocking
(CUDA: into pinned memory behind an event) and read on the run log's thread. Each process
computes the loss terms of its own rows (the processes of a tensor group share theirs) and
`FullyShardedModel` reduces them over the data processes inside the step (all-reduces, no
host sync), so every logged value is the global batch's, as XLA's one program computes it.

Not built yet here (each refused in one line by `check`): tensor and expert parallelism
together, torch_xla's initial-weights checkpoints, asynchronous checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from clm import checkpoint, gpu, runtime
from clm.config import XLA_ADAMW
from clm.engine.backend import DTENSOR
from clm.errors import UserError
from clm.model import init, moe
from clm.model.build import ShardedModel, cast_parameters, checkpoint_layers
from clm.model.config import meta_model
from clm.optim import prime_optimizer
from clm.parallel.mesh import AXES, axes_of
from clm.parallel.sharding import model_tensors, tied_aliases

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
        self.row_mesh = None  # its processes that read distinct rows, flattened; set by build_model
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
        """The GPU's kind in clm.gpu's table ('h100'), for MFU and MLPerf's platform; else the
        device type (a CPU, a GPU without a row there: MFU is n/a)."""
        if torch.cuda.is_available():
            found = gpu.chip_of_device(torch.cuda.get_device_name(int(os.environ.get("LOCAL_RANK", "0"))))
            if found is not None:
                return found.name
        return self.device_type()

    def check(self, model_plan) -> None:
        cfg, shape = model_plan.cfg, model_plan.mesh_shape
        not_built = [
            ("checkpoint_manager_path", cfg.checkpoint_manager_path, bool(cfg.checkpoint_manager_path),
             "model.name_or_path (hub-layout weights)"),
            ("async_checkpoint", "true", cfg.async_checkpoint, "async_checkpoint=false"),
        ]
        for knob, value, refused, instead in not_built:
            if refused:
                raise UserError(f"{knob}={value}: not built yet on backend=dtensor; use backend=xla or {instead}")
        if shape.tensor > 1 and shape.expert > 1:
            raise UserError(f"tensor_parallelism={shape.tensor} with expert_parallelism={shape.expert}: not built "
                            "together yet on backend=dtensor; use backend=xla or set one of them to 1")
        if shape.tensor > 1:
            tensor_parallel_plan(model_plan.meta_model, model_plan.shardings, shape.tensor)  # its UserError, if any

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
        # FSDP over the data axes: sharded over fsdp (x expert, which splits the batch too), replicated
        # over dcn (HSDP) when there are slices.
        if shape.expert == 1:
            data_mesh = self.mesh["dcn", "fsdp"] if shape.dcn > 1 else self.mesh["fsdp"]
        else:
            flat = self.mesh["fsdp", "expert"]._flatten("fsdp_expert")
            # newer torch warns on slicing a flattened dim from the root mesh: kept only where
            # HSDP needs the 2-D (dcn, fsdp_expert) mesh
            data_mesh = self.mesh["dcn", "fsdp_expert"] if shape.dcn > 1 else flat
        # The processes that read distinct rows (every axis but tensor), as one dimension.
        self.row_mesh = self.mesh[tuple(axis for axis in AXES if axis != "tensor")]._flatten("rows")

        module = meta_model(model_plan.hf_config)  # its own, as on XLA: the plan's stays a description
        module.set_attn_implementation(model_plan.attention.implementation)
        cast_parameters(module, getattr(torch, cfg.model.dtype))
        layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
        # torchtitan's order: tensor parallelism, activation checkpointing, compile, then FSDP.
        if shape.tensor > 1:
            apply_tensor_parallel(module, self.mesh["tensor"],
                                  tensor_parallel_plan(module, model_plan.shardings, shape.tensor))
        if cfg.model.fsdp_config.xla_fsdp_grad_ckpt:
            apply_activation_checkpointing(module, cfg.model.fsdp_config.fsdp_transformer_layer_cls_to_wrap)
        if cfg.compile:
            apply_compile(layers, cfg.compile_backend)
        # One FSDP unit per decoder layer (its weights gathered for its forward and backward
        # only), and the root for the rest (embeddings, final norm, head).
        fsdp = {"mesh": data_mesh, "mp_policy": mixed_precision(cfg.model.dtype, cfg.model.compute_dtype)}
        if shape.expert > 1:
            apply_expert_parallel(module, self.mesh, fsdp["mp_policy"])
        for layer in layers:
            fully_shard(layer, **fsdp)
        fully_shard(module, **fsdp)
        module.to_empty(device=self.device)

        init.initialize_buffers(module, put)
        if model_plan.checkpoint is not None:
            load_pretrained(module, model_plan.checkpoint)
        else:
            init.initialize_parameters(module, cfg.seed, put)
        routing = None
        if model_plan.is_moe:
            dropless = grouped_mm_dropless(self.device, model_plan.capacity_factor, shape.expert)
            pool = partial(_mean_over_processes, group=self.row_mesh.get_group())
            routing = moe.Routing(module, model_plan.capacity_factor, dropless=dropless, pool=pool)
            if shape.expert > 1:
                for layer in routing.layers:
                    layer.run_experts = ExpertParallel(self.mesh["expert"].get_group())
        return FullyShardedModel(module, self.mesh, shape, routing, model_plan.attention,
                                 model_plan.router_bias_update_rate, data_group=self.row_mesh.get_group())

    def data_shard(self) -> tuple[int, int]:
        return self.row_mesh.get_local_rank(), self.row_mesh.size()

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
                     before_save) -> checkpoint.DTensorCheckpointer:
        return checkpoint.DTensorCheckpointer(cfg, model.module, optimizer, host_state,
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
        return 0  # XLA graphs: none (torch.compile's are not counted)

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


def tensor_parallel_plan(module: torch.nn.Module, shardings, tensor: int) -> dict:
    """parallelize_module's plan {module path: style}, read from the rule table (the plan's
    `shardings`, which XLA places from): a Linear whose weight [out, in] the table splits over
    `tensor` on out is colwise, on in rowwise (q/k/v and o, gate/up and down, lm_head); an
    Embedding [V, H] split on H is colwise, on V rowwise (vocab-parallel). Colwise outputs stay
    local (a head's shard of q/k/v feeds its own attention), except the output embeddings' and
    the input embeddings', which are gathered (the loss and the residual stream are whole).

    Expert weights ([E, 2I, H] / [E, H, I], which the tables split on the intermediate dim) are
    not split over `tensor` here: the fused gate/up rows of a tensor rank would be all gate or
    all up, so the expert MLP could not run locally. Each tensor rank runs every expert of its
    rows on weights FSDP shards over the data axes. Any other tensor split has no style here
    and is refused in one line.
    """
    modules = dict(module.named_modules())
    gathered = {module.get_input_embeddings(), module.get_output_embeddings()}
    plan = {}
    for entry in shardings:
        dims = [d for d, axes in enumerate(entry.spec) if "tensor" in axes_of(axes)]
        if not dims:
            continue
        path, _, attr = entry.name.rpartition(".")
        owner = modules[path]
        if moe.is_experts(owner):
            continue  # see the docstring
        if attr == "weight" and dims in ([0], [1]) and isinstance(owner, (nn.Linear, nn.Embedding)):
            colwise = dims == [0 if isinstance(owner, nn.Linear) else 1]
            if colwise:
                plan[path] = ColwiseParallel(output_layouts=Replicate()) if owner in gathered else ColwiseParallel()
            else:
                plan[path] = RowwiseParallel(input_layouts=Replicate()) if owner in gathered else RowwiseParallel()
            continue
        raise UserError(f"tensor_parallelism={tensor}: sharding rule '{entry.rule}' splits '{entry.name}' "
                        f"({type(owner).__name__}) over tensor, which backend=dtensor has no tensor-parallel style "
                        "for (Linear and Embedding weights only); use tensor_parallelism=1 or backend=xla")
    if tied_aliases(module):  # one weight, which the two styles would split on different dimensions
        raise UserError(f"tensor_parallelism={tensor}: {module.config.model_type} ties its input and output "
                        "embeddings, which backend=dtensor does not split over tensor; use tensor_parallelism=1 "
                        "or backend=xla")
    return plan


def apply_tensor_parallel(module: torch.nn.Module, mesh, plan: dict) -> None:
    """Megatron's tensor parallelism over the `tensor` mesh (torch's parallelize_module), before
    FSDP: the weights become DTensors split over tensor, which fully_shard then also shards
    over the data axes."""
    parallelize_module(module, mesh, plan)


def apply_activation_checkpointing(module: torch.nn.Module, class_names) -> None:
    """model.fsdp_config.xla_fsdp_grad_ckpt: recompute the decoder layers of the named classes in
    the backward pass (torch's non-reentrant checkpoint through transformers' hook). Non-reentrant:
    the router logits recorded inside a layer carry the graph, so the load-balancing loss trains."""
    checkpoint_layers(module, class_names, partial(torch.utils.checkpoint.checkpoint, use_reentrant=False))


def apply_compile(layers: list[torch.nn.Module], backend: str) -> None:
    """compile=true: torch.compile per decoder layer, as torchtitan (FSDP's hooks, added after,
    run eagerly: torch.compile skips them)."""
    for layer in layers:
        layer.compile(backend=backend)


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
    - the load-balancing loss is pooled: its per-expert fractions are averaged over the
      processes (moe.Routing's `pool`) before their product, so it is the global batch's, as
      XLA computes it (a mean of per-process losses would differ, by about 1e-4 relative on
      the tiny Mixtral).
    """

    def __init__(self, *args, data_group, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_group = data_group  # the processes with distinct rows (tensor ranks share theirs)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            # Newer torch's FSDP2 warns on every step that the root returned a view (the logits,
            # gathered whole over tensor): a hazard only for an in-place op on them, which clm
            # never does (the loss reads them out of place; the tensor-parallel runs' losses equal
            # the fsdp-only ones').
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                                    category=UserWarning)
            logits = super().__call__(input_ids)
        if self.routing is not None:
            for layer in self.routing.layers:
                layer.expert_load = _gather_rows(layer.expert_load, self.data_group)
        return logits

    def loss_terms(self, input_ids, labels, ignore_index):
        terms = super().loss_terms(input_ids, labels, ignore_index)
        if dist.get_world_size(self.data_group) == 1:
            return terms
        # the aux loss is the global batch's already (its fractions pooled over the data processes)
        terms.loss_sum = differentiable("all_reduce", terms.loss_sum, group=self.data_group)
        counts = torch.stack([terms.num_scored, terms.num_inputs])
        dist.all_reduce(counts, group=self.data_group)
        terms.num_scored, terms.num_inputs = counts[0], counts[1]
        return terms

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm: per mesh (expert weights live on another mesh than the
        others under expert parallelism, and torch's clip cannot combine DTensors of two
        meshes), combined, then the clip (as torchtitan's clip with EP)."""
        by_mesh = {}
        for parameter in self.module.parameters():
            if parameter.grad is not None:
                mesh = parameter.grad.device_mesh if isinstance(parameter.grad, DTensor) else None
                by_mesh.setdefault(mesh, []).append(parameter)
        norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in by_mesh.values()]
        norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm for norm in norms]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
        if max_norm > 0:
            for group in by_mesh.values():
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
        return norm


def _mean_over_processes(tensor: torch.Tensor, group) -> torch.Tensor:
    """The mean of `tensor` over the data processes of `group` (each holds as many rows),
    differentiable: the backward hands every process the gradient of its own part."""
    if dist.get_world_size(group) == 1:
        return tensor
    return differentiable("all_reduce", tensor, group=group) / dist.get_world_size(group)


def differentiable(collective: str, *args, **kwargs) -> torch.Tensor:
    """torch.distributed.nn.functional's `collective`: it carries gradients on every torch clm
    supports. Newer torch marks these deprecated (a FutureWarning on every call) in favour of the
    functional collectives, whose all_reduce has no backward on torch 2.9: the warning is not the
    user's to act on, so it is not shown."""
    import torch.distributed.nn.functional as collectives

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                                category=FutureWarning)
        return getattr(collectives, collective)(*args, **kwargs)


def _gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every data process's rows of `tensor`, in process order (as XLA's global batch holds them)."""
    if dist.get_world_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


# ------------------------------------------------------------------------------ MoE


def grouped_mm_dropless(device: torch.device, capacity_factor: float, expert_parallelism: int):
    """Dropless experts through transformers' `grouped_mm` experts (one grouped GEMM over the
    tokens sorted by expert) where torch has a grouped GEMM for the device: CUDA sm90+
    (Hopper's, and later; torch >= 2.9 also runs sm80) and CPU from torch 2.9 (a CPU kernel of
    `torch._grouped_mm`). None elsewhere, under a capacity factor, and with expert parallelism,
    where the all-to-all moves the static [B, E, C = S, H] buffer: the static path then."""
    from torch.torch_version import TorchVersion
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if capacity_factor > 0 or expert_parallelism > 1 or not hasattr(torch, "_grouped_mm"):
        return None
    if device.type == "cuda":
        available = torch.cuda.get_device_capability(device) >= (9, 0)
    else:
        available = device.type == "cpu" and TorchVersion(torch.__version__) >= "2.9"
    return ALL_EXPERTS_FUNCTIONS["grouped_mm"] if available else None


def apply_expert_parallel(module: torch.nn.Module, mesh, mp_policy: MixedPrecisionPolicy) -> None:
    """Expert parallelism on the meta model, before FSDP wraps the decoder layers (torchtitan's
    order): each experts module's weights become DTensors sharded on the expert dimension
    (Shard(0) over the `expert` axis: process e of an expert group holds experts e*E/ep ...),
    then an FSDP unit of their own over the data axes without `expert`, sharded on dim 1 (dim 0
    is split already). Their gradients come from the tokens of every data process (through the
    all-to-all's backward), so FSDP divides them by all of those, as for the other weights."""
    expert_mesh = mesh["expert"]
    data_mesh = mesh["dcn", "fsdp"] if mesh["dcn"].size() > 1 else mesh["fsdp"]
    processes = mesh["dcn"].size() * mesh["fsdp"].size() * expert_mesh.size()
    for experts in [m for m in module.modules() if moe.is_experts(m)]:
        if experts.has_post_expert_norm:
            raise UserError(f"expert_parallelism={expert_mesh.size()}: {type(experts).__name__} normalises the "
                            "experts' outputs (post_expert_norm), not built on backend=dtensor; use "
                            "expert_parallelism=1 or backend=xla")
        for name, parameter in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(parameter.data, expert_mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, torch.nn.Parameter(sharded, requires_grad=parameter.requires_grad))
        fully_shard(experts, mesh=data_mesh, mp_policy=mp_policy, shard_placement_fn=lambda _: Shard(1))
        experts.set_gradient_divide_factor(processes)
        if mesh.device_type == "cpu":
            experts.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM: sum, then divide


class ExpertParallel:
    """An MoE block's experts under expert parallelism (moe.MoELayer.run_experts): the [B, E, C, H]
    buffer of this process's rows (capacity and drops decided per sequence, as everywhere) goes
    to the experts' processes by one all-to-all over the expert group, each process runs its
    E/ep experts on every sender's slots, and a second all-to-all brings the outputs back.
    Static shapes: every process sends its C slots per expert, filled or not (C = S when
    dropless, so nothing is ever dropped whatever the routing)."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self, experts: torch.nn.Module, dispatched: torch.Tensor, constrain=None) -> torch.Tensor:
        batch, num_experts, capacity, hidden = dispatched.shape
        local = num_experts // self.size
        # [B, E, C, H] -> [ep, B, E/ep, C, H]: block e goes to the process holding experts e*E/ep...
        send = dispatched.view(batch, self.size, local, capacity, hidden).transpose(0, 1).contiguous()
        received = differentiable("all_to_all_single", torch.empty_like(send), send, group=self.group)  # [senders, B, E/ep, C, H]
        output = moe.expert_mlp(_LocalExperts(experts), received.view(self.size * batch, local, capacity, hidden))
        back = output.reshape(self.size, batch, local, capacity, hidden).contiguous()
        returned = differentiable("all_to_all_single", torch.empty_like(back), back, group=self.group)  # [expert groups, B, ...]
        return returned.transpose(0, 1).reshape(batch, num_experts, capacity, hidden)


class _LocalExperts:
    """An experts module as its expert-parallel forward sees it: the weights this process holds
    (the local [E/ep, ...] part of FSDP's gathered DTensors), everything else the module's own."""

    def __init__(self, experts: torch.nn.Module):
        self._experts = experts

    def __getattr__(self, name: str):
        value = getattr(self._experts, name)
        return value.to_local() if isinstance(value, DTensor) else value


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
        if self.device.type != "cpu" and self.device.type in state:  # an XLA checkpoint's has none: this run's seed's
            torch.get_device_module(self.device.type).set_rng_state(state[self.device.type], self.device)

