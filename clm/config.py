"""Config: Hydra composition of clm/conf, checked against a typed schema.

The YAML files under clm/conf hold every default (the reference's names and values); the
dataclasses below hold only the types. Composing through Hydra's compose API (rather than
@hydra.main) lets every bad override surface as one clm.errors.UserError line instead of
Hydra's multi-line report.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, get_args, get_type_hints

from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from clm.engine import backend
from clm.errors import UserError
from clm.parallel.mesh import mesh_shape

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"

SCHEDULERS = ("WarmupHoldPolicy", "CosineAnnealing", "OptimizerParamScheduler")
LR_DECAY_STYLES = ("cosine", "linear", "constant")  # OptimizerParamScheduler's (Megatron's lr_decay_style)
XLA_ADAMW = "ADAMW_TORCH_XLA"
DTYPES = ("float32", "bfloat16", "float16")
COMPILE_BACKENDS = ("inductor", "aot_eager")  # torch.compile backends of compile=true (backend=dtensor)
WANDB_MODES = ("offline", "online", "disabled")


# ---------------------------------------------------------------------------- schema


@dataclass
class FsdpConfig:
    fsdp_transformer_layer_cls_to_wrap: list[str] = MISSING
    xla_fsdp_grad_ckpt: bool = MISSING


@dataclass
class ModelConfig:
    config_path: Optional[str] = MISSING
    name_or_path: Optional[str] = MISSING
    tokenizer_name_or_path: Optional[str] = MISSING
    dtype: str = MISSING
    compute_dtype: Optional[str] = MISSING
    flash_attention: bool = MISSING
    capacity_factor: float = MISSING
    router_bias_update: bool = MISSING
    router_bias_update_rate: float = MISSING
    max_sequence_length: int = MISSING
    fsdp_config: FsdpConfig = field(default_factory=FsdpConfig)


@dataclass
class SchedConfig:
    name: str = MISSING
    warmup_ratio: float = 0.0
    hold_steps: Optional[int] = None
    max_steps: int = MISSING
    min_lr: float = 0.0
    # OptimizerParamScheduler (Megatron's names)
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    lr_warmup_init: float = 0.0


@dataclass
class DatasetConfig:
    dataset_name: str = MISSING
    dataset_config_name: Optional[str] = MISSING
    text_column: str = MISSING
    train_split: str = MISSING
    eval_split: str = MISSING
    train_dataset_path: Optional[str] = MISSING
    eval_dataset_path: Optional[str] = MISSING
    streaming: bool = MISSING
    num_proc: int = MISSING
    load_from_cache_file: bool = MISSING
    shuffle_buffer_size: int = MISSING
    # pre-tokenized sources (megatron)
    vocab_size: Optional[int] = None
    eod_id: Optional[int] = None
    eod_mask_loss: bool = False
    dataloader_type: str = "single"
    data_sharding: bool = True
    micro_batch_size: Optional[int] = None
    data_parallel_size: Optional[int] = None


@dataclass
class MLPerfConfig:
    benchmark: str = MISSING
    division: str = MISSING
    org: str = MISSING
    platform: Optional[str] = MISSING
    status: str = MISSING


@dataclass
class WandbConfig:
    mode: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    exp_name: str = MISSING
    seed: int = MISSING
    per_device_train_batch_size: int = MISSING
    global_train_batch_size: int = MISSING
    per_device_eval_batch_size: int = MISSING
    global_eval_batch_size: int = MISSING
    max_grad_norm: float = MISSING
    max_steps: int = MISSING
    pad_token_id: int = MISSING
    output_dir: str = MISSING
    run_dir: str = MISSING
    target_eval_loss: float = MISSING
    do_first_eval: bool = MISSING
    lr: float = MISSING
    gradient_accumulation_steps: int = MISSING
    max_length: int = MISSING
    n_eval_examples: Optional[int] = MISSING
    optimizer: str = MISSING
    prime_optimizer: bool = MISSING
    weight_decay: float = MISSING
    weight_decay_norms_and_biases: bool = MISSING
    adam_beta1: float = MISSING
    adam_beta2: float = MISSING
    adam_eps: float = MISSING
    eval_frequency: int = MISSING
    eval_samples_interval: Optional[int] = MISSING
    checkpoint_manager_path: Optional[str] = MISSING
    checkpoint_every: int = MISSING
    checkpoint_dir: str = MISSING
    checkpoints_to_keep: int = MISSING
    async_checkpoint: bool = MISSING
    resume: str = MISSING
    allow_config_change: bool = MISSING
    kill_switch_path: Optional[str] = MISSING
    shuffle: bool = MISSING
    backend: str = MISSING
    compile: bool = MISSING
    compile_backend: str = MISSING
    full_precision: bool = MISSING
    local_compile_cache_dir: Optional[str] = MISSING
    tensor_parallelism: int = MISSING
    expert_parallelism: int = MISSING
    num_slices: int = MISSING
    cache_local_dir: Optional[str] = MISSING
    xla_profile_step: int = MISSING
    xla_compile_analysis: bool = MISSING
    log_frequency: int = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    mlperf: MLPerfConfig = field(default_factory=MLPerfConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # parameter-name glob -> mesh axes per dimension (clm/conf/sharding)
    sharding: Dict[str, Any] = MISSING


# ------------------------------------------------------------------------- resolvers


def _register_resolvers(num_devices: Callable[[], int]) -> None:
    # The reference's resolvers, under the reference's names, so its YAML works unchanged.
    resolvers = {
        "path_join": lambda *parts: os.path.join(*map(str, parts)),
        "multiply": lambda x, y: x * y,
        "get_global_batch_size": lambda per_device: int(per_device) * num_devices(),
        "pkg_path": lambda rel: str(PACKAGE_DIR / rel),
        # `default` unless `value` is set, then null (model.config_path yields to model.name_or_path)
        "unless_set": lambda value, default: default if value in (None, "") else None,
    }
    for name, fn in resolvers.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


# --------------------------------------------------------------------------- loading


def is_known_optimizer(name: str) -> bool:
    import torch

    optimizer_class = getattr(torch.optim, name, None)
    return name == XLA_ADAMW or (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer))


def eval_frequency_for(max_length: int, global_train_batch_size: int) -> int:
    """The reference's eval cadence: every 24576 * 2048 tokens, in optimizer steps."""
    return math.ceil(24576 * 2048 / max_length / global_train_batch_size)


def eval_frequency_of_samples(samples: int, global_train_batch_size: int) -> int:
    """A cadence in training samples (the gpt-oss-20b reference's EVAL_SAMPLES_INTERVAL), in optimizer steps."""
    steps, remainder = divmod(samples, global_train_batch_size)
    if remainder or steps < 1:
        raise UserError(
            f"eval_samples_interval={samples} is not a whole number of steps at global_train_batch_size="
            f"{global_train_batch_size}; use a global batch that divides it, or a multiple of the global batch"
        )
    return steps


def load_config(overrides: list[str], num_devices: int | Callable[[str], int]) -> DictConfig:
    """Compose clm/conf with Hydra-style overrides, type-check, resolve and validate.

    num_devices is the runtime's device count, or a function of the engine (the resolved
    `backend` knob: xla or dtensor) returning it: it resolves the reference's
    `get_global_batch_size` (per-device batch x devices) and the divisibility checks. As a
    function it is called only after keys and types check out, so a typo is reported without
    waiting for the XLA runtime to start. `backend=auto` is resolved here to the engine that
    will run (clm.engine.backend), so the run's config.yaml and checkpoints name it.
    """
    engine = {}  # the resolved backend, once the keys have checked out
    count = functools.cache(lambda: num_devices(engine["backend"]) if callable(num_devices) else num_devices)
    _register_resolvers(count)
    overrides = [_as_append_if_group(o) for o in overrides]
    try:
        with initialize_config_module("clm.conf", version_base=None):
            composed = compose("config", overrides=overrides)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as e:
        raise UserError(_composition_error(e)) from None

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), composed)
        if cfg.backend not in backend.BACKENDS:
            raise UserError(f"backend={cfg.backend}: use one of {', '.join(backend.BACKENDS)}")
        cfg.backend = engine["backend"] = backend.resolve(cfg.backend)
        OmegaConf.resolve(cfg)
    except ConfigKeyError as e:
        raise UserError(_unknown_key_error(e)) from None
    except ValidationError as e:
        raise UserError(_type_error(e)) from None
    except OmegaConfBaseException as e:
        raise UserError(f"{e.full_key or 'config'}: {e.msg}") from None

    if cfg.eval_samples_interval is not None:
        cfg.eval_frequency = eval_frequency_of_samples(cfg.eval_samples_interval, cfg.global_train_batch_size)
    elif cfg.eval_frequency == -1:
        cfg.eval_frequency = eval_frequency_for(cfg.max_length, cfg.global_train_batch_size)
    _validate(cfg, count())
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _as_append_if_group(override: str) -> str:
    # The reference documents `+experiment=NAME`; accept the plain form too, since
    # `experiment` is not in the defaults list and Hydra would otherwise refuse it.
    if override.startswith("experiment="):
        return "+" + override
    # `+model=NAME` (a preset of clm/conf/model): `model` is in the defaults list, so
    # it is chosen there, not appended.
    if override.startswith("+model="):
        return override[1:]
    return override


def _validate(cfg: DictConfig, num_devices: int) -> None:
    def positive(key: str) -> None:
        if OmegaConf.select(cfg, key) < 1:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)}: must be a positive integer")

    for key in ("max_steps", "max_length", "gradient_accumulation_steps", "log_frequency",
                "per_device_train_batch_size", "per_device_eval_batch_size",
                "global_train_batch_size", "global_eval_batch_size", "eval_frequency", "sched.max_steps"):
        positive(key)
    if cfg.n_eval_examples is not None and cfg.n_eval_examples < 1:
        raise UserError(
            f"n_eval_examples={cfg.n_eval_examples}: must be a positive number of validation documents, "
            "or null for the whole validation set"
        )
    for key in ("checkpoint_every", "checkpoints_to_keep"):
        if cfg[key] < 0:
            what = "0 = only at the end and on preemption" if key == "checkpoint_every" else "0 = keep all"
            raise UserError(f"{key}={cfg[key]}: must be >= 0 ({what})")
    if not cfg.resume:
        raise UserError("resume is empty: use auto (the newest complete checkpoint), never, or a checkpoint path")
    if cfg.lr <= 0:
        raise UserError(f"lr={cfg.lr}: must be > 0")
    if cfg.wandb.mode not in WANDB_MODES:
        raise UserError(f"wandb.mode={cfg.wandb.mode}: use one of {', '.join(WANDB_MODES)}")
    if cfg.sched.name not in SCHEDULERS:
        raise UserError(f"sched.name={cfg.sched.name}: unknown scheduler; use one of {', '.join(SCHEDULERS)}")
    if cfg.sched.name in ("CosineAnnealing", "OptimizerParamScheduler") and cfg.sched.min_lr > cfg.lr:
        raise UserError(f"sched.min_lr={cfg.sched.min_lr} is above lr={cfg.lr}; {cfg.sched.name} decays from lr down to min_lr")
    if cfg.sched.name == "OptimizerParamScheduler":
        _validate_megatron_schedule(cfg)
    if not is_known_optimizer(cfg.optimizer):
        raise UserError(
            f"optimizer={cfg.optimizer}: unknown; use {XLA_ADAMW} or a torch.optim class name such as AdamW or SGD"
        )
    if cfg.model.dtype not in DTYPES:
        raise UserError(f"model.dtype={cfg.model.dtype}: use one of {', '.join(DTYPES)}")
    if cfg.model.compute_dtype is not None and cfg.model.compute_dtype not in DTYPES:
        raise UserError(f"model.compute_dtype={cfg.model.compute_dtype}: use one of {', '.join(DTYPES)}, or null "
                        "(compute in model.dtype)")
    if cfg.compile_backend not in COMPILE_BACKENDS:
        raise UserError(f"compile_backend={cfg.compile_backend}: use one of {', '.join(COMPILE_BACKENDS)}")
    if cfg.full_precision and cfg.model.dtype != "float32":
        raise UserError(f"full_precision=true needs model.dtype=float32 (got {cfg.model.dtype})")
    if not 0 <= cfg.sched.warmup_ratio <= 1:
        raise UserError(f"sched.warmup_ratio={cfg.sched.warmup_ratio}: must be within [0, 1]")
    if "://" in cfg.run_dir:
        # TensorBoard, tqdm and the profiler write with plain file I/O.
        raise UserError(
            f"run_dir={cfg.run_dir}: must be a local directory; set output_dir to a local path "
            "(on GKE, a Cloud Storage FUSE mount of the bucket)"
        )

    # The mesh must divide the devices, and every micro-batch must split over its data axes.
    slices = 1 if cfg.num_slices == -1 else cfg.num_slices  # -1: as the runtime reports, checked at start
    shape = mesh_shape(num_devices, cfg.tensor_parallelism, cfg.expert_parallelism, slices)
    accum, gbs = cfg.gradient_accumulation_steps, cfg.global_train_batch_size
    unit = accum * shape.data_parallel
    if gbs % unit:
        raise UserError(
            f"global_train_batch_size={gbs} must be divisible by gradient_accumulation_steps ({accum}) "
            f"x data-parallel devices ({shape.data_parallel}) = {unit}; try {max(unit, gbs // unit * unit)}"
        )
    if cfg.global_eval_batch_size % shape.data_parallel:
        raise UserError(
            f"global_eval_batch_size={cfg.global_eval_batch_size} must be divisible by the data-parallel "
            f"devices ({shape.data_parallel})"
        )


def _validate_megatron_schedule(cfg: DictConfig) -> None:
    sched = cfg.sched
    if sched.lr_decay_style not in LR_DECAY_STYLES:
        raise UserError(f"sched.lr_decay_style={sched.lr_decay_style}: use one of {', '.join(LR_DECAY_STYLES)}")
    decay_iters = sched.max_steps if sched.lr_decay_iters is None else sched.lr_decay_iters
    if not 0 <= sched.lr_warmup_iters < decay_iters:
        raise UserError(
            f"sched.lr_warmup_iters={sched.lr_warmup_iters}: must be >= 0 and below sched.lr_decay_iters={decay_iters} "
            "(the step where the decay ends, warmup included)"
        )
    if not 0 <= sched.lr_warmup_init <= cfg.lr:
        raise UserError(f"sched.lr_warmup_init={sched.lr_warmup_init}: must be within [0, lr={cfg.lr}]")


# ------------------------------------------------------------------ one-line messages


def _known_keys(full_key: str) -> list[str]:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node = OmegaConf.structured(Config)
    if parent:
        node = OmegaConf.select(node, parent)
    prefix = f"{parent}." if parent else ""
    return [prefix + k for k in node.keys()] if isinstance(node, DictConfig) else []


def _unknown_key_message(full_key: str) -> str:
    known = _known_keys(full_key)
    guess = difflib.get_close_matches(full_key, known, n=1)
    hint = f"did you mean '{guess[0]}'?" if guess else f"known keys here: {', '.join(known)}"
    return f"unknown config key '{full_key}': {hint}"


def _unknown_key_error(e: ConfigKeyError) -> str:
    return _unknown_key_message(e.full_key or str(e.key))


def _type_error(e: ValidationError) -> str:
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    typ = _schema_type(e.full_key)
    return f"{e.full_key}={e.value}: expected {kind.get(typ, getattr(typ, '__name__', str(typ)))}"


def _schema_type(full_key: str):
    cls = Config
    parts = full_key.split(".")
    for part in parts[:-1]:
        cls = get_type_hints(cls)[part]
    typ = get_type_hints(cls).get(parts[-1])
    args = [a for a in get_args(typ) if a is not type(None)]
    return args[0] if args else typ


def config_groups() -> dict[str, list[str]]:
    """Each config group under clm/conf and its options."""
    return {group.name: sorted(p.stem for p in group.glob("*.yaml"))
            for group in sorted(CONF_DIR.iterdir()) if group.is_dir() and any(group.glob("*.yaml"))}


def _composition_error(e: Exception) -> str:
    msg = str(e).strip()
    first = msg.splitlines()[0] if msg else type(e).__name__
    if "Could not override '" in first:
        key = first.split("'")[1]
        return _unknown_key_message(key)
    if "Could not find '" in first:
        # "In 'config': Could not find 'sched/Nope'" -> list the group's options.
        missing = first.split("Could not find '")[1].split("'")[0]
        group, _, option = missing.rpartition("/")
        options = config_groups().get(group, [])
        if options:
            return f"{group}={option}: no such option; choose one of {', '.join(options)}"
        return f"{missing}: no such config"
    if isinstance(e, OverrideParseException):
        return f"could not parse override: {first}"
    return first
