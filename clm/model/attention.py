"""Flash attention through transformers' attention interface: Pallas on TPU, SDPA elsewhere.

`model.flash_attention=true` selects FLASH_ATTENTION below. On a TPU it runs torch_xla's
Pallas flash attention kernel, told the mesh and the q/k/v partition spec so each device
runs the kernel on its own heads and rows (as the reference does). XLA's CPU backend has no
Pallas, so there the same entry point runs PyTorch SDPA, causal, with identical semantics.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.mixtral.modeling_mixtral import repeat_kv

from clm.runtime import on_tpu

# (transformers treats any name containing "flash" as a request for a hub kernel)
FLASH_ATTENTION = "clm_pallas"

# (mesh, partition spec of [batch, heads, sequence, head_dim]) set by the trainer.
_partitioning: tuple | None = None


def set_partitioning(mesh, qkv_spec: tuple | None) -> None:
    global _partitioning
    _partitioning = (mesh, qkv_spec) if mesh is not None else None


def configure(hf_config, flash_attention: bool) -> None:
    hf_config._attn_implementation = FLASH_ATTENTION if flash_attention else "sdpa"


def flash_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [B, Hq, S, d], key/value [B, Hkv, S, d] -> ([B, S, Hq, d], None); always causal.

    transformers builds no mask for an implementation it does not know, so attention_mask is None
    here and causality comes from the kernel (Pallas) or from SDPA's is_causal.
    """
    if not on_tpu(query):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    from torch_xla.experimental.custom_kernel import flash_attention

    # The Pallas kernel needs as many k/v heads as query heads.
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    mesh, spec = _partitioning or (None, None)
    output = flash_attention(query, key, value, causal=True, sm_scale=scaling, partition_spec=spec, mesh=mesh)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLASH_ATTENTION, flash_attention_forward)
