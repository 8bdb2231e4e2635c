"""The model's architecture: a transformers config of any decoder-only causal LM.

From `model.config_path` (a config.json of any architecture: a file, or one of the JSONs
shipped in clm/model/configs) or `model.name_or_path` (a local directory in the hub's
layout: its config.json). The config carries the architecture only; what clm does with it
(capacity factor, attention kernel, sharding) belongs to the model built from it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import PretrainedConfig

from clm.errors import UserError
from clm.model import mlperf_gpt_oss  # noqa: F401  (registers model_type mlperf_gpt_oss with transformers)
from clm.model import weights

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# Fields of config.json that say nothing about the architecture.
NOT_ARCHITECTURE = {"architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                    "output_router_logits", "bos_token_id", "eos_token_id", "pad_token_id"}


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


def load_model_config(cfg: DictConfig, checkpoint: weights.HubCheckpoint | None = None) -> PretrainedConfig:
    """The transformers config for cfg.model, checked against the run's sequence length.

    With model.name_or_path set, the architecture is that directory's config.json (`checkpoint`,
    the directory opened already, else opened here); model.config_path, if also given, must agree
    with it. Its weights are checked against the model of this config by the model plan
    (clm.model.plan), which builds that model once for every check.
    """
    if checkpoint is None and cfg.model.name_or_path:
        checkpoint = weights.HubCheckpoint(cfg.model.name_or_path)
    fields, knob = _architecture_fields(cfg, checkpoint)
    hf_config = config_from_fields(fields, knob)

    limit = getattr(hf_config, "max_position_embeddings", None)
    for key in ("max_length", "model.max_sequence_length"):
        value = cfg.max_length if key == "max_length" else cfg.model.max_sequence_length
        if limit is not None and value > limit:
            raise UserError(f"{key}={value} exceeds max_position_embeddings={limit} of {knob}; use at most {limit}")
    hf_config.use_cache = False
    return hf_config


def meta_model(hf_config) -> torch.nn.Module:
    """transformers' model of the config on the meta device: names and shapes, nothing
    allocated; in fp32 whatever the config's dtype (the builder casts the parameters to
    model.dtype), and from a copy of the config, since from_config writes into it (dtype)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), dtype=torch.float32)


def config_from_fields(fields: dict, knob: str) -> PretrainedConfig:
    """The transformers config of a config.json's fields, if it is a decoder-only causal LM.

    What the model is decides, not which auto classes list its model_type:
    - `is_encoder_decoder` (T5, BART, Whisper, ...) is a seq2seq model;
    - a model_type without a causal-LM class in transformers (ViT, CLIP, ...) is not a language model;
    - BERT-like encoders (BERT, RoBERTa, ELECTRA, ...) also have causal-LM classes (the encoder run
      with a causal mask, `is_decoder=True`), but what they are is a bidirectional encoder
      pretrained with masked LM: a model_type transformers has a masked-LM class for is an encoder
      unless its config says `is_decoder: true`, and so is a config whose `architectures` names only
      masked-LM classes.
    """
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = fields.get("model_type")
    architecture = ", ".join(fields.get("architectures") or []) or model_type
    if not model_type:
        raise UserError(f"{knob}: config.json has no model_type; clm needs a transformers config.json "
                        "(model_type such as 'mixtral', 'qwen3_moe', 'llama')")
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{knob}: model_type {model_type!r} is not an architecture this transformers knows "
                        "(clm runs no remote code); use a decoder-only causal LM such as mixtral, qwen3_moe, "
                        "deepseek_v3, gpt_oss, llama or gpt2")
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as e:  # transformers' own validation: a field of the wrong type or value
        raise UserError(f"{knob}: transformers rejects this {model_type} config ({' '.join(str(e).split())})") from None
    if getattr(hf_config, "is_encoder_decoder", False):
        raise UserError(f"{knob}: {architecture} is an encoder-decoder (seq2seq) model; clm trains decoder-only "
                        "causal LMs")
    masked_lm_classes = set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())
    only_masked_lm = bool(fields.get("architectures")) and all(
        a in masked_lm_classes or a.endswith("ForMaskedLM") for a in fields["architectures"])
    encoder_type = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(hf_config, "is_decoder", False)
    # (the mapping, not its names: it holds the models registered through AutoModelForCausalLM.register too)
    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING or encoder_type or only_masked_lm:
        kind = "an encoder" if encoder_type or only_masked_lm else "not a causal language model in transformers"
        raise UserError(f"{knob}: {architecture} is {kind}; clm trains decoder-only causal LMs "
                        "(e.g. mixtral, qwen3_moe, deepseek_v3, gpt_oss, llama, gpt2)")
    return hf_config


def config_fields_differ(a: dict, b: dict) -> list[str]:
    """Architecture fields on which two config.json dicts disagree (after transformers' defaults)."""
    from transformers import CONFIG_MAPPING

    if a.get("model_type") != b.get("model_type"):
        return ["model_type"]
    config_class = CONFIG_MAPPING[a["model_type"]]
    da, db = config_class.from_dict(a).to_dict(), config_class.from_dict(b).to_dict()
    return sorted(k for k in da.keys() | db.keys() if k not in NOT_ARCHITECTURE and da.get(k) != db.get(k))


def _architecture_fields(cfg: DictConfig, checkpoint: weights.HubCheckpoint | None) -> tuple[dict, str]:
    pretrained = checkpoint.config_fields if checkpoint is not None else None
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
    if not isinstance(fields, dict):
        raise UserError(f"{knob}: not a config JSON object")
    if pretrained is not None:
        differ = config_fields_differ(fields, pretrained)
        if differ:
            raise UserError(
                f"{knob} and model.name_or_path={cfg.model.name_or_path} disagree on {', '.join(differ)}; "
                "set model.config_path=null to take the architecture from the pretrained directory"
            )
    return fields, knob
