"""A random Mixtral written in the hub's own layout (as mistralai/Mixtral-8x22B-v0.1 ships it):
per-expert w1/w2/w3 under block_sparse_moe, split over several safetensors files with an index.

Written with `safetensors` directly and hub names spelled out here, independently of
clm.model.weights, so that a naming mistake there cannot cancel out against the writer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def hub_tensors(fields: dict, seed: int = 0, dtype=torch.float32):
    """(name, tensor) in the hub's order, one at a time (a 2 GB model never sits in memory)."""
    H, I, V = fields["hidden_size"], fields["intermediate_size"], fields["vocab_size"]
    Hq, Hkv, E = fields["num_attention_heads"], fields["num_key_value_heads"], fields["num_local_experts"]
    d = fields.get("head_dim") or H // Hq
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.05).to(dtype)

    yield "model.embed_tokens.weight", rand(V, H)
    for i in range(fields["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (1 + rand(H)).to(dtype)
        yield p + "self_attn.q_proj.weight", rand(Hq * d, H)
        yield p + "self_attn.k_proj.weight", rand(Hkv * d, H)
        yield p + "self_attn.v_proj.weight", rand(Hkv * d, H)
        yield p + "self_attn.o_proj.weight", rand(H, Hq * d)
        yield p + "block_sparse_moe.gate.weight", rand(E, H)
        for e in range(E):
            yield p + f"block_sparse_moe.experts.{e}.w1.weight", rand(I, H)
            yield p + f"block_sparse_moe.experts.{e}.w2.weight", rand(H, I)
            yield p + f"block_sparse_moe.experts.{e}.w3.weight", rand(I, H)
        yield p + "post_attention_layernorm.weight", (1 + rand(H)).to(dtype)
    yield "model.norm.weight", (1 + rand(H)).to(dtype)
    yield "lm_head.weight", rand(V, H)


def write_hub_checkpoint(out: Path, fields: dict, num_files: int = 3, seed: int = 0, dtype=torch.float32,
                         tokenizer: bool = True) -> Path:
    """config.json, model-0000i-of-0000N.safetensors (about equal sizes), the index, tokenizer.model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {name: t.numel() for name, t in hub_tensors(fields, seed, torch.float32)}
    element = torch.tensor([], dtype=dtype).element_size()
    total = sum(sizes.values()) * element
    # A tensor goes to the file its middle byte falls in: files of about equal size.
    names = [f"model-{i + 1:05d}-of-{num_files:05d}.safetensors" for i in range(num_files)]
    weight_map, offset = {}, 0
    for name, numel in sizes.items():
        weight_map[name] = names[min(num_files - 1, int((offset + numel * element / 2) * num_files // total))]
        offset += numel * element
    assert len(set(weight_map.values())) == num_files, "too few tensors for that many files"
    batch = {}
    for name, tensor in hub_tensors(fields, seed, dtype):
        if batch and weight_map[name] != weight_map[next(iter(batch))]:
            save_file(batch, out / weight_map[next(iter(batch))], metadata={"format": "pt"})
            batch = {}
        batch[name] = tensor
    save_file(batch, out / weight_map[next(iter(batch))], metadata={"format": "pt"})
    index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(fields | {"torch_dtype": str(dtype).split(".")[1]}, indent=2))
    if tokenizer:
        from clm.data.tokenizer import mixtral_v1_tokenizer_path

        shutil.copy(mixtral_v1_tokenizer_path(), out / "tokenizer.model")
    return out
