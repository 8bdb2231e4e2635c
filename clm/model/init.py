"""Random init bounded by one parameter, with values that do not depend on the mesh.

XLA's RNG keeps a sharded init equal to an unsharded one by generating the whole tensor's
random bits on every device, so N virtual devices on one host held N copies of the largest
parameter at once. Instead each parameter is generated once on the host, by transformers'
own `_init_weights` for its module, from torch's CPU generator (mt19937) seeded from
(seed, parameter name), then placed sharded and freed before the next. Same seed, same
values, whatever the mesh or device count.
"""

from __future__ import annotations

import hashlib

import torch

from clm.parallel.placement import place, place_replicated

# Parameters randomly initialised in this process: a pretrained start must leave it at 0
# (the load benchmark and tests read it).
initialized = {"parameters": 0}


def parameter_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def initialize_parameters(model, placements: dict, seed: int) -> int:
    """transformers' init of every parameter, one at a time; returns how many were initialised."""
    count = 0
    for name, module, kind, key in _direct_tensors(model, "_parameters"):
        host = _init_on_host(model, module, kind, key, parameter_seed(seed, name))
        place(getattr(module, key), placements[name], lambda index: host[index])
        del host
        count += 1
        initialized["parameters"] += 1
    return count


def initialize_buffers(model) -> None:
    """Non-persistent buffers (rotary inv_freq): computed, not random, and needed by every start."""
    for name, module, kind, key in _direct_tensors(model, "_buffers"):
        place_replicated(getattr(module, key), _init_on_host(model, module, kind, key, 0))


def _direct_tensors(model, kind: str):
    for module_name, module in model.named_modules():
        for key, tensor in getattr(module, kind).items():
            if tensor is not None:
                yield (f"{module_name}.{key}" if module_name else key), module, kind, key


def _init_on_host(model, module, kind: str, key: str, seed: int) -> torch.Tensor:
    """Run `_init_weights(module)` with `key` on the host and the module's other tensors on meta.

    transformers' init functions are no-ops on meta tensors, so only this tensor is computed.
    """
    saved = {k: dict(getattr(module, k)) for k in ("_parameters", "_buffers")}
    target = saved[kind][key]
    host = torch.full(target.shape, float("nan"), dtype=target.dtype)
    try:
        for k, tensors in saved.items():
            for name, tensor in tensors.items():
                if tensor is None:
                    continue
                stand_in = host if (k, name) == (kind, key) else torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
                getattr(module, k)[name] = torch.nn.Parameter(stand_in, tensor.requires_grad) if k == "_parameters" else stand_in
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model._init_weights(module)
    finally:
        for k, tensors in saved.items():
            getattr(module, k).update(tensors)
    if host.isnan().any():
        raise RuntimeError(f"{type(module).__name__}.{key}: transformers' _init_weights left it uninitialised")
    return host
