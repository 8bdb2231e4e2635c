"""MLPerf Training 6.0's gpt_oss_20b model: the reference's Megatron GPT-MoE as a transformers model.

The benchmark's model is not Hugging Face's gpt-oss (no attention sinks, no expert biases, no
clamped SwiGLU). It is a Megatron-Core GPTModel configured by AMD-AGI/Primus
`primus/configs/models/megatron/gpt_oss_20B.yaml` on top of `deepseek_v2_base.yaml` and
`llama_base.yaml` (+ `language_model.yaml`), with the MLPerf overrides in mlcommons/training
`small_llm_moe_pretraining/primus/conf/gpt_oss_20B-pretrain.yaml` (later files win).

transformers' Mellum (`model_type: mellum`, new in transformers 5) is that architecture
module for module: Qwen3-MoE's attention (RMSNorm on each head's q and k), router (softmax,
top-k, renormalised) and fused SwiGLU experts, with a per-layer `layer_types` that gives each
layer a full or a sliding-window mask. This module registers `mlperf_gpt_oss`, Mellum's config
and modules unchanged, through transformers' own extension points (AutoConfig.register,
AutoModelForCausalLM.register, register_checkpoint_conversion_mapping), for one reason:
Megatron's initialisation. Megatron draws every weight from N(0, init_method_std) except the
two output projections of each layer (attention `linear_proj`, experts' `linear_fc2`), which
get `output_layer_init_method = scaled_init_method_normal(init_method_std, num_layers)`:
N(0, 0.008 / sqrt(2 * 24)); transformers' Mellum draws them with the plain std. Checkpoints
keep Mellum's hub layout (per-expert tensors): set `model_type: mellum` in an exported
config.json to load it in transformers without clm.

Field by field (clm/model/configs/mlperf_gpt_oss_20b.json; P = Primus config, M = the MLPerf
override; "Megatron" = Megatron-LM's default where no file sets the key):

| transformers field | value | reference key (file) |
| --- | --- | --- |
| num_hidden_layers | 24 | num_layers (M, P gpt_oss_20B) |
| hidden_size | 2880 | hidden_size (M, P) |
| num_attention_heads | 64 | num_attention_heads (M, P) |
| head_dim | 64 | kv_channels (P gpt_oss_20B; qk_head_dim 128 is MLA-only, multi_latent_attention false) |
| num_key_value_heads | 8 | num_query_groups (M, P), group_query_attention true (P) |
| num_local_experts | 32 | num_experts (M, P) |
| num_experts_per_tok | 4 | moe_router_topk (P gpt_oss_20B) |
| moe_intermediate_size | 2880 | moe_ffn_hidden_size (M, P); every layer MoE: moe_layer_freq 1 (M, P) |
| intermediate_size | 2880 | ffn_hidden_size (M); unused, no dense layer |
| mlp_layer_types | 24 x sparse | moe_layer_freq 1 |
| norm_topk_prob | true | moe_router_pre_softmax false, score_function softmax (M): softmax over the top-k logits, which equals a softmax over all then renormalised over the top k |
| router_aux_loss_coef | 0.0 | moe_aux_loss_coeff 0.0, moe_router_load_balancing_type none (M) |
| (no shared expert) | | moe_shared_expert_intermediate_size null (M; P sets 2880) |
| hidden_act | silu (SwiGLU) | swiglu true (llama_base), activation_func swiglu (M) |
| attention_bias | false | add_bias_linear false, add_qkv_bias false (llama_base, language_model) |
| rms_norm_eps | 1e-6 | norm_epsilon 1.0e-6 (M, deepseek_v2_base); normalization RMSNorm (llama_base); M's layernorm_epsilon 1e-05 is no key of the RCP logs' Megatron-LM (README) |
| (q_norm, k_norm) | RMSNorm over head_dim | qk_layernorm true (deepseek_v2_base) |
| tie_word_embeddings | false | untie_embeddings_and_output_weights true (llama_base) |
| rope_parameters | default RoPE, theta 150000, both layer types | position_embedding_type rope, rotary_base 150000 (M); no scaling: use_rope_scaling false (language_model), rotary_scaling_factor/mscale are MLA/YaRN-only |
| layer_types | sliding, full, sliding, ... | window_attn_skip_freq [1, 0, 1, 0, ...] (M): 1 = sliding window on Megatron's 1-based layer 1, 3, ... |
| sliding_window | 129 | window_size [128, 0] (M): 128 past tokens and the token itself; transformers' window counts the token itself |
| vocab_size | 128256 | the Llama 3.1 tokenizer (M tokenizer_model); make_vocab_size_divisible_by 128 pads nothing |
| max_position_embeddings | 131072 | max_position_embeddings (M) |
| initializer_range | 0.008 | init_method_std 0.008 (M); output projections scaled as above |
| attention_dropout | 0.0 | attention_dropout, hidden_dropout 0.0 (M) |

Where this code differs from Megatron's (README "gpt-oss-20b (MLPerf Training 6.0)" lists the
run-level differences):
- The router's logits are computed in the model's dtype (bf16 in the benchmark) and the
  softmax in fp32; the reference's AMD config computes the logits in fp32
  (moe_router_dtype fp32), its NVIDIA config in bf16 (moe_router_dtype null), as here.
- The router weights multiply the expert outputs after the down projection; Megatron
  multiplies the activations before it (the same product, rounded differently).
- RMSNorm multiplies its weight in the input dtype after normalising in fp32 (transformers');
  Transformer Engine's fused norm keeps fp32 through the multiply.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.mellum.configuration_mellum import MellumConfig
from transformers.models.mellum.modeling_mellum import MellumAttention, MellumExperts, MellumForCausalLM, MellumModel

MODEL_TYPE = "mlperf_gpt_oss"


class MlperfGptOssConfig(MellumConfig):
    model_type = MODEL_TYPE


class _MegatronInit:
    """Megatron's init: N(0, initializer_range) for every weight (transformers' Mellum init),
    then the output projections again with std initializer_range / sqrt(2 * num_hidden_layers).

    transformers initialises children before parents (clm.model.init does the same), so the
    attention and experts modules redraw the tensors their children drew with the plain std."""

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips parameterless modules of "custom code" (classes outside its
        # package) as already initialised; the attention module, which redraws o_proj, is one.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range / math.sqrt(2.0 * self.config.num_hidden_layers)
        if isinstance(module, MellumAttention):
            init.normal_(module.o_proj.weight, mean=0.0, std=std)
        elif isinstance(module, MellumExperts):
            init.normal_(module.down_proj, mean=0.0, std=std)


class MlperfGptOssModel(_MegatronInit, MellumModel):
    config_class = MlperfGptOssConfig


class MlperfGptOssForCausalLM(_MegatronInit, MellumForCausalLM):
    config_class = MlperfGptOssConfig

    def __init__(self, config: MlperfGptOssConfig):
        super().__init__(config)
        # transformers initialises a sub-model with its own class's _init_weights.
        self.model = MlperfGptOssModel(config)
        self.post_init()


AutoConfig.register(MODEL_TYPE, MlperfGptOssConfig)
AutoModelForCausalLM.register(MlperfGptOssConfig, MlperfGptOssForCausalLM)
register_checkpoint_conversion_mapping(MODEL_TYPE, get_checkpoint_conversion_mapping("mellum"))
