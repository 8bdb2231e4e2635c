"""What clm reads from a transformers config, whatever the family calls it: experts, heads,
head dims, MLP widths, which layers are MoE, and the FLOPs per token they add up to.

Plain field lookups (no model is built), so the planner and the pre-flight checks can use
them for a model that is not on this machine.
"""

from __future__ import annotations

# The number of routed experts, by the name each family gives it (Mixtral and gpt-oss,
# Qwen-MoE and OLMoE, DeepSeek).
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
# Families whose MLP is up -> activation -> down (two matrices) rather than a gated
# (SwiGLU-style) gate/up -> down (three); transformers' configs do not say which.
UNGATED_MLP = {"gpt2", "gpt_neo", "gptj", "gpt_bigcode", "codegen", "opt", "bloom", "falcon", "gpt_neox", "phi"}


def num_experts(config) -> int:
    """Routed experts per MoE layer; 0 for a dense model."""
    for field in EXPERT_COUNT_FIELDS:
        value = getattr(config, field, None)
        if value:
            return int(value)
    return 0


def is_moe(config) -> bool:
    return num_experts(config) > 0


def expert_count_field(config) -> str:
    """The field holding the expert count, for messages that name it."""
    field = next((f for f in EXPERT_COUNT_FIELDS if getattr(config, f, None)), EXPERT_COUNT_FIELDS[0])
    return getattr(config, "attribute_map", {}).get(field, field)  # the family's own name, not an alias


def num_attention_heads(config) -> int:
    return int(config.num_attention_heads)


def num_key_value_heads(config) -> int:
    """K/V heads: GQA and MQA configs say so; the others (GPT-2) have one per query head."""
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def training_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token in MaxText's convention (docs/design.md "MFU"): 3x the forward's
    matmul FLOPs, 2 per multiply-add, causal attention counted once per attended key.

    6 * (active matmul weights + sum over layers of keys * Hq * (d_qk + d_v)), where a layer's
    query attends `keys` keys on average: S/2 (causal), or W - W^2/(2S) on sliding-window layers
    with window W < S (MaxText's count for local attention). See `active_matmul_weights` for what
    one token multiplies by; for Mixtral that is DESIGN's
    6 * (L * (H*E + 3*K*H*I + H*(Hq*d + 2*Hkv*d) + Hq*d*H + S*Hq*d) + H*V).
    """
    Hq = config.num_attention_heads
    d_qk, d_v = attention_head_dims(config)
    attention = sum(attended_keys(config, layer, seq_len) * Hq * (d_qk + d_v)
                    for layer in range(config.num_hidden_layers))
    return 6.0 * (active_matmul_weights(config) + attention)


def active_matmul_weights(config) -> float:
    """The weights one token is multiplied by in a forward pass: per layer the attention
    projections (MLA's low-rank ones for DeepSeek) and either the dense MLP or the router,
    K of the E routed experts and every shared expert; then the output head. Embedding
    lookups (the token embedding, GPT-2's learned positions) are not matmuls and count
    nothing; neither do biases and norms."""
    total = config.hidden_size * config.vocab_size  # the output head, tied or not
    projections = attention_projection_weights(config)
    for layer in range(config.num_hidden_layers):
        total += projections + mlp_weights(config, layer)
    return float(total)


def attention_head_dims(config) -> tuple[int, int]:
    """(query/key head dim, value head dim): MLA's qk_nope + qk_rope and v_head_dim, else head_dim."""
    if getattr(config, "kv_lora_rank", None):
        return config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return d, d


def attention_projection_weights(config) -> int:
    H, Hq = config.hidden_size, config.num_attention_heads
    d_qk, d_v = attention_head_dims(config)
    if getattr(config, "kv_lora_rank", None):  # MLA: low-rank query and key/value projections
        q_rank, kv_rank, rope, nope = (getattr(config, "q_lora_rank", None), config.kv_lora_rank,
                                       config.qk_rope_head_dim, config.qk_nope_head_dim)
        q = H * q_rank + q_rank * Hq * d_qk if q_rank else H * Hq * d_qk
        kv = H * (kv_rank + rope) + kv_rank * Hq * (nope + d_v)
        return q + kv + Hq * d_v * H
    Hkv = getattr(config, "num_key_value_heads", None) or Hq
    return H * (Hq * d_qk + 2 * Hkv * d_qk) + Hq * d_v * H


def is_moe_layer(config, layer: int) -> bool:
    """As the families' modeling code decides: DeepSeek's first_k_dense_replace dense layers,
    Qwen-MoE's mlp_only_layers and decoder_sparse_step; every layer of the other MoE families."""
    if not is_moe(config) or layer < (getattr(config, "first_k_dense_replace", None) or 0):
        return False
    if layer in (getattr(config, "mlp_only_layers", None) or ()):
        return False
    return (layer + 1) % (getattr(config, "decoder_sparse_step", None) or 1) == 0


def mlp_matrices(config) -> int:
    """Weight matrices of one MLP or expert: 3 gated (gate, up, down), 2 ungated (up, down)."""
    return 2 if config.model_type in UNGATED_MLP else 3


def dense_mlp_width(config) -> int:
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size


def expert_width(config) -> int:
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def shared_expert_width(config) -> int:
    """All shared experts of an MoE layer together: DeepSeek's n_shared_experts of expert width,
    Qwen2-MoE's one of shared_expert_intermediate_size; 0 for the others."""
    return ((getattr(config, "n_shared_experts", None) or 0) * expert_width(config)
            + (getattr(config, "shared_expert_intermediate_size", None) or 0))


def mlp_weights(config, layer: int) -> int:
    H, matrices = config.hidden_size, mlp_matrices(config)
    if not is_moe_layer(config, layer):
        return matrices * H * dense_mlp_width(config)
    E, K = num_experts(config), config.num_experts_per_tok
    total = H * E + K * matrices * H * expert_width(config)  # router, then K routed experts
    total += matrices * H * shared_expert_width(config)
    if getattr(config, "shared_expert_intermediate_size", None):
        total += H  # Qwen2-MoE's shared-expert gate, H -> 1
    return total


def attended_keys(config, layer: int, seq_len: int) -> float:
    """Keys a query attends on average in `layer` (MaxText's causal count)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = bool(window) and (layer_types[layer] == "sliding_attention" if layer_types else
                                getattr(config, "use_sliding_window", True))
    if sliding and window < seq_len:
        return window - window**2 / (2 * seq_len)
    return seq_len / 2


def reference_flops_per_token(config, num_params: int) -> float:
    """The MLPerf reference's estimate: 6 x all parameters x K / E (it counts embeddings, skips
    attention); 6 x all parameters for a dense model."""
    E = num_experts(config)
    return 6.0 * num_params * (config.num_experts_per_tok / E if E else 1.0)
