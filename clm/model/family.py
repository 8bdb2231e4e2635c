"""What clm reads from a transformers config, whatever the family calls it.

Plain field lookups (no model is built), so the planner and the pre-flight checks can use
them for a model that is not on this machine.
"""

from __future__ import annotations

# The number of routed experts, by the name each family gives it (Mixtral and gpt-oss,
# Qwen-MoE and OLMoE, DeepSeek).
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


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
