"""Build transformers' MixtralForCausalLM for XLA: config, MoE implementation, sharded weights (pretrained or random)."""

from __future__ import annotations

from types import MethodType

import torch
from omegaconf import DictConfig
from transformers import MixtralConfig, MixtralForCausalLM

from clm.errors import UserError
from clm.model import attention, init, moe, weights

def build_model(cfg: DictConfig, hf_config: MixtralConfig, place_parameters) -> MixtralForCausalLM:
    """The model, sharded on the XLA devices and ready to train: pretrained weights when
    model.name_or_path is set, else the random init. Never both.

    Created on the meta device; `place_parameters(model)` annotates every parameter's sharding
    and returns their placements; then each parameter is filled one at a time, every device
    receiving only its slice, so a full-size model never exists on one host.
    """
    import torch_xla

    # The config carries the architecture only (clm.model.config); what clm runs it with is set here.
    attention.configure(hf_config, cfg.model.flash_attention)
    moe.configure(hf_config, cfg.model.capacity_factor)
    dtype = getattr(torch, cfg.model.dtype)
    with torch.device("meta"):
        model = MixtralForCausalLM(hf_config).to(dtype)
    model.to_empty(device=torch_xla.device())
    placements = place_parameters(model)
    init.initialize_buffers(model)
    if cfg.model.name_or_path:
        weights.load(model, placements, weights.HubCheckpoint(cfg.model.name_or_path))
    else:
        init.initialize_parameters(model, placements, cfg.seed)
    moe.attach(model)
    if cfg.model.fsdp_config.xla_fsdp_grad_ckpt:
        checkpoint_layers(model, cfg.model.fsdp_config.fsdp_transformer_layer_cls_to_wrap)
    return model


def checkpoint_layers(model: torch.nn.Module, class_names) -> None:
    """Recompute each decoder layer in the backward pass (activation checkpointing).

    torch_xla's checkpoint adds the optimization barriers that stop XLA from merging the
    recomputation back into the forward (which would keep every activation after all), and
    a backward barrier on each layer's gradients keeps XLA from holding all of them at once.
    It is reentrant: the forward runs without autograd, so router logits recorded inside it
    would carry no graph and the load-balancing loss would silently train nothing. The
    checkpointed function therefore returns the layer's router logits as extra outputs,
    which do carry the graph, and they replace the recorded ones.
    """
    import torch_xla.distributed.spmd as xs

    layers = [m for m in model.modules() if type(m).__name__ in set(class_names)]
    if not layers:
        raise UserError(
            f"model.fsdp_config.fsdp_transformer_layer_cls_to_wrap={list(class_names)} matches no module; "
            "use ['MixtralDecoderLayer']"
        )
    for layer in layers:
        layer.uncheckpointed_forward = layer.forward
        # Bound to the layer, so torch_xla puts the layer's weights behind the barrier too.
        layer.run_checkpointed = MethodType(_run_layer, layer)
        layer.forward = MethodType(_checkpointed_forward, layer)
        xs.apply_backward_optimization_barrier(layer)


def _run_layer(layer, num_args: int, num_kwargs: int, *packed):
    args, keys, values = packed[:num_args], packed[num_args:num_args + num_kwargs], packed[num_args + num_kwargs:]
    hidden_states = layer.uncheckpointed_forward(*args, **dict(zip(keys, values)))
    return (hidden_states, *moe.router_logits(layer))


def _checkpointed_forward(layer, *args, **kwargs):
    from torch_xla.utils.checkpoint import checkpoint

    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*args, *kwargs.values())):
        return layer.uncheckpointed_forward(*args, **kwargs)  # eval: nothing to recompute
    # torch_xla's checkpoint takes positional arguments only.
    hidden_states, *router_logits = checkpoint(
        layer.run_checkpointed, len(args), len(kwargs), *args, *kwargs.keys(), *kwargs.values()
    )
    moe.set_router_logits(layer, tuple(router_logits))
    return hidden_states
