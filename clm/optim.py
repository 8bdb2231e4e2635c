"""Optimizer and the references' learning-rate schedules: NeMo's WarmupHoldPolicy and
CosineAnnealing (Mixtral), Megatron's OptimizerParamScheduler (gpt-oss-20b)."""

from __future__ import annotations

import inspect
import math

import torch
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, optimizer_class: type) -> torch.optim.Optimizer:
    """The `optimizer` knob's class as the engine provides it (Engine.optimizer_class: for
    ADAMW_TORCH_XLA torch_xla's syncfree AdamW on XLA, torch's AdamW on DTensor).

    Weight decay as the reference's code applies it: to every parameter. (Its no-decay name
    patterns, `bias` and `layer_norm.weight`, match no Mixtral parameter; docs/design.md.)
    weight_decay_norms_and_biases=false exempts biases and every 1-D parameter (norm
    weights), Megatron-LM's rule, which the Megatron-based references such as gpt_oss_20b use.
    """
    if cfg.weight_decay_norms_and_biases:
        groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    else:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            (no_decay if name.endswith("bias") or param.dim() < 2 else decay).append(param)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return optimizer_class(groups, lr=cfg.lr, **adam_options(cfg, optimizer_class))


def adam_options(cfg: DictConfig, optimizer_class: type) -> dict:
    """adam_beta1, adam_beta2 and adam_eps, for the optimizers that take betas and eps."""
    parameters = inspect.signature(optimizer_class).parameters
    if "betas" not in parameters or "eps" not in parameters:
        return {}
    return {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps}


def prime_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step with zero gradients at the base lr, before the scheduler exists.

    The reference does this (torch_xla's `prime_optimizer`) so that a checkpoint can be
    loaded into the optimizer's state; as a side effect AdamW's step count starts at 1, so
    the first real update uses step 2's bias correction (about 0.74x an unprimed first
    update with the default betas), and one decoupled weight decay of lr x wd is applied.
    A resumed run primes too and then overwrites the state with the checkpoint's.

    Plain PyTorch, for eager engines (DTensor: each zero gradient is sharded as its parameter);
    the XLA engine runs torch_xla's own (clm.engine.xla), which also syncs around the step.
    """
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the zero gradients must not linger into step 1


def warmup_steps(sched: DictConfig) -> int:
    if sched.name == "OptimizerParamScheduler":
        return sched.lr_warmup_iters
    return int(sched.warmup_ratio * sched.max_steps)


def decay_steps(sched: DictConfig) -> int:
    """The step at which the lr reaches min_lr (the decay's end, warmup included)."""
    if sched.name == "OptimizerParamScheduler" and sched.lr_decay_iters is not None:
        return sched.lr_decay_iters
    return sched.max_steps


def learning_rate(step: int, base_lr: float, sched: DictConfig, global_batch_size: int = 1) -> float:
    """The lr of optimizer step `step` (0-based, i.e. after `step` steps)."""
    if sched.name == "OptimizerParamScheduler":
        return megatron_learning_rate(step, base_lr, sched, global_batch_size)
    return nemo_learning_rate(step, base_lr, sched)


def megatron_learning_rate(step: int, max_lr: float, sched: DictConfig, global_batch_size: int) -> float:
    """OptimizerParamScheduler.get_lr after `step` steps, in its own arithmetic: Megatron counts
    the schedule in samples (iterations x global batch), which can round differently."""
    num_steps = step * global_batch_size
    warmup = sched.lr_warmup_iters * global_batch_size
    decay = decay_steps(sched) * global_batch_size
    init_lr, min_lr = sched.lr_warmup_init, sched.min_lr
    if warmup > 0 and num_steps <= warmup:
        return init_lr + ((max_lr - init_lr) * float(num_steps) / float(warmup))
    if sched.lr_decay_style == "constant":
        return max_lr
    if num_steps > decay:
        return min_lr
    decay_ratio = float(num_steps - warmup) / float(decay - warmup)
    if sched.lr_decay_style == "linear":
        coeff = 1.0 - decay_ratio
    else:  # cosine
        coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


def nemo_learning_rate(step: int, base_lr: float, sched: DictConfig) -> float:
    """The lr NeMo's scheduler gives for optimizer step `step` (0-based), with NeMo's branch order."""
    warmup = warmup_steps(sched)
    if warmup > 0 and step <= warmup:
        return base_lr * (step + 1) / (warmup + 1)
    if sched.name == "WarmupHoldPolicy":
        hold_end = sched.hold_steps + warmup if sched.hold_steps is not None else 0
        if warmup <= step < hold_end:
            return base_lr
        return sched.min_lr if step > sched.max_steps else base_lr
    # CosineAnnealing without constant steps: cosine from base_lr down to min_lr after warmup.
    if step > sched.max_steps:
        return sched.min_lr
    progress = (step - warmup) / (sched.max_steps - warmup)
    return (base_lr - sched.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)) + sched.min_lr


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> LambdaLR:
    # The lr stays a Python float in the param groups; XLA_NO_SPECIAL_SCALARS (clm.runtime)
    # makes it device data rather than a constant, so a new value never recompiles the step.
    return LambdaLR(optimizer, lambda step: learning_rate(step, cfg.lr, cfg.sched, cfg.global_train_batch_size) / cfg.lr)
