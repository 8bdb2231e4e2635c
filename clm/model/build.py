"""Build any transformers decoder-only causal LM for a mesh: `build_sharded_model` -> ShardedModel.

The one way to build a sharded model (trainer, convert, benchmarks, tests), from the model
plan (clm.model.plan.ModelPlan), which has checked the config against the model and the mesh.
The model is transformers' own `AutoModelForCausalLM` class, created on the meta device and
moved to XLA empty; every parameter (and persistent buffer) is annotated with the sharding
the plan worked out from the family's rule table (clm/conf/sharding), then filled one at a
time, each device receiving only its slice, so a full-size model never exists on one host:
pretrained weights when model.name_or_path is set, else transformers' random init
(clm.model.init). Never both.

What the model needs for its mesh belongs to the ShardedModel, not to transformers' modules
or config, and not to module globals: the MoE settings and routing records (clm.model.moe.
Routing: capacity factor, the [B, E, C, *] buffers' sharding), the flash kernel's q/k/v
partition spec (passed down with the forward's keyword arguments), the logits' sharding.
transformers' extension points do the rest: the experts and attention interfaces (one
registered function each) and its gradient-checkpointing hook for activation checkpointing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import partial
from types import MethodType
from typing import Callable

import torch
import torch.nn.functional as F

from clm import parallel
from clm.model import attention, grouped_matmul, init, moe, weights
from clm.model.config import meta_model
from clm.model.plan import ModelPlan
from clm.parallel.placement import place, place_replicated

logger = logging.getLogger(__name__)


@dataclass
class LossTerms:
    """What one forward gives the trainer, as device tensors, over the whole global batch."""

    loss_sum: torch.Tensor  # next-token cross-entropy summed over the scored labels
    num_scored: torch.Tensor  # labels that are not ignored
    num_inputs: torch.Tensor  # input tokens (every input: inputs are never pad_token_id)
    aux_loss: torch.Tensor  # the family's load-balancing loss, unweighted (0 where it has none)
    aux_loss_coef: float  # its weight in the training loss (the family's router_aux_loss_coef; 0 if none)
    router_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # MoE models, in training

    @property
    def lm_loss(self) -> torch.Tensor:
        return self.loss_sum / self.num_scored

    @property
    def loss(self) -> torch.Tensor:
        """The training loss: the LM loss plus the weighted load-balancing loss."""
        return self.lm_loss + self.aux_loss_coef * self.aux_loss


class ShardedModel:
    """A transformers causal LM sharded on a mesh, with everything it needs for that mesh.

    `.module` is transformers' model (its parameters, state_dict and checkpoint names are
    transformers'); the trainer calls `loss_terms`, `clip_grad_norm` and, after each optimizer
    step, `update_router_bias`. Built by an engine (clm.engine): `build_sharded_model` below
    on XLA, where `annotate_logits` shards the logits and `forward_kwargs` carry the flash
    kernel's partitioning; the DTensor engine's subclass adds its processes' reductions.
    """

    def __init__(self, module, mesh, mesh_shape: parallel.MeshShape, routing: moe.Routing | None,
                 attention_choice: attention.Choice, router_bias_update_rate: float | None, *,
                 placements: dict | None = None, forward_kwargs: dict | None = None,
                 annotate_logits: Callable[[torch.Tensor], object] | None = None):
        self.module = module
        self.mesh = mesh
        self.mesh_shape = mesh_shape
        self.placements = placements or {}  # {name: clm.parallel.Placement} on XLA
        self.routing = routing
        self.attention = attention_choice
        self.router_bias_update_rate = router_bias_update_rate  # None: the correction bias stays put
        # Passed with every forward down to the attention function (transformers forwards its
        # keyword arguments to it).
        self.forward_kwargs = forward_kwargs or {}
        self.annotate_logits = annotate_logits
        self._step_load: torch.Tensor | None = None  # expert load summed over this step's micro-batches

    # ---- what a torch module offers, delegated
    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def state_dict(self):
        return self.module.state_dict()

    def train(self, mode: bool = True) -> ShardedModel:
        self.module.train(mode)
        return self

    def eval(self) -> ShardedModel:
        return self.train(False)

    @property
    def config(self):
        return self.module.config

    @property
    def is_moe(self) -> bool:
        return self.routing is not None

    # ---- forward and loss
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] (on XLA rows sharded over the data axes and vocab over tensor)."""
        logits = self.module(input_ids=input_ids, **self.forward_kwargs).logits
        if self.annotate_logits is not None:
            self.annotate_logits(logits)
        return logits

    def loss_terms(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> LossTerms:
        """Next-token loss terms of one batch. The labels are already shifted (labels[:, t] is
        position t's target; clm.data), `ignore_index` marks the positions not scored. Sums
        rather than a mean, so that eval weights every token of the validation set equally. In
        training, MoE models add the family's load-balancing loss and the router metrics, and
        accumulate the step's expert load."""
        logits = self(input_ids)
        labels = labels.reshape(-1)
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels, ignore_index=ignore_index,
                                   reduction="sum")
        terms = LossTerms(loss_sum, num_scored=(labels != ignore_index).sum(), num_inputs=(input_ids != ignore_index).sum(),
                          aux_loss=torch.zeros((), device=logits.device), aux_loss_coef=0.0)
        if self.routing is not None and self.module.training:
            aux = self.routing.load_balancing_loss()
            if aux is not None:
                terms.aux_loss, terms.aux_loss_coef = aux, self.routing.aux_loss.coefficient
            terms.router_metrics = self.routing.metrics()
            if self.router_bias_update_rate is not None:
                load = self.routing.expert_load()
                self._step_load = load if self._step_load is None else self._step_load + load
        return terms

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The total gradient norm before clipping; clips only when max_grad_norm > 0 (as the reference)."""
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in self.module.parameters() if p.grad is not None])

    def update_router_bias(self) -> None:
        """After an optimizer step: aux-loss-free balancing from the step's expert load
        (model.router_bias_update); nothing otherwise. Joins the step's graph, no host sync."""
        if self._step_load is not None:
            self.routing.update_correction_bias(self._step_load, self.router_bias_update_rate)
            self._step_load = None


# ------------------------------------------------------------------------------ building


def build_sharded_model(model_plan: ModelPlan) -> ShardedModel:
    """The model of a checked plan (clm.model.plan.ModelPlan) on its mesh, sharded, filled and ready to train."""
    import torch_xla
    import torch_xla.distributed.spmd as xs

    cfg, mesh_shape = model_plan.cfg, model_plan.mesh_shape
    # A meta model of its own, not the plan's: to_empty below moves this one onto the device in
    # place, while the plan's stays the description the planner and the checks read. Built from
    # the plan's checked config; the checks are not rerun.
    module = meta_model(model_plan.hf_config)
    module.set_attn_implementation(model_plan.attention.implementation)
    logger.info("attention: %s", model_plan.attention.reason)

    cast_parameters(module, getattr(torch, cfg.model.dtype))
    module.to_empty(device=torch_xla.device())
    module.tie_weights()  # to_empty gives every parameter its own storage, tied ones too

    mesh = parallel.build_mesh(mesh_shape)
    placements = parallel.shard_parameters(module, mesh, model_plan.shardings)

    def put(name, tensor, host):
        if name in placements:
            place(tensor, placements[name], lambda index: host[index])
        else:
            place_replicated(tensor, host)

    init.initialize_buffers(module, put)
    if model_plan.checkpoint is not None:
        weights.load(module, placements, model_plan.checkpoint)
    else:
        init.initialize_parameters(module, cfg.seed, put)

    routing = None
    if model_plan.is_moe:
        from torch_xla.distributed.spmd.xla_sharding import MarkShardingFunction

        spec = parallel.expert_activation_spec()
        batch_shards = mesh_shape.dcn * mesh_shape.fsdp

        def constrain(tensor):
            # Differentiable, so that the constraint holds in the backward pass too. A batch
            # the mesh cannot split evenly (never the trainer's) is left to XLA: an uneven
            # split of these buffers trips an assertion in XLA's SPMD partitioner.
            return MarkShardingFunction.apply(tensor, mesh, spec) if tensor.shape[0] % batch_shards == 0 else tensor

        routing = moe.Routing(module, model_plan.capacity_factor, constrain=constrain,
                              dropless=grouped_matmul.dropless_experts(module, model_plan.capacity_factor, mesh,
                                                                       mesh_shape))
    if cfg.model.fsdp_config.xla_fsdp_grad_ckpt:
        enable_activation_checkpointing(module, routing, cfg.model.fsdp_config.fsdp_transformer_layer_cls_to_wrap)
    # The flash kernel's q/k/v partitioning for this mesh, passed down with every forward.
    forward_kwargs = ({"partitioning": attention.Partitioning(mesh, parallel.attention_spec())}
                      if model_plan.attention.flash else {})

    def annotate_logits(logits):
        xs.mark_sharding(logits, mesh, parallel.logits_spec())

    return ShardedModel(module, mesh, mesh_shape, routing, model_plan.attention, model_plan.router_bias_update_rate,
                        placements=placements, forward_kwargs=forward_kwargs, annotate_logits=annotate_logits)


def cast_parameters(module, dtype: torch.dtype) -> None:
    """Parameters in `dtype`, except those the family keeps in fp32 whatever the dtype
    (`_keep_in_fp32_modules_strict`), as from_pretrained does. Buffers keep the dtype the
    model computes them in (rotary frequencies and DeepSeek's correction bias in fp32)."""
    keep = getattr(module, "_keep_in_fp32_modules_strict", None) or ()
    pattern = re.compile(rf"(^|\.)({'|'.join(map(re.escape, keep))})($|\.)") if keep else None
    for name, parameter in module.named_parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(torch.float32 if pattern and pattern.search(name) else dtype)


# ---------------------------------------------------------------- activation checkpointing


def enable_activation_checkpointing(module, routing: moe.Routing | None, class_names) -> None:
    """Recompute the decoder layers of the classes named (`class_names`) in the backward pass,
    through transformers' own hook (`_set_gradient_checkpointing` with torch_xla's checkpoint as
    the function).

    torch_xla's checkpoint adds the optimization barriers that stop XLA from merging the
    recomputation back into the forward (which would keep every activation after all), and
    a backward barrier on each layer's gradients keeps XLA from holding all of them at once.
    It supports only use_reentrant=True: the forward runs without autograd, so router logits
    recorded inside it would carry no graph and the load-balancing loss would silently train
    nothing. `_checkpoint` therefore returns the layer's router logits as extra outputs of
    the checkpointed function, which do carry the graph, and records those instead.
    """
    import torch_xla.distributed.spmd as xs

    for layer in checkpoint_layers(module, class_names, partial(_checkpoint, routing)):
        xs.apply_backward_optimization_barrier(layer)


def checkpoint_layers(module, class_names, function: Callable) -> list[torch.nn.Module]:
    """transformers' gradient-checkpointing hook with `function` as the checkpoint, on the decoder
    layers of the classes named (both engines); returns those layers. transformers checkpoints
    a layer's `forward`, so module hooks (FSDP2's) stay outside the recomputed region."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    module._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)
    layers = []
    for layer in module.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            # The hook turned it on for every checkpointable layer; the knob names the classes recomputed.
            layer.gradient_checkpointing = type(layer).__name__ in class_names
            if layer.gradient_checkpointing:
                layers.append(layer)
    return layers


def _checkpoint(routing: moe.Routing | None, layer_forward, *args):
    """transformers calls this with `partial(forward, layer, **kwargs)` and the layer's
    positional arguments; torch_xla's checkpoint takes positional arguments only."""
    from torch_xla.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return layer_forward(*args)  # nothing to recompute
    layers = [] if routing is None else routing.layers
    outputs_of = {}

    def run(*inputs):  # also what the backward pass recomputes
        before = [layer.router_logits for layer in layers]
        output = layer_forward(*inputs)
        # The MoE layers of this decoder layer: those whose router ran just now.
        ran = [layer for layer, logits in zip(layers, before) if layer.router_logits is not logits]
        outputs_of["ran"], outputs_of["tuple"] = ran, isinstance(output, tuple)
        output = output if isinstance(output, tuple) else (output,)
        outputs_of["count"] = len(output)
        return (*output, *(layer.router_logits for layer in ran))

    # Bound to the layer, so torch_xla puts the layer's weights behind the barrier too.
    owner = layer_forward.args[0] if isinstance(layer_forward, partial) and layer_forward.args else None
    function = MethodType(lambda _, *inputs: run(*inputs), owner) if isinstance(owner, torch.nn.Module) else run
    results = checkpoint(function, *args)
    results = results if isinstance(results, tuple) else (results,)
    count = outputs_of["count"]
    for layer, logits in zip(outputs_of["ran"], results[count:]):
        layer.router_logits = logits
    output = results[:count]
    return output if outputs_of["tuple"] else output[0]
