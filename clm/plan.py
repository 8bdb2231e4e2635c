"""Will it fit? A memory plan for a pod you are not on, from the overrides you would launch with.

    python -m clm.plan v5p-256 +experiment=gbs256_tpu
    python -m clm.plan 2xv5p-256 +experiment=gbs256_tpu tensor_parallelism=2

Nothing is allocated: the model plan (clm.model.plan.ModelPlan: the model on the meta device,
checked against the config and the mesh) gives each parameter's per-device shape, and
activations are estimated from the shapes (the formula is below, in `activation_bytes`). The
run's pre-flight (`preflight`) reads the same numbers from the run's own plan. Last line:
`plan: key=value ...`.
"""

from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from clm import tpu
from clm.cli import run_command
from clm.errors import UserError
from clm.model import family
from clm.model.plan import ModelPlan
from clm.parallel import MeshShape, mesh_shape
from clm.parallel.mesh import axes_of

GB = 1e9
# Headroom left for XLA's own buffers and fragmentation when saying "fits".
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class Topology:
    name: str
    kind: str
    slices: int
    chips_per_slice: int
    hbm_gb: float

    @property
    def chips(self) -> int:
        return self.slices * self.chips_per_slice


def parse_topology(text: str) -> Topology:
    """'v5p-256' (one slice) or '2xv5p-256' (two slices): clm.tpu's accelerator-type names."""
    match = re.fullmatch(r"(?:(\d+)x)?(.+)", text)
    parsed = tpu.parse_accelerator_type(match.group(2))
    if parsed is None:
        raise UserError(
            f"topology '{text}': use e.g. v5p-256, v4-8, v5e-16, v6e-256, or 2xv5p-256 for two slices "
            f"(generations: {tpu.names()})"
        )
    generation, chips = parsed
    return Topology(text, generation.name, int(match.group(1) or 1), chips, generation.hbm_gb)


def activation_bytes(model_plan: ModelPlan) -> dict[str, float]:
    """Per-device activation estimate for one micro-batch, forward and backward.

    tokens = rows per device x S. Per layer, with b bytes per element, tp = tensor size, d_qk and
    d_v the query/key and value head dims (MLA's own for DeepSeek), m the MLP's intermediate
    activations per token in units of its width (gate, up, activated: 3 gated; 2 not), as
    clm.model.family reads them from the config:
      saved input     tokens*H*b                                  (all an activation-checkpointed layer keeps)
      attention       tokens*(Hq*d_qk + Hkv*(d_qk + d_v) + Hq*d_v)/tp*b   (q, k, v, output; flash keeps no
                      + rows*Hq/tp*S*S*b without flash attention)          S x S scores)
      MoE layer       slots*(2*H + m*I_e/tp)*b, slots = tokens*K*cf   (dispatched, gate/up, activated,
                      + tokens*m*I_shared/tp*b                          output; dropless: cf = 1 with the
                                                                        grouped matmul; shared experts)
      dense layer     tokens*m*I/tp*b
      other           4*tokens*H*b                                (norms, residuals)
    One layer is the largest of them. Backward needs about as much again as the forward of the
    layer it differentiates. Logits: tokens*V/tp*(b + 4 + 4) (model dtype, fp32 for the loss, fp32
    gradient). With R of the L layers checkpointed (those whose class
    model.fsdp_config.fsdp_transformer_layer_cls_to_wrap names): R * saved input + 2 * (L - R) * one
    layer + 2 * one layer (the one being recomputed) + logits; without: 2 * L * one layer + logits.
    """
    cfg, hf_config, mesh = model_plan.cfg, model_plan.hf_config, model_plan.mesh_shape
    b = dtype_bytes(cfg)
    micro_batch = cfg.global_train_batch_size // cfg.gradient_accumulation_steps
    rows = math.ceil(micro_batch / mesh.data_parallel)
    S, tp = cfg.max_length, mesh.tensor
    tokens = rows * S
    H, V, L = hf_config.hidden_size, hf_config.vocab_size, hf_config.num_hidden_layers
    Hq, Hkv = family.num_attention_heads(hf_config), family.num_key_value_heads(hf_config)
    d_qk, d_v = family.attention_head_dims(hf_config)
    cf = cfg.model.capacity_factor if cfg.model.capacity_factor > 0 else 1.0
    intermediates = family.mlp_matrices(hf_config)  # gate, up and activated; or up and activated

    saved_input = tokens * H * b
    attention = tokens * (Hq * d_qk + Hkv * (d_qk + d_v) + Hq * d_v) / tp * b
    if not cfg.model.flash_attention:
        attention += rows * Hq / tp * S * S * b

    def mlp(layer: int) -> float:
        if not family.is_moe_layer(hf_config, layer):
            return tokens * intermediates * family.dense_mlp_width(hf_config) / tp * b
        slots = tokens * hf_config.num_experts_per_tok * cf
        return (slots * (2 * H + intermediates * family.expert_width(hf_config) / tp)
                + tokens * intermediates * family.shared_expert_width(hf_config) / tp) * b

    layer = attention + max(mlp(i) for i in range(L)) + 4 * tokens * H * b
    logits = tokens * V / tp * (b + 4 + 4)
    recomputed = recomputed_layers(model_plan)
    total = recomputed * saved_input + 2 * (L - recomputed) * layer + logits
    if recomputed:
        total += 2 * layer  # the one layer being recomputed and differentiated
    return {"layer_inputs": L * saved_input, "one_layer": layer, "logits": logits, "total": total}


def recomputed_layers(model_plan: ModelPlan) -> int:
    """How many decoder layers activation checkpointing recomputes: those of the named classes."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    fsdp_config = model_plan.cfg.model.fsdp_config
    if not fsdp_config.xla_fsdp_grad_ckpt:
        return 0
    named = set(fsdp_config.fsdp_transformer_layer_cls_to_wrap)
    return sum(isinstance(m, GradientCheckpointingLayer) and type(m).__name__ in named
               for m in model_plan.meta_model.modules())


def _group_name(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


# Optimizer state per parameter byte: AdamW's two moments in the parameters' dtype; plain SGD
# (no momentum, as clm builds it) keeps none.
OPTIMIZER_STATE = {"SGD": 0}
# A process's own footprint on the host besides the model (Python, torch, XLA, the data pipeline).
HOST_BASELINE_GB = 2.0
# Host copies while a parameter is placed (the full values, its shards, then the device buffers)
# and compiler working set, in units of the largest parameter: clm.model.init / clm.model.weights.
PLACEMENT_TRANSIENT = 3
# XLA's CPU backend has no bf16 matmul: it converts a layer's (FSDP-gathered) weights to fp32
# for every dot, forward and backward, on every virtual device. Bytes per gathered parameter,
# calibrated on mixtral80 with one device (19 GB peak with SGD, S=64: 1.5 x 4 bytes x 1.71B).
CPU_COMPUTE_BYTES_PER_LAYER_PARAMETER = 6


@dataclass
class MemoryPlan:
    """Per-device bytes of one run: the planner's numbers, shared by the pre-flight."""

    mesh: MeshShape
    largest_parameter_bytes: float
    entries: list
    totals: dict[str, float]
    activations: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.totals.values())


def dtype_bytes(cfg: DictConfig) -> int:
    """Bytes per element of model.dtype."""
    return torch.tensor([], dtype=getattr(torch, cfg.model.dtype)).element_size()


def memory_plan(model_plan: ModelPlan) -> MemoryPlan:
    """Per-device bytes of the plan's run, from its parameter shardings and settings."""
    cfg = model_plan.cfg
    b = dtype_bytes(cfg)
    param_bytes = sum(math.prod(e.local_shape) for e in model_plan.shardings) * b
    activations = activation_bytes(model_plan)
    largest = max(p.numel() for p in model_plan.meta_model.parameters())
    totals = {
        "parameters": param_bytes,
        "gradients": param_bytes,
        "optimizer_state": OPTIMIZER_STATE.get(cfg.optimizer, 2) * param_bytes,
        "activations": activations["total"],
    }
    return MemoryPlan(model_plan.mesh_shape, largest * b, model_plan.shardings, totals, activations)


def model_name(cfg: DictConfig) -> str:
    return cfg.model.config_path or cfg.model.name_or_path


def print_plan(model_plan: ModelPlan, topology: Topology) -> dict[str, float]:
    cfg, mesh = model_plan.cfg, model_plan.mesh_shape
    memory = memory_plan(model_plan)
    b = dtype_bytes(cfg)

    groups: dict[str, list] = defaultdict(list)
    for entry in memory.entries:
        groups[entry.rule or _group_name(entry.name)].append(entry)
    print(f"Plan: {model_name(cfg)} on {topology.name} "
          f"({topology.chips} chips, {topology.hbm_gb:g} GB HBM each), mesh {mesh}, "
          f"{cfg.model.dtype}, S={cfg.max_length}, global batch {cfg.global_train_batch_size}")
    print(f"{'parameter group':<48} {'count':>5}  {'global shape':<22} {'partition spec':<36} {'per device':>11}")
    for rule, entries in groups.items():
        local = sum(math.prod(e.local_shape) for e in entries) * b
        spec = "(" + ", ".join(str(list(s)) if isinstance(s, tuple) else str(s) for s in entries[0].spec) + ")"
        print(f"{rule:<48} {len(entries):>5}  {str(list(entries[0].shape)):<22} {spec:<36} {local / 2**20:>8.1f} MiB")

    totals, activations, total = memory.totals, memory.activations, memory.total
    usable = USABLE_FRACTION * topology.hbm_gb * GB
    print("\nPer chip (GB): " + ", ".join(f"{k} {v / GB:.2f}" for k, v in totals.items())
          + f" (activations: layer inputs {activations['layer_inputs'] / GB:.2f}, one layer "
          f"{activations['one_layer'] / GB:.2f}, logits {activations['logits'] / GB:.2f})")
    verdict = "fits" if total <= usable else "does NOT fit"
    print(f"Total {total / GB:.2f} GB of {topology.hbm_gb:g} GB HBM: {verdict} "
          f"({USABLE_FRACTION:.0%} usable; activations are an estimate, see clm/plan.py)")
    flops, reference = model_plan.flops_per_token, model_plan.reference_flops_per_token
    active = model_plan.active_matmul_weights
    print(f"Training FLOPs per token: {flops:.3g} (MaxText's convention: {active / 1e9:.2f}B active weights of "
          f"{model_plan.num_params / 1e9:.2f}B, attention at S={cfg.max_length}); the reference's 6*N*K/E: {reference:.3g}")
    summary = {"params_b": model_plan.num_params / 1e9, **{f"{k}_gb": v / GB for k, v in totals.items()},
               "total_gb": total / GB, "hbm_gb": topology.hbm_gb, "active_params_b": active / 1e9,
               "gflops_per_token": flops / 1e9}
    print(f"plan: topology={topology.name} chips={topology.chips} "
          + " ".join(f"{k}={v:.2f}" for k, v in summary.items()) + f" fits={'yes' if total <= usable else 'no'}")
    return {**summary, "fits": total <= usable}


# ------------------------------------------------------------------------ pre-flight

# Overrides tried, in order, when a CPU run does not fit; the first that fits is suggested,
# first on this many virtual devices, then on one (no gathered copies, no collectives).
CPU_FALLBACKS = (
    ["model.dtype=bfloat16"],
    ["model.dtype=bfloat16", "model.fsdp_config.xla_fsdp_grad_ckpt=true"],
    ["model.dtype=bfloat16", "model.fsdp_config.xla_fsdp_grad_ckpt=true", "max_length=128"],
    ["model.dtype=bfloat16", "model.fsdp_config.xla_fsdp_grad_ckpt=true", "max_length=128",
     "per_device_train_batch_size=1"],
    ["model.dtype=bfloat16", "model.fsdp_config.xla_fsdp_grad_ckpt=true", "max_length=128",
     "per_device_train_batch_size=1", "optimizer=SGD"],
)


def host_bytes_needed(model_plan: ModelPlan) -> float:
    """Host memory of a run on XLA's CPU backend, which keeps every virtual device's buffers in
    host memory: the larger of building the model (its parameters plus the placement transient
    of the largest one) and training (the planner's per-device total times the devices, plus
    each device's fp32 compute copy of one gathered layer), plus the process's own baseline."""
    memory, mesh = memory_plan(model_plan), model_plan.mesh_shape
    build = memory.totals["parameters"] * mesh.num_devices + PLACEMENT_TRANSIENT * memory.largest_parameter_bytes
    train = (memory.total + CPU_COMPUTE_BYTES_PER_LAYER_PARAMETER * gathered_layer_parameters(memory)) * mesh.num_devices
    return max(build, train) + HOST_BASELINE_GB * GB


def gathered_layer_parameters(memory: MemoryPlan) -> float:
    """Parameters of the largest decoder layer as one device computes with it: FSDP axes gathered,
    tensor and expert axes still split."""
    layers: dict[str, float] = defaultdict(float)
    for entry in memory.entries:
        match = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", entry.name)  # GPT-2 names its layers h
        if match:
            split = math.prod(
                memory.mesh.sizes[a] for spec in entry.spec for a in axes_of(spec) if a in ("tensor", "expert"))
            layers[match.group(1)] += math.prod(entry.shape) / split
    return max(layers.values(), default=0.0)


def available_host_bytes() -> float:
    """MemAvailable, or the cgroup's remaining limit when that is lower."""
    available = math.inf
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        available = info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            current = int(open("/sys/fs/cgroup/memory.current").read())
            available = min(available, int(limit) - current)
    except (OSError, ValueError):
        pass
    return available


def preflight(model_plan: ModelPlan, device_type: str, device_kind: str,
              available_bytes: float | None = None) -> None:
    """Before anything is allocated: on CPU a run that cannot fit the host is one error line with
    an override that fits (each tried on the same model plan, `replace`d: no model is rebuilt);
    on TPU the planner's HBM verdict is a warning (activations are estimated)."""
    cfg, mesh = model_plan.cfg, model_plan.mesh_shape
    if device_type == "TPU":
        generation = tpu.generation(device_kind)
        if generation is not None:
            total = memory_plan(model_plan).total
            hbm = generation.hbm_gb * GB
            if total > USABLE_FRACTION * hbm:
                print(f"warning: the planner estimates {total / GB:.1f} GB per chip, over {USABLE_FRACTION:.0%} of "
                      f"{hbm / GB:g} GB HBM; see python -m clm.plan", file=sys.stderr)
        return
    if device_type != "CPU":
        return
    available = available_host_bytes() if available_bytes is None else available_bytes
    needed = host_bytes_needed(model_plan)
    if needed <= available:
        return
    from omegaconf import OmegaConf

    suggestion = None
    one_device = MeshShape(1, 1, 1, 1)
    for devices, candidate_mesh in ((mesh.num_devices, mesh), (1, one_device)):
        for overrides in CPU_FALLBACKS:
            candidate = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
            if cfg.global_train_batch_size == cfg.per_device_train_batch_size * mesh.num_devices:
                # The batch follows the device count, as get_global_batch_size resolves it.
                batch = candidate.per_device_train_batch_size * devices
                candidate = OmegaConf.merge(candidate, {"global_train_batch_size": batch})
            if candidate.global_train_batch_size % candidate_mesh.data_parallel:
                continue
            if host_bytes_needed(model_plan.replace(cfg=candidate, mesh_shape=candidate_mesh)) <= available:
                prefix = "" if devices == mesh.num_devices else "CPU_NUM_DEVICES=1 "
                suggestion = prefix + " ".join(overrides)
                break
        if suggestion:
            break
    hint = (f"try {suggestion}" if suggestion else
            "no smaller setting of this model fits; use a smaller model or a machine with more memory")
    raise UserError(
        f"this run needs about {needed / GB:.1f} GB of host memory ({model_name(cfg)}, {cfg.model.dtype}, "
        f"{cfg.optimizer}, {mesh.num_devices} virtual CPU devices, max_length={cfg.max_length}) but "
        f"{available / GB:.1f} GB is available; {hint}"
    )


def main(argv: list[str]) -> int:
    """`python -m clm.plan TOPOLOGY [overrides]`: 0, or 2 with one error line."""
    return run_command(lambda: _plan(argv))


def _plan(argv: list[str]) -> None:
    from clm.config import load_config

    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise UserError("usage: python -m clm.plan TOPOLOGY [overrides], e.g. python -m clm.plan v5p-256 +experiment=gbs256_tpu")
    topology = parse_topology(argv[0])
    cfg = load_config(argv[1:], num_devices=topology.chips)
    slices = topology.slices if cfg.num_slices == -1 else cfg.num_slices
    mesh = mesh_shape(topology.chips, cfg.tensor_parallelism, cfg.expert_parallelism, slices)
    print_plan(ModelPlan.from_config(cfg, mesh), topology)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
