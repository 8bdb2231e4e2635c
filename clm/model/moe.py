"""Capacity-factor experts for every MoE family in transformers' experts interface.

transformers 5 sends the experts of about sixty MoE families through one interface
(`use_experts_implementation`): the family's router picks top-k experts and weights, then
`experts(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])` runs the function
named by `config._experts_implementation`. `capacity_experts_forward` below is registered
there; the routers, shared experts and dense layers stay the family's own modules.
Each experts class's layout is honoured from the flags the decorator sets: fused gate/up
(`has_gate`, with the class's `_apply_gate`: SwiGLU, or gpt-oss's interleaved, clamped one)
or a plain up projection with `act_fn`, `[E, out, in]` or transposed `[E, in, out]` weights,
biases, a post-expert norm.

Semantics (the MLPerf reference's "dropped" Mixtral, docs/design.md "Capacity-factor MoE"),
the same for every family:
- Capacity per sequence and expert: the reference's `C = int((S * K / E) * cf)`, capped at
  S (which changes nothing: no expert can be chosen more than S times in a sequence). Where
  that is 0 (S <= 3 at Mixtral's K=2, E=8, cf=1.25) clm keeps 1 slot, so a short sequence
  still reaches its experts; this is the only place clm departs from the expression.
- Each sequence queues its (token, choice) assignments in the order
  (position 0 choice 0, position 0 choice 1, position 1 choice 0, ...), i.e. the [S, K]
  top-k index flattened row-major, as the reference's `generate_masks` does with a cumsum
  over `one_hot(top_k).view(B, S * K, E)`. An expert keeps the first C assignments of its
  queue. A token's K choices are distinct experts, so within one expert's queue the order
  is simply by position: earlier positions win.
- A dropped assignment contributes nothing and kept weights are not renormalised. A token
  whose choices are ALL dropped passes its input (the MoE block's input) through unchanged,
  with the gradient flowing through that identity: the reference clones the block's input
  and overwrites only tokens with a kept choice, as Switch Transformers' implementation does.
  Where a family adds a shared expert (Qwen2-MoE, DeepSeek), it is added as the family does.
- `cf <= 0` is dropless and equals HF's stock experts: on TPU through the Pallas grouped
  matmul on the model's mesh (clm.model.grouped_matmul), elsewhere through the same
  static-shape code with C = S (no queue can be longer).

Everything has static shapes and no host syncs, so routing that changes from step to step
never recompiles. Memory is O(tokens*K*H + E*C*H): the dispatch is an index gather into a
[B, E, C, H] buffer, never a [tokens, E, C] one-hot.

What clm needs per model (capacity factor, the mesh's activation constraint) and what each
forward routed (router logits, expert load) live on `Routing`, built with the model for its
mesh (clm.model.build), never on transformers' modules or config: forward hooks hand each
block's `MoELayer` to the experts function (as a keyword argument) and record into it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ExpertsInterface

EXPERTS_IMPLEMENTATION = "clm_capacity"
# DeepSeek-V3's aux-loss-free balancing bias on its router (also GLM-4-MoE, dots1, ...).
CORRECTION_BIAS = "e_score_correction_bias"


def expert_capacity(sequence_length: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert and sequence: the reference's `int((S * K / E) * cf)`, and S when
    dropless (cf <= 0).

    At least 1: the reference's expression is 0 for S <= 3 at Mixtral's settings, which would
    drop every token; clm keeps one slot there (documented in the README).
    Never more than S: a token picks an expert at most once, so no queue is longer than S,
    and slots past S would only compute zeros.
    """
    if capacity_factor <= 0:
        return sequence_length
    return min(sequence_length, max(1, int((sequence_length * top_k / num_experts) * capacity_factor)))


def is_experts(module: torch.nn.Module) -> bool:
    """An experts module of transformers' experts interface (decorated by use_experts_implementation)."""
    return all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "is_concatenated"))


@dataclass(eq=False)
class MoELayer:
    """One MoE block of a built model: clm's settings for it and what its last forward routed."""

    name: str  # the block's module path, e.g. model.layers.3.mlp
    layer: int  # its decoder layer
    num_experts: int
    capacity_factor: float
    constrain: Callable[[torch.Tensor], torch.Tensor] | None  # for the [B, E, C, *] buffers
    router_logits_index: int  # where the router's output holds the logits
    correction_bias: torch.Tensor | None  # the router's e_score_correction_bias, if it has one
    # Dropless (cf <= 0) through a grouped matmul on the model's mesh (clm.model.grouped_matmul on
    # TPU, transformers' grouped_mm experts on the DTensor engine); None: the static path with C = S.
    dropless: Callable | None = None
    # The experts' MLP on the [B, E, C, H] buffer, `expert_mlp`'s signature; None: expert_mlp
    # itself. Expert parallelism on the DTensor engine puts its all-to-all around it here.
    run_experts: Callable | None = None
    # Of the last forward:
    sequence_length: int | None = None
    router_logits: torch.Tensor | None = None  # [B*S, E]
    expert_load: torch.Tensor | None = None  # [B, E] tokens routed to each expert, before drops
    capacity: int | None = None

    # Hooks (installed by Routing):
    def record_sequence_length(self, block, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.dim() != 3:
            raise RuntimeError(f"{self.name}: expected [batch, sequence, hidden] input, got {list(hidden.shape)}")
        self.sequence_length = hidden.shape[1]

    def record_router_logits(self, router, args, output):
        self.router_logits = output[self.router_logits_index] if isinstance(output, tuple) else output

    def pass_to_experts(self, experts, args, kwargs):
        return args, {**kwargs, "moe_layer": self}


def capacity_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    moe_layer: MoELayer | None = None,
) -> torch.Tensor:
    """The experts of any family: [B*S, H] tokens, [B*S, K] routing -> [B*S, H]."""
    if moe_layer is None or moe_layer.sequence_length is None:
        raise RuntimeError(
            f"{type(self).__name__} uses clm's capacity experts, which run only in a model built by "
            "clm.model.build.build_sharded_model (or with clm.model.moe.Routing attached)"
        )
    sequence_length = moe_layer.sequence_length
    num_tokens, hidden_dim = hidden_states.shape
    batch_size = num_tokens // sequence_length
    top_k = top_k_index.shape[-1]
    num_experts = moe_layer.num_experts

    # [B, S*K] in queue order (see the module docstring).
    expert_index = top_k_index.view(batch_size, sequence_length * top_k)
    routed = F.one_hot(expert_index, num_experts).to(torch.int32)  # [B, S*K, E]
    # Routed (before drops) tokens per expert and sequence: the router metrics' raw data.
    load = moe_layer.expert_load = routed.sum(dim=1)  # [B, E]
    capacity = moe_layer.capacity = expert_capacity(sequence_length, top_k, num_experts, moe_layer.capacity_factor)

    if moe_layer.capacity_factor <= 0 and moe_layer.dropless is not None:
        return moe_layer.dropless(self, hidden_states, top_k_index, top_k_weights)  # clm.model.grouped_matmul

    # Place of each assignment in its expert's queue: earlier assignments to the same expert.
    queue_position = routed.cumsum(dim=1).gather(2, expert_index.unsqueeze(-1)).squeeze(-1) - 1
    kept = queue_position < capacity  # [B, S*K]

    # Slot of each kept assignment in the flattened [E, C] expert buffer. Dropped ones point
    # at slot 0 here and get weight 0 in the combine.
    slot = torch.where(kept, expert_index * capacity + queue_position, 0)

    # Inverse map, slot -> token, by scattering token positions into the slots. Dropped
    # assignments all go to one extra trash slot that is cut off afterwards.
    num_slots = num_experts * capacity
    position = torch.arange(sequence_length * top_k, device=hidden_states.device) // top_k
    token_of_slot = torch.zeros(batch_size, num_slots + 1, dtype=torch.long, device=hidden_states.device)
    token_of_slot = token_of_slot.scatter(
        1, torch.where(kept, slot, num_slots), position.expand(batch_size, -1)
    )[:, :num_slots]
    # Expert e fills its first min(load, C) slots; the rest hold no token (they point at
    # token 0) and are zeroed.
    slot_filled = torch.arange(capacity, device=hidden_states.device) < load.unsqueeze(-1)

    tokens = hidden_states.view(batch_size, sequence_length, hidden_dim)
    dispatched = gather_rows(tokens, token_of_slot).view(batch_size, num_experts, capacity, hidden_dim)
    run_experts = moe_layer.run_experts or expert_mlp
    expert_output = run_experts(self, dispatched * slot_filled.unsqueeze(-1).to(dispatched.dtype), moe_layer.constrain)

    # Combine: every assignment reads its slot back; dropped ones are weighted by zero.
    gathered = gather_rows(expert_output.reshape(batch_size, num_slots, hidden_dim), slot)
    weights = top_k_weights.view(batch_size, sequence_length * top_k) * kept
    weighted = gathered * weights.unsqueeze(-1)  # router weights are fp32: sum in fp32, as batched_mm
    output = weighted.view(batch_size, sequence_length, top_k, hidden_dim).sum(dim=2)
    output = output.view(num_tokens, hidden_dim).to(hidden_states.dtype)
    # A token with no kept choice passes its input through (the reference's semantics).
    any_kept = kept.view(num_tokens, top_k).any(dim=-1, keepdim=True)
    return torch.where(any_kept, output, hidden_states)


def up_weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first projection and its bias: fused gate/up, or up alone (has_gate false)."""
    name = "gate_up_proj" if experts.has_gate else "up_proj"
    return getattr(experts, name), getattr(experts, f"{name}_bias") if experts.has_bias else None


def activate(experts: torch.nn.Module, projected: torch.Tensor) -> torch.Tensor:
    return experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)


def expert_mlp(experts: torch.nn.Module, dispatched: torch.Tensor,
               constrain: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Every expert's MLP on its own slots: [B, E, C, H] -> [B, E, C, H].

    `constrain` (the model's sharding of [B, E, C, *] buffers) is applied to the dispatched
    tokens, the activated hidden states and the expert outputs.
    """
    constrain = constrain or (lambda tensor: tensor)
    up, up_bias = up_weights(experts)
    # Weights are [E, out, in], or [E, in, out] when transposed (gpt-oss).
    projected = torch.einsum("bech,ehi->beci" if experts.is_transposed else "bech,eih->beci", constrain(dispatched), up)
    if up_bias is not None:
        projected = projected + up_bias[None, :, None, :]
    activated = constrain(activate(experts, projected))
    output = torch.einsum("beci,eih->bech" if experts.is_transposed else "beci,ehi->bech", activated, experts.down_proj)
    if experts.has_bias:
        output = output + experts.down_proj_bias[None, :, None, :]
    if experts.has_post_expert_norm:
        output = experts.post_expert_norm(output)
    return constrain(output)


def gather_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source [*batch, N, H], index [*batch, M] -> [*batch, M, H]: row index[..., m] of each
    batch entry (a sequence here, a shard's sequences in grouped_matmul).

    torch.gather rather than source[arange(B)[:, None], index]: XLA's SPMD partitioner sees
    the batch dimensions of torch_xla's gather as parallel and keeps them local to each shard,
    while advanced indexing makes it all-gather the source over the batch shards.
    """
    return source.gather(index.dim() - 1, index.unsqueeze(-1).expand(*index.shape, source.shape[-1]))


# --------------------------------------------------------------- one model's routing


def _router_recorder(experts: torch.nn.Module) -> tuple[type | None, int]:
    """The router class and output index that transformers records router logits from: the
    family's `_can_record_outputs["router_logits"]`, read from the experts' modeling module."""
    from transformers.utils.output_capturing import OutputRecorder

    # The modeling module of the experts' class, or of the class it derives from where an engine
    # subclassed it (FSDP2's fully_shard of an expert-parallel experts module makes FSDP<Class>).
    cls = next(cls for cls in type(experts).__mro__ if not cls.__module__.startswith("torch."))
    for value in vars(sys.modules[cls.__module__]).values():
        spec = (getattr(value, "_can_record_outputs", None) or {}) if isinstance(value, type) else {}
        spec = spec.get("router_logits") if isinstance(spec, dict) else None
        if isinstance(spec, list):
            spec = spec[0]
        if isinstance(spec, OutputRecorder):
            return spec.target_class, spec.index
        if isinstance(spec, type):
            return spec, 1  # transformers' default index for outputs other than hidden states
    return None, 0


def _decoder_layer(name: str) -> int:
    """The decoder layer of a module path (model.layers.3.mlp -> 3)."""
    return next((int(part) for part in name.split(".") if part.isdigit()), 0)


class Routing:
    """clm's MoE settings for one built model and what its forwards routed, per MoE block.

    Installs three forward hooks per block: one records the sequence length (capacity is per
    sequence, but transformers flattens [B, S, H] to [B*S, H] before the experts), one records
    the router's logits, one hands the block's MoELayer to the experts function.
    """

    def __init__(self, model: torch.nn.Module, capacity_factor: float,
                 constrain: Callable[[torch.Tensor], torch.Tensor] | None = None, dropless: Callable | None = None,
                 pool: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.layers: list[MoELayer] = []
        # The load-balancing statistics' mean over the processes that hold the batch's rows (the
        # DTensor engine's, differentiable); None where one program sees the whole batch (XLA).
        self.pool = pool
        modules = dict(model.named_modules())
        for name, experts in modules.items():
            if not is_experts(experts):
                continue
            router_class, logits_index = _router_recorder(experts)
            block_name = name.rpartition(".")[0]
            block = modules[block_name]
            router = next((m for m in block.children() if router_class and isinstance(m, router_class)), None)
            layer = MoELayer(
                name=block_name, layer=_decoder_layer(block_name), num_experts=up_weights(experts)[0].shape[0],
                capacity_factor=float(capacity_factor), constrain=constrain, router_logits_index=logits_index,
                correction_bias=getattr(router, CORRECTION_BIAS, None), dropless=dropless,
            )
            block.register_forward_pre_hook(layer.record_sequence_length, with_kwargs=True)
            experts.register_forward_pre_hook(layer.pass_to_experts, with_kwargs=True)
            if router is not None:
                router.register_forward_hook(layer.record_router_logits)
            self.layers.append(layer)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no experts of transformers' experts interface")
        self.aux_loss = AuxLoss.of(model)

    @property
    def has_correction_bias(self) -> bool:
        return any(layer.correction_bias is not None for layer in self.layers)

    def router_logits(self) -> tuple[torch.Tensor, ...]:
        """Each MoE layer's router logits [B*S, E] of the last forward, in layer order."""
        return tuple(layer.router_logits for layer in self.layers)

    def expert_load(self) -> torch.Tensor:
        """[MoE layers, E]: tokens of the last forward routed to each expert (before drops)."""
        return torch.stack([layer.expert_load.sum(dim=0) for layer in self.layers])

    def load_balancing_loss(self) -> torch.Tensor | None:
        """The family's own load-balancing loss of the last forward, over the global batch (None
        where it has none)."""
        return self.aux_loss(self.router_logits(), self.pool) if self.aux_loss else None

    def metrics(self) -> dict[str, torch.Tensor]:
        """Routing statistics of the last forward, as device tensors (no host sync here).

        - `moe/drop_fraction`: dropped / routed (token, choice) assignments over all layers;
          `moe/drop_fraction/layer_{i}` the same for the MoE block of decoder layer i.
        - `moe/expert_load_max`, `moe/expert_load_mean`: "expert load" is the number of a
          sequence's tokens routed to an expert in one layer, before drops. Max and mean are
          over layers, sequences and experts; the mean is always S*K/E (perfect balance), so
          max / mean is the worst imbalance and max > capacity means that expert dropped tokens.

        Compute it right after the forward (a few tiny ops that join the step's graph) and move
        the values to the host only at log steps, inside a step closure.
        """
        metrics = {}
        dropped_total, routed_total, loads = 0, 0, []
        for layer in self.layers:
            load = layer.expert_load
            dropped = (load - load.clamp(max=layer.capacity)).sum()
            routed = load.sum()
            metrics[f"moe/drop_fraction/layer_{layer.layer}"] = dropped / routed
            dropped_total, routed_total = dropped_total + dropped, routed_total + routed
            loads.append(load)
        loads = torch.stack(loads).float()
        metrics["moe/drop_fraction"] = dropped_total / routed_total
        metrics["moe/expert_load_max"] = loads.max()
        metrics["moe/expert_load_mean"] = loads.mean()
        return metrics

    @torch.no_grad()
    def update_correction_bias(self, expert_load: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 section 2.1.2): after each
        optimizer step, every router's correction bias moves by `rate` towards balance,
        `bias += rate * sign(mean load - load)`, from that step's load [MoE layers, E]
        (tokens routed before drops). Outside autograd; in the step's graph, so no host sync."""
        for layer, load in zip(self.layers, expert_load, strict=True):
            if layer.correction_bias is not None:
                load = load.float()
                layer.correction_bias.add_(torch.sign(load.mean() - load).to(layer.correction_bias.dtype) * rate)


@dataclass(frozen=True)
class AuxLoss:
    """transformers' load-balancing loss of one family (Switch Transformer's, eq. 4-6), with the
    model's expert count, top-k and coefficient.

    Every family of the experts interface that has one (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, ...)
    has the same `load_balancing_loss_func` in its modeling module: over all layers' rows pooled,
    `E * sum_e (top-k assignments to e / rows) * (router probability of e summed / rows)`.
    clm computes those two per-expert fractions itself (tests/test_families.py checks the value
    against each family's function), so that processes that each hold some rows of the batch can
    average them (`pool`) and get the global batch's loss, as XLA's one program computes it: a
    product of means is not the mean of per-process products. The counting is the function's
    scatter_add branch (its histc one does not run on XLA).
    """

    num_experts: int
    top_k: int
    coefficient: float

    @staticmethod
    def of(model: torch.nn.Module) -> AuxLoss | None:
        # The family's modeling module: that of the model's class, or of the class it derives
        # from where an engine subclassed it (FSDP2's fully_shard makes FSDP<Class>).
        function = next((vars(sys.modules[cls.__module__]).get("load_balancing_loss_func")
                         for cls in type(model).__mro__
                         if "load_balancing_loss_func" in vars(sys.modules[cls.__module__])), None)
        if function is None or not hasattr(model, "router_aux_loss_coef"):
            return None  # the family has none (DeepSeek-V3 balances with its correction bias)
        aux_loss = AuxLoss(int(model.num_experts), int(model.num_experts_per_tok), float(model.router_aux_loss_coef))
        # A family whose function is another formula is refused, never silently given Switch's.
        logits = tuple(torch.randn(16, aux_loss.num_experts, generator=torch.Generator().manual_seed(layer))
                       for layer in range(2))
        if not torch.allclose(aux_loss(logits), function(logits, aux_loss.num_experts, aux_loss.top_k), rtol=1e-5):
            raise ValueError(f"{type(model).__name__}'s load_balancing_loss_func is not Switch Transformer's "
                             "formula, the one clm computes (clm.model.moe.AuxLoss)")
        return aux_loss

    def __call__(self, router_logits: tuple[torch.Tensor, ...],
                 pool: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        device = router_logits[0].device
        assigned = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
        probability = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
        for logits in router_logits:  # layer by layer, as transformers': memory O(rows * E)
            probabilities = F.softmax(logits, dim=-1)
            chosen = torch.topk(probabilities, self.top_k, dim=-1).indices.reshape(-1)
            assigned = assigned.scatter_add(0, chosen, torch.ones(chosen.shape, dtype=torch.float32, device=device))
            probability = probability + probabilities.float().sum(dim=0)
        rows = sum(logits.shape[0] for logits in router_logits)
        fractions = torch.stack([assigned, probability]) / rows
        if pool is not None:
            fractions = pool(fractions)  # every process holds as many rows: the mean of the means
        return self.num_experts * (fractions[0] * fractions[1]).sum()


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, capacity_experts_forward)
