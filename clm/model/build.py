"""Build transformers' MixtralForCausalLM for XLA: config, MoE implementation, sharded weights (pretrained or random)."""

from __future__ import annotations

import json
from pathlib import Path
from types import MethodType

import torch
from omegaconf import DictConfig
from transformers import MixtralConfig, MixtralForCausalLM

from clm.errors import UserError
from clm.model import attention, init, moe, weights

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.name for p in CONFIGS_DIR.glob("*.json"))


def resolve_config_path(path: str) -> Path:
    """A file path as given, else one of the JSONs shipped in clm/model/configs."""
    for candidate in (Path(path).expanduser(), CONFIGS_DIR / path):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"model.config_path={path}: no such file; give a path to a model config JSON "
        f"or one of the shipped configs: {', '.join(shipped_configs())}"
    )


def load_model_config(cfg: DictConfig) -> MixtralConfig:
    """The transformers config for cfg.model, checked against the run's sequence length.

    With model.name_or_path set, the architecture is that directory's config.json (and its
    weights are checked against it, from the file headers); model.config_path, if also
    given, must agree with it.
    """
    fields, knob = _architecture_fields(cfg)
    hf_config = MixtralConfig.from_dict(fields)

    limit = hf_config.max_position_embeddings
    for key in ("max_length", "model.max_sequence_length"):
        value = cfg.max_length if key == "max_length" else cfg.model.max_sequence_length
        if value > limit:
            raise UserError(f"{key}={value} exceeds max_position_embeddings={limit} of {knob}; use at most {limit}")

    if cfg.model.name_or_path:
        weights.HubCheckpoint(cfg.model.name_or_path).check(hf_config)
    hf_config.use_cache = False
    attention.configure(hf_config, cfg.model.flash_attention)
    moe.configure(hf_config, cfg.model.capacity_factor)
    return hf_config


def _architecture_fields(cfg: DictConfig) -> tuple[dict, str]:
    pretrained = weights.HubCheckpoint(cfg.model.name_or_path).config_fields if cfg.model.name_or_path else None
    if not cfg.model.config_path:
        if pretrained is None:
            raise UserError(
                "model.config_path or model.name_or_path is required (a model JSON such as mixtral822.json, or a "
                "local directory of pretrained weights in the hub's layout)"
            )
        return pretrained, f"model.name_or_path={cfg.model.name_or_path}"
    knob = f"model.config_path={cfg.model.config_path}"
    try:
        fields = json.loads(resolve_config_path(cfg.model.config_path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{knob}: not valid JSON ({e})") from None
    if fields.get("model_type") != "mixtral":
        raise UserError(f"{knob}: model_type is {fields.get('model_type')!r}; clm trains Mixtral (model_type 'mixtral')")
    if pretrained is not None:
        differ = weights.config_fields_differ(fields, pretrained)
        if differ:
            raise UserError(
                f"{knob} and model.name_or_path={cfg.model.name_or_path} disagree on {', '.join(differ)}; "
                "set model.config_path=null to take the architecture from the pretrained directory"
            )
    return fields, knob


def build_model(cfg: DictConfig, hf_config: MixtralConfig, place_parameters) -> MixtralForCausalLM:
    """The model, sharded on the XLA devices and ready to train: pretrained weights when
    model.name_or_path is set, else the random init. Never both.

    Created on the meta device; `place_parameters(model)` annotates every parameter's sharding
    and returns their placements; then each parameter is filled one at a time, every device
    receiving only its slice, so a full-size model never exists on one host.
    """
    import torch_xla

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
