"""Random init bounded by one parameter, with values that do not depend on the mesh.

XLA's RNG keeps a sharded init equal to an unsharded one by generating the whole tensor's
random bits on every device, so N virtual devices on one host held N copies of the largest
parameter at once. Instead each parameter is generated once on the host by transformers'
own `_init_weights`, from torch's CPU generator (mt19937) seeded from (seed, parameter name),
then handed to the engine's `put` (placed sharded on XLA, its shard taken on DTensor) and freed
before the next. Same seed, same values, whatever the mesh, the device count or the engine.

transformers initialises a model bottom-up (`initialize_weights`: children, then their
parent), and some families' parents re-initialise a child's tensor (GPT-2 scales its residual
projections by 1/sqrt(2 * layers) from the attention and MLP modules). So each tensor gets
`_init_weights` of its owner, then of every ancestor, while every other tensor of the model
is a meta stand-in: transformers' init functions are no-ops on meta tensors, so only this
tensor is computed.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable

import torch

# put(name, model tensor, host values): fill the model's tensor (sharded or not) from the host's
# full tensor, keeping only what this process's devices hold.
Put = Callable[[str, torch.Tensor, torch.Tensor], None]

# Parameters randomly initialised in this process: a pretrained start must leave it at 0
# (the load benchmark and tests read it).
initialized = {"parameters": 0}


def parameter_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def initialize_parameters(model, seed: int, put: Put) -> int:
    """transformers' init of every parameter, one at a time; returns how many were initialised."""
    count = 0
    with _all_on_meta(model) as slots:
        for name, chain, key, tensor in slots["_parameters"]:
            host = _init_on_host(model, chain, "_parameters", key, tensor, parameter_seed(seed, name))
            put(name, tensor, host)
            del host
            count += 1
            initialized["parameters"] += 1
    return count


def initialize_buffers(model, put: Put) -> None:
    """Buffers: computed, not random (rotary inv_freq, DeepSeek's zero correction bias), and
    needed by every start."""
    with _all_on_meta(model) as slots:
        for name, chain, key, tensor in slots["_buffers"]:
            put(name, tensor, _init_on_host(model, chain, "_buffers", key, tensor, 0))


@contextlib.contextmanager
def _all_on_meta(model):
    """Every parameter and buffer of `model` replaced by a meta stand-in, restored on exit.

    Yields {"_parameters" | "_buffers": [(name, [owner, parent, ..., root], key, real tensor)]},
    each tensor once (a tied parameter under its first name).
    """
    modules = dict(model.named_modules())
    saved = []
    slots = {"_parameters": [], "_buffers": []}
    seen = set()
    try:
        for path, module in modules.items():
            chain = [modules[".".join(path.split(".")[:i])] for i in range(path.count(".") + 1 if path else 0, -1, -1)]
            for kind in slots:
                tensors = getattr(module, kind)
                for key, tensor in list(tensors.items()):
                    if tensor is None:
                        continue
                    saved.append((tensors, key, tensor))
                    stand_in = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
                    tensors[key] = torch.nn.Parameter(stand_in, tensor.requires_grad) if kind == "_parameters" else stand_in
                    if id(tensor) not in seen:
                        seen.add(id(tensor))
                        slots[kind].append((f"{path}.{key}" if path else key, chain, key, tensor))
        yield slots
    finally:
        for tensors, key, tensor in saved:
            tensors[key] = tensor


def _init_on_host(model, chain: list, kind: str, key: str, target: torch.Tensor, seed: int) -> torch.Tensor:
    """Run `_init_weights` of the owner and each ancestor with `key` of the owner on the host."""
    owner = chain[0]
    tensors = getattr(owner, kind)
    stand_in = tensors[key]
    host = torch.full(target.shape, float("nan"), dtype=target.dtype)
    tensors[key] = torch.nn.Parameter(host, target.requires_grad) if kind == "_parameters" else host
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in chain:
                model._init_weights(module)
    finally:
        tensors[key] = stand_in
    if host.isnan().any():
        raise RuntimeError(f"{type(owner).__name__}.{key}: transformers' _init_weights left it uninitialised")
    return host
