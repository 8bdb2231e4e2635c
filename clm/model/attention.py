"""Attention for each family through transformers' attention interface.

clm's flash path (`FLASH_ATTENTION`) runs torch_xla's Pallas flash attention kernel on a TPU,
told the mesh and the q/k/v partition spec so each device runs the kernel on its own heads
and rows (as the reference does). XLA's CPU backend has no Pallas, so there the same entry
point runs PyTorch SDPA, causal, with identical semantics.

The kernel computes plain causal attention with one head dimension for q, k and v, no
dropout. Where a family needs more (sliding windows shorter than the sequence, gpt-oss's
attention sinks, DeepSeek's multi-head latent attention with its wider q/k heads, attention
dropout, logit soft-capping), `select` picks transformers' SDPA for it, or its eager
attention where transformers has no SDPA path for the family (gpt-oss), and says so once.
Every variant keeps static shapes: masks are built from shapes, never from data.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from clm.runtime import on_tpu

# (transformers treats any name containing "flash" as a request for a hub kernel)
FLASH_ATTENTION = "clm_pallas"


@dataclass(frozen=True)
class Partitioning:
    """Where the kernel's q/k/v live: the model's mesh and their [batch, heads, seq, head_dim] spec."""

    mesh: object
    spec: tuple


@dataclass(frozen=True)
class Choice:
    implementation: str  # FLASH_ATTENTION, "sdpa" or "eager"
    reason: str  # one line for the log

    @property
    def flash(self) -> bool:
        return self.implementation == FLASH_ATTENTION


def flash_unsupported(model, max_length: int) -> list[str]:
    """What in this model the flash kernel cannot compute (empty: it can run every layer)."""
    config = model.config
    reasons = []
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = ("sliding_attention" in layer_types) if layer_types else getattr(config, "use_sliding_window", True)
    if sliding and window and window < max_length:  # a window as long as the sequence changes nothing
        reasons.append(f"a sliding window of {window} < max_length {max_length}")
    if any(hasattr(m, "sinks") for m in model.modules()):
        reasons.append("attention sinks")
    if getattr(config, "kv_lora_rank", None):
        reasons.append("multi-head latent attention (q/k and v head dims differ)")
    dropout = getattr(config, "attention_dropout", None) or getattr(config, "attn_pdrop", None) or 0.0
    if dropout > 0:
        reasons.append(f"attention dropout {dropout}")
    if getattr(config, "attn_logit_softcapping", None):
        reasons.append("logit soft-capping")
    if not type(model)._supports_attention_backend:
        reasons.append("no transformers attention-interface dispatch")
    return reasons


def select(model, flash_attention: bool, max_length: int) -> Choice:
    """The attention implementation for a (meta-device) model, and why."""
    family = model.config.model_type
    reasons = flash_unsupported(model, max_length)
    if flash_attention and not reasons:
        return Choice(FLASH_ATTENTION, f"{family}: clm flash attention (Pallas on TPU, SDPA elsewhere)")
    fallback = "sdpa" if type(model)._supports_sdpa else "eager"
    why = ("model.flash_attention=false" if not flash_attention else
           f"the flash kernel does not support {', '.join(reasons)}")
    if fallback == "eager":
        why += "; transformers has no SDPA path for it"
    return Choice(fallback, f"{family}: transformers' {fallback} attention ({why})")


def flash_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            partitioning: Partitioning | None = None, **kwargs):
    """query [B, Hq, S, d], key/value [B, Hkv, S, d] -> ([B, S, Hq, d], None); always causal.

    transformers builds no mask for an implementation it does not know, so attention_mask is None
    here and causality comes from the kernel (Pallas) or from SDPA's is_causal. `partitioning`
    comes from the model built for the mesh (clm.model.build.ShardedModel), through the
    keyword arguments transformers passes from the model's forward down to here.
    """
    if not on_tpu(query):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    from torch_xla.experimental.custom_kernel import flash_attention

    # The Pallas kernel needs as many k/v heads as query heads.
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    mesh, spec = (partitioning.mesh, partitioning.spec) if partitioning else (None, None)
    output = flash_attention(query, key, value, causal=True, sm_scale=scaling, partition_spec=spec, mesh=mesh)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLASH_ATTENTION, flash_attention_forward)
