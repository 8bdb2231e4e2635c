"""Capacity-factor Mixtral experts for XLA, plugged into transformers' experts interface.

`MixtralForCausalLM` is used unchanged. `configure` points `config._experts_implementation`
at `experts_forward` below, which replaces the body of HF's `MixtralExperts.forward`
(the router, `MixtralTopKRouter`, stays HF's: fp32 softmax, top-k, renormalised k weights).

Semantics (the MLPerf reference's "dropped" Mixtral, docs/design.md "Capacity-factor MoE"):
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
  whose choices are ALL dropped passes its input (the post-attention-norm hidden state)
  through unchanged, with the gradient flowing through that identity: the reference clones
  the block's input and overwrites only tokens with a kept choice, as Switch Transformers'
  implementation does. Such a layer adds the normalised hidden state to the residual.
- `cf <= 0` is dropless and equals HF's stock experts: on TPU through the Pallas grouped
  matmul, elsewhere through the same static-shape code with C = S (no queue can be longer).

Everything has static shapes and no host syncs, so routing that changes from step to step
never recompiles. Memory is O(tokens*K*H + E*C*H): the dispatch is an index gather into a
[B, E, C, H] buffer, never a [tokens, E, C] one-hot.

The trainer calls:
    configure(hf_config, capacity_factor)   # before building the model
    attach(model)                           # after building it (sequence length, router logits)
    load_balancing_loss(router_logits(model), E, K)    # training loss only
    router_metrics(model)                   # device tensors from the last forward
    set_expert_activation_sharding(fn)      # optional: sharding of the [B, E, C, *] buffers
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ExpertsInterface
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from clm.runtime import on_tpu

EXPERTS_IMPLEMENTATION = "clm_capacity"

# Applied to every [B, E, C, *] expert activation; see set_expert_activation_sharding.
_expert_activation_sharding: Callable[[torch.Tensor], torch.Tensor] | None = None


def set_expert_activation_sharding(fn: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Install `fn(tensor) -> tensor` to constrain the sharding of [B, E, C, *] activations.

    It is applied to the dispatched tokens, the gated hidden states and the expert outputs
    (e.g. batch over the data axes and E over an expert axis: XLA then moves tokens between
    batch and expert sharding by all-to-all). Use a function that is differentiable and
    returns its input's values, e.g.
    `lambda t: MarkShardingFunction.apply(t, mesh, (("data", "fsdp"), "expert", None, None))`,
    so the constraint holds in the backward pass too. `None` removes it.
    """
    global _expert_activation_sharding
    _expert_activation_sharding = fn


def _constrain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if _expert_activation_sharding is None else _expert_activation_sharding(tensor)


def configure(hf_config, capacity_factor: float) -> None:
    """Select this module's experts on a MixtralConfig, before the model is built.

    capacity_factor <= 0 means dropless. The factor is stored on the config (and so in a saved
    config.json) as `capacity_factor`.
    """
    hf_config._experts_implementation = EXPERTS_IMPLEMENTATION
    hf_config.capacity_factor = float(capacity_factor)


def attach(model: torch.nn.Module) -> None:
    """Hooks every Mixtral MoE block needs; call once, after building the model.

    - HF flattens hidden states to [B*S, H] before calling the experts, but capacity is per
      sequence, so a forward pre-hook records S (a Python int: shapes are static anyway).
    - The router's logits of each forward are kept on the router (`router_logits`) for the
      load-balancing loss. Unlike transformers' output recording this also works when the
      decoder layer is activation-checkpointed: the checkpoint wrapper
      (clm.model.build.checkpoint_layers) hands out the logits as outputs of the checkpointed
      function, so they keep their graph, and puts them back with `set_router_logits`.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("attach(model): the model has no MixtralSparseMoeBlock")
    for block in blocks:
        block.experts.sequence_length = None
        block.register_forward_pre_hook(_record_sequence_length)
        block.gate.register_forward_hook(_record_router_logits)


def moe_blocks(module: torch.nn.Module) -> list[MixtralSparseMoeBlock]:
    return [m for m in module.modules() if isinstance(m, MixtralSparseMoeBlock)]


def _record_sequence_length(block: MixtralSparseMoeBlock, args: tuple) -> None:
    block.experts.sequence_length = args[0].shape[1]


def _record_router_logits(router: torch.nn.Module, args: tuple, output: tuple) -> None:
    router.router_logits = output[0]


def router_logits(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Each MoE layer's router logits [B*S, E] from the last forward, in layer order."""
    return tuple(block.gate.router_logits for block in moe_blocks(module))


def set_router_logits(module: torch.nn.Module, logits: tuple[torch.Tensor, ...]) -> None:
    for block, layer_logits in zip(moe_blocks(module), logits, strict=True):
        block.gate.router_logits = layer_logits


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


def experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Replacement for `MixtralExperts.forward`: [B*S, H] tokens, [B*S, K] routing -> [B*S, H]."""
    sequence_length = getattr(self, "sequence_length", None)
    if sequence_length is None:
        raise RuntimeError("clm.model.moe.attach(model) must be called before the first forward")
    num_tokens, hidden_dim = hidden_states.shape
    batch_size = num_tokens // sequence_length
    top_k = top_k_index.shape[-1]
    capacity_factor = self.config.capacity_factor

    # [B, S*K] in queue order (see the module docstring).
    expert_index = top_k_index.view(batch_size, sequence_length * top_k)
    routed = F.one_hot(expert_index, self.num_experts).to(torch.int32)  # [B, S*K, E]
    # Routed (before drops) tokens per expert and sequence: the router metrics' raw data.
    self.expert_load = routed.sum(dim=1)  # [B, E]
    capacity = self.capacity = expert_capacity(sequence_length, top_k, self.num_experts, capacity_factor)

    if capacity_factor <= 0 and on_tpu(hidden_states) and _fits_gmm_tiles(self, num_tokens * top_k):
        from torch_xla.experimental.custom_kernel import GMM

        return dropless_grouped_forward(self, hidden_states, top_k_index, top_k_weights, GMM.apply)

    # Place of each assignment in its expert's queue: earlier assignments to the same expert.
    queue_position = routed.cumsum(dim=1).gather(2, expert_index.unsqueeze(-1)).squeeze(-1) - 1
    kept = queue_position < capacity  # [B, S*K]

    # Slot of each kept assignment in the flattened [E, C] expert buffer. Dropped ones point
    # at slot 0 here and get weight 0 in the combine.
    slot = torch.where(kept, expert_index * capacity + queue_position, 0)

    # Inverse map, slot -> token, by scattering token positions into the slots. Dropped
    # assignments all go to one extra trash slot that is cut off afterwards.
    num_slots = self.num_experts * capacity
    position = torch.arange(sequence_length * top_k, device=hidden_states.device) // top_k
    token_of_slot = torch.zeros(batch_size, num_slots + 1, dtype=torch.long, device=hidden_states.device)
    token_of_slot = token_of_slot.scatter(
        1, torch.where(kept, slot, num_slots), position.expand(batch_size, -1)
    )[:, :num_slots]
    # Expert e fills its first min(load, C) slots; the rest hold no token (they point at
    # token 0) and are zeroed.
    slot_filled = torch.arange(capacity, device=hidden_states.device) < self.expert_load.unsqueeze(-1)

    tokens = hidden_states.view(batch_size, sequence_length, hidden_dim)
    dispatched = _gather_rows(tokens, token_of_slot).view(batch_size, self.num_experts, capacity, hidden_dim)
    expert_output = expert_mlp(self, dispatched * slot_filled.unsqueeze(-1).to(dispatched.dtype))

    # Combine: every assignment reads its slot back; dropped ones are weighted by zero.
    gathered = _gather_rows(expert_output.reshape(batch_size, num_slots, hidden_dim), slot)
    weights = top_k_weights.view(batch_size, sequence_length * top_k) * kept
    weighted = gathered * weights.unsqueeze(-1)  # router weights are fp32: sum in fp32, as batched_mm
    output = weighted.view(batch_size, sequence_length, top_k, hidden_dim).sum(dim=2)
    output = output.view(num_tokens, hidden_dim).to(hidden_states.dtype)
    # A token with no kept choice passes its input through (the reference's semantics).
    any_kept = kept.view(num_tokens, top_k).any(dim=-1, keepdim=True)
    return torch.where(any_kept, output, hidden_states)


def expert_mlp(experts: torch.nn.Module, dispatched: torch.Tensor) -> torch.Tensor:
    """Every expert's gated MLP on its own slots: [B, E, C, H] -> [B, E, C, H]."""
    gate_up = torch.einsum("bech,eih->beci", _constrain(dispatched), experts.gate_up_proj)
    gated = _constrain(experts._apply_gate(gate_up))
    return _constrain(torch.einsum("beci,ehi->bech", gated, experts.down_proj))


def _gather_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source [B, N, H], index [B, M] -> [B, M, H], row index[b, m] of sequence b.

    torch.gather rather than source[arange(B)[:, None], index]: XLA's SPMD partitioner sees
    the batch dimension of torch_xla's gather as parallel and keeps it local to each shard,
    while advanced indexing makes it all-gather the source over the batch shards.
    """
    return source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))


def dropless_grouped_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    grouped_matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Dropless experts with a grouped matmul `grouped_matmul(lhs [m, k], rhs [G, k, n], sizes [G])`.

    On TPU that is torch_xla's Pallas gmm (megablox). Assignments are sorted by expert (stable,
    so each expert sees its tokens in order), multiplied group by group, then unsorted.
    Under SPMD the Pallas call needs a manual-sharding region around it (see torchprime's Gmm).
    """
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]
    expert_index = top_k_index.reshape(-1)
    order = torch.argsort(expert_index, stable=True)
    group_sizes = F.one_hot(expert_index, self.num_experts).sum(dim=0).to(torch.int32)
    sorted_tokens = hidden_states[order // top_k]
    gate_up = grouped_matmul(sorted_tokens, self.gate_up_proj.transpose(1, 2), group_sizes)
    sorted_output = grouped_matmul(self._apply_gate(gate_up), self.down_proj.transpose(1, 2), group_sizes)
    output = torch.empty_like(sorted_output).index_copy(0, order, sorted_output)
    weighted = output.view(num_tokens, top_k, hidden_dim) * top_k_weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(hidden_states.dtype)


def _fits_gmm_tiles(experts: torch.nn.Module, num_assignments: int) -> bool:
    # torch_xla's GMM tiles every dimension by 512 and needs the tiles to divide them;
    # true for Mixtral-8x7B/8x22B, not for debug-size models (they take the static path).
    tile = 512
    return all(dim % tile == 0 for dim in (experts.hidden_dim, experts.intermediate_dim, num_assignments))


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """HF's `load_balancing_loss_func` (no attention mask), without `torch.histc`, so it runs on XLA.

    All layers pooled: E * sum_e f_e * P_e, with f_e the fraction of all (layer, token) rows
    that route to expert e among their top-k (so sum_e f_e = K) and P_e the mean router
    probability of e. Routing before drops. Softmax in the logits' dtype, as HF.
    """
    routed_sum = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    probability_sum = torch.zeros_like(routed_sum)
    num_rows = 0
    for layer_logits in router_logits:
        probabilities = F.softmax(layer_logits, dim=-1)
        _, selected = torch.topk(probabilities, top_k, dim=-1)
        routed_sum = routed_sum + F.one_hot(selected, num_experts).sum(dim=(0, 1)).float()
        probability_sum = probability_sum + probabilities.float().sum(dim=0)
        num_rows += layer_logits.shape[0]
    return num_experts * torch.sum((routed_sum / num_rows) * (probability_sum / num_rows))


def router_metrics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Routing statistics of the last forward, as device tensors (no host sync here).

    - `moe/drop_fraction`: dropped / routed (token, choice) assignments over all layers;
      `moe/drop_fraction/layer_{i}` the same for the i-th MoE layer.
    - `moe/expert_load_max`, `moe/expert_load_mean`: "expert load" is the number of a
      sequence's tokens routed to an expert in one layer, before drops. Max and mean are over
      layers, sequences and experts; the mean is always S*K/E (perfect balance), so
      max / mean is the worst imbalance and max > capacity means that expert dropped tokens.

    Compute it every step right after the forward (a few tiny ops that join the step's
    graph) and move the values to the host only at log steps, inside a step closure.
    With gradient accumulation it describes the last micro-batch.
    """
    experts = [block.experts for block in moe_blocks(model)]
    metrics = {}
    dropped_total, routed_total, loads = 0, 0, []
    for layer, layer_experts in enumerate(experts):
        load = layer_experts.expert_load
        dropped = (load - load.clamp(max=layer_experts.capacity)).sum()
        routed = load.sum()
        metrics[f"moe/drop_fraction/layer_{layer}"] = dropped / routed
        dropped_total, routed_total = dropped_total + dropped, routed_total + routed
        loads.append(load)
    loads = torch.stack(loads).float()
    metrics["moe/drop_fraction"] = dropped_total / routed_total
    metrics["moe/expert_load_max"] = loads.max()
    metrics["moe/expert_load_mean"] = loads.mean()
    return metrics


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
