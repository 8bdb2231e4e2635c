"""The model plan: everything startup knows about the run's model, worked out and checked once.

`ModelPlan.from_config(cfg, mesh_shape)` reads the architecture (clm.model.config), opens the
pretrained directory (clm.model.weights.HubCheckpoint: config.json, index and safetensors
headers, each read once), builds transformers' model on the meta device once, and runs every
check of the model against the config, in this order, each a one-line UserError: the
architecture and max_position_embeddings, the pretrained tensors' names and shapes, the mesh
against heads and experts, MoE knobs on a dense model, the sharding rules against every
parameter, router_bias_update, the checkpointed layer classes. What it found stays on the
plan: the sharding of every parameter on the mesh, the attention implementation, the MoE
settings, and the model's facts (parameter count, FLOPs per token; clm.model.family).

Everything after the checks reads the plan rather than working it out again: the memory
planner and the pre-flight (clm.plan, whose smaller fallback runs are `replace`d plans of the
same meta model), the builder (clm.model.build.build_sharded_model), the run log's FLOPs per
token, the trainer, convert and the benchmarks. Plain PyTorch: nothing here touches a device.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PretrainedConfig

from clm import parallel
from clm.errors import UserError
from clm.model import attention, family, moe
from clm.model.config import load_model_config, meta_model
from clm.model.weights import HubCheckpoint
from clm.parallel.sharding import ParameterSharding

MODEL_DEFAULTS = Path(__file__).resolve().parents[1] / "conf" / "model" / "blank_model.yaml"


@dataclass(frozen=True, eq=False)
class ModelPlan:
    """The run's model, checked against its config and mesh; built by `from_config`."""

    cfg: DictConfig
    # The checked config, set up for clm's builder: no KV cache, no router-logit outputs
    # (clm records router logits itself; transformers' recording computes the aux loss with
    # torch.histc, which fails on XLA) and, for MoE models, clm's capacity experts.
    hf_config: PretrainedConfig
    checkpoint: HubCheckpoint | None  # model.name_or_path's directory, opened; None: random init
    meta_model: torch.nn.Module  # transformers' model on the meta device: names and shapes only
    mesh_shape: parallel.MeshShape
    shardings: list[ParameterSharding]  # every parameter and persistent buffer on the mesh
    attention: attention.Choice

    @classmethod
    def from_config(cls, cfg: DictConfig, mesh_shape: parallel.MeshShape, *, hf_config: PretrainedConfig | None = None,
                    checkpoint: HubCheckpoint | None = None) -> ModelPlan:
        """The plan of cfg.model on a mesh of `mesh_shape`, after every check (see the module
        docstring). `hf_config`: an architecture given in memory (tests) instead of cfg.model's,
        copied, never changed; `checkpoint`: model.name_or_path opened already (clm.convert)."""
        if checkpoint is None and cfg.model.name_or_path:
            checkpoint = HubCheckpoint(cfg.model.name_or_path)
        hf_config = copy.deepcopy(hf_config) if hf_config is not None else load_model_config(cfg, checkpoint)
        hf_config.use_cache = False
        hf_config.output_router_logits = False
        if family.is_moe(hf_config):
            hf_config._experts_implementation = moe.EXPERTS_IMPLEMENTATION
        model = meta_model(hf_config)
        if checkpoint is not None:
            checkpoint.check(model)

        parallel.check_model_fits_mesh(mesh_shape, hf_config)
        check_moe_knobs(cfg, hf_config)
        shardings = parallel.plan_model(model, cfg.sharding, mesh_shape)
        if cfg.model.router_bias_update and not any(hasattr(m, moe.CORRECTION_BIAS) for m in model.modules()):
            raise UserError(
                f"model.router_bias_update=true: {hf_config.model_type} has no routing correction bias "
                f"({moe.CORRECTION_BIAS}, as DeepSeek-V3 has); use model.router_bias_update=false"
            )
        if cfg.model.fsdp_config.xla_fsdp_grad_ckpt:
            check_checkpointed_layer_classes(model, cfg.model.fsdp_config.fsdp_transformer_layer_cls_to_wrap)
        choice = attention.select(model, cfg.model.flash_attention, cfg.max_length)
        return cls(cfg, hf_config, checkpoint, model, mesh_shape, shardings, choice)

    def replace(self, *, cfg: DictConfig | None = None, mesh_shape: parallel.MeshShape | None = None) -> ModelPlan:
        """The same model under other run settings or on another mesh (the pre-flight's smaller
        fallback runs): the config, meta model and checkpoint are this plan's, not rebuilt; what
        the settings and the mesh decide (shardings, attention) is worked out again. The checks
        of `from_config` are not rerun: such a plan is estimated, never built."""
        cfg = self.cfg if cfg is None else cfg
        mesh_shape = self.mesh_shape if mesh_shape is None else mesh_shape
        return dataclasses.replace(
            self, cfg=cfg, mesh_shape=mesh_shape,
            shardings=parallel.plan_model(self.meta_model, cfg.sharding, mesh_shape),
            attention=attention.select(self.meta_model, cfg.model.flash_attention, cfg.max_length))

    # ---- MoE settings
    @property
    def is_moe(self) -> bool:
        return family.is_moe(self.hf_config)

    @property
    def capacity_factor(self) -> float:
        return self.cfg.model.capacity_factor

    @property
    def router_bias_update_rate(self) -> float | None:
        """How far routing correction biases move after each step; None: they stay put."""
        return self.cfg.model.router_bias_update_rate if self.cfg.model.router_bias_update else None

    # ---- facts of the model
    @property
    def num_params(self) -> int:
        """Parameters, a tied one counted once (as the built model's `parameters()`)."""
        return sum(p.numel() for p in self.meta_model.parameters())

    @property
    def active_matmul_weights(self) -> float:
        return family.active_matmul_weights(self.hf_config)

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token at max_length, MaxText's convention (behind MFU)."""
        return family.training_flops_per_token(self.hf_config, self.cfg.max_length)

    @property
    def reference_flops_per_token(self) -> float:
        """The MLPerf reference's 6 x parameters x K / E."""
        return family.reference_flops_per_token(self.hf_config, self.num_params)


def check_moe_knobs(cfg: DictConfig, hf_config) -> None:
    """MoE knobs mean nothing on a dense model: say so rather than ignore them."""
    if family.is_moe(hf_config):
        return
    default = OmegaConf.load(MODEL_DEFAULTS).capacity_factor
    if cfg.model.capacity_factor != default:
        raise UserError(
            f"model.capacity_factor={cfg.model.capacity_factor}: {hf_config.model_type} is a dense model (no "
            f"experts); leave model.capacity_factor at its default ({default})"
        )
    if cfg.expert_parallelism > 1:
        raise UserError(
            f"expert_parallelism={cfg.expert_parallelism}: {hf_config.model_type} is a dense model (no experts); "
            "use expert_parallelism=1"
        )


def check_checkpointed_layer_classes(model, class_names) -> None:
    """The layers activation checkpointing recomputes are those of transformers' checkpointable
    layers (its GradientCheckpointingLayer: the decoder layers) whose class the reference's knob
    names: every name must be one of them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    available = sorted({type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)})
    unknown = [name for name in class_names if name not in available]
    if unknown or not class_names:
        raise UserError(
            f"model.fsdp_config.fsdp_transformer_layer_cls_to_wrap={list(class_names)}: "
            f"{type(model).__name__}'s checkpointable layers are {available}; use {available}"
        )
