"""Tiny models of the eight families clm is tested on, written in their hub layout by
transformers' own `save_pretrained` (per-expert tensors where the family's hub checkpoints
have them), so a test starts from exactly what a user downloads.

Each config keeps its family's distinguishing features at toy size: GQA, qk-norm, shared
experts, dense layers among MoE layers, DeepSeek-V3's MLA and group-limited routing,
gpt-oss's alternating sliding window, attention sinks and biased experts, GPT-2's learned
positions. The vocabulary is Mixtral's (32000), so the tokenizer shipped in mistral-common
fits every family; `write_family` copies it into the directory as `tokenizer.model`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

VOCAB = 32000

# model_type -> the fields of its config.json that differ from transformers' defaults.
FAMILIES: dict[str, dict] = {
    "mixtral": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, max_position_embeddings=4096,
    ),
    "qwen3_moe": dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        router_aux_loss_coef=0.001, max_position_embeddings=4096,
    ),
    "olmoe": dict(
        hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01, max_position_embeddings=4096,
        pad_token_id=None, eos_token_id=2,
    ),
    "qwen2_moe": dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=96,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        mlp_only_layers=[1], router_aux_loss_coef=0.001, max_position_embeddings=4096,
    ),
    "deepseek_v3": dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, head_dim=8, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2,
    ),
    "gpt_oss": dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], router_aux_loss_coef=0.01, max_position_embeddings=4096,
    ),
    "llama": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=4096,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=2),
}

MOE_FAMILIES = tuple(name for name in FAMILIES if name not in ("llama", "gpt2"))


def family_config(model_type: str, **overrides):
    """The transformers config of a tiny `model_type` model."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{"vocab_size": VOCAB, **FAMILIES[model_type], **overrides})


def write_family(out: Path, model_type: str, seed: int = 0, dtype=torch.float32, tokenizer: bool = True,
                 max_shard_size: str = "200KB", **overrides) -> Path:
    """A randomly initialised tiny `model_type` model in its hub layout: config.json, sharded
    safetensors with their index (small shards, so loading crosses files), tokenizer.model."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, **overrides)).to(dtype)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer:
        from clm.data.tokenizer import mixtral_v1_tokenizer_path

        shutil.copy(mixtral_v1_tokenizer_path(), out / "tokenizer.model")
    return out
