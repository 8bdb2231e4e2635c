"""MLPerf Training 6.0's gpt_oss_20b: the model against the reference's fields, the presets, and
a tiny-scale run on Megatron indexed data whose log the official 6.0.0 checker judges."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_xla

from clm.config import load_config
from clm.model.config import load_model_config

REPO = Path(__file__).resolve().parents[1]
EOD = 128001  # the Llama 3.1 tokenizer's <|end_of_text|> (dataset c4_llama31)


def reference_parameter_count() -> int:
    """From the reference's keys, by hand (Primus gpt_oss_20B.yaml + the MLPerf override):
    num_layers 24, hidden_size 2880, num_attention_heads 64, kv_channels 64, num_query_groups 8,
    num_experts 32, moe_ffn_hidden_size 2880 (SwiGLU: gate, up, down), qk_layernorm over
    kv_channels, RMSNorm (weight only), add_bias_linear false, no shared expert, untied output
    layer, Llama 3.1's 128256 ids (make_vocab_size_divisible_by 128 pads nothing)."""
    layers, hidden, heads, head_dim, groups, experts, ffn, vocab = 24, 2880, 64, 64, 8, 32, 2880, 128256
    attention = hidden * heads * head_dim * 2 + hidden * groups * head_dim * 2 + 2 * head_dim  # q, o, k, v; q/k norms
    moe = experts * 3 * hidden * ffn + experts * hidden  # experts; router
    per_layer = attention + moe + 2 * hidden  # input and pre-MLP norms
    return layers * per_layer + hidden + 2 * vocab * hidden  # final norm; embedding and output layer


def test_plan_prints_the_reference_parameter_count(capsys):
    from clm.model.config import meta_model
    from clm.plan import main

    expected = reference_parameter_count()
    assert expected == 20_488_418_112
    model = meta_model(load_model_config(load_config(["+experiment=gpt_oss_20b"], num_devices=4)))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert main(["v5p-8", "+experiment=gpt_oss_20b"]) == 0
    summary = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split()[1:])
    assert float(summary["params_b"]) == pytest.approx(expected / 1e9, abs=0.005)
    assert summary["chips"] == "4" and summary["fits"] == "yes"


def test_model_is_the_reference_architecture():
    """The fields the reference names, read back from the transformers model clm builds."""
    from clm.model.config import meta_model

    config = load_model_config(load_config(["+experiment=gpt_oss_20b"], num_devices=4))
    model = meta_model(config)
    assert config.layer_types[:4] == ["sliding_attention", "full_attention"] * 2  # window_attn_skip_freq [1, 0, ...]
    attention = [layer.self_attn for layer in model.model.layers]
    assert [a.sliding_window for a in attention[:2]] == [129, None]  # window_size [128, 0]: 128 past + itself
    assert attention[0].q_norm.weight.shape == (64,) and attention[0].scaling == 64 ** -0.5
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert config.rope_parameters["full_attention"] == config.rope_parameters["sliding_attention"] == \
        {"rope_type": "default", "rope_theta": 150000.0}
    assert (config.norm_topk_prob, config.router_aux_loss_coef, config.rms_norm_eps) == (True, 0.0, 1e-6)


def test_init_scales_the_output_projections_as_megatron():
    """N(0, 0.008) everywhere, N(0, 0.008 / sqrt(2 * layers)) for o_proj and the experts'
    down_proj (Megatron's output_layer_init_method), through clm's own one-tensor init."""
    from transformers import AutoConfig

    from clm import parallel, runtime
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan

    runtime.setup(None, False)
    config = AutoConfig.for_model("mlperf_gpt_oss", vocab_size=1024, hidden_size=256, intermediate_size=256,
                                  moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
                                  layer_types=["sliding_attention", "full_attention"] * 3, initializer_range=0.008)
    cfg = load_config(["max_length=32"], num_devices=8)
    model = build_sharded_model(ModelPlan.from_config(cfg, parallel.mesh_shape(8, 1, 1, 1), hf_config=config))
    stds = {name: p.detach().cpu().float().std().item() for name, p in model.named_parameters() if p.dim() > 1}
    scaled = 0.008 / (2 * 6) ** 0.5
    for name, std in stds.items():
        expected = scaled if name.endswith(("o_proj.weight", "down_proj")) else 0.008
        assert std == pytest.approx(expected, rel=0.05), name


def test_step0_equals_transformers_with_the_sliding_window_in_force():
    """clm's build of the family (mesh, sharding table, dropless experts, the attention it picks
    for a window shorter than the sequence) against transformers' own forward of the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from clm import parallel, runtime
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan

    runtime.setup(None, False)
    fields = dict(vocab_size=512, hidden_size=32, intermediate_size=24, moe_intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=4,
                  sliding_window=5, layer_types=["sliding_attention", "full_attention"], router_aux_loss_coef=0.0)
    cfg = load_config(["model.capacity_factor=0", "max_length=16", "global_train_batch_size=8"], num_devices=8)
    model = build_sharded_model(ModelPlan.from_config(cfg, parallel.mesh_shape(8, 1, 2, 1),
                                                      hf_config=AutoConfig.for_model("mlperf_gpt_oss", **fields)))
    assert model.attention.implementation == "sdpa"  # a window of 5 < 16: the flash kernel has none
    input_ids = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids.to(torch_xla.device())).cpu()

    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model("mlperf_gpt_oss", **fields)).eval()
    reference.load_state_dict({name: p.detach().cpu() for name, p in model.named_parameters()})
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=2e-5)


def test_checkpoints_keep_mellums_hub_layout(tmp_path):
    """save_pretrained writes Mellum's per-expert tensors; the directory loads back as
    mlperf_gpt_oss, and as transformers' own Mellum once config.json says model_type mellum."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mlperf_gpt_oss", vocab_size=128, hidden_size=32, intermediate_size=24,
                                  moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                  layer_types=["sliding_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in f.keys()
    fields = json.loads((tmp_path / "config.json").read_text())
    for model_type, architecture in (("mlperf_gpt_oss", "MlperfGptOssForCausalLM"), ("mellum", "MellumForCausalLM")):
        (tmp_path / "config.json").write_text(json.dumps({**fields, "model_type": model_type}))
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert type(loaded).__name__ == architecture
        for (name, tensor), expected in zip(loaded.state_dict().items(), model.state_dict().values()):
            assert torch.equal(tensor, expected), name


def flat(cfg) -> dict:
    from omegaconf import OmegaConf

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value

    return dict(walk(OmegaConf.to_container(cfg, resolve=True)))


# What the tiny preset may change: sizes (model, sequence, steps, eval cadence, warmup and decay
# length), the memory-only accumulation, and the names derived from the experiment's name.
SIZE_KNOBS = {"model.config_path", "max_length", "max_steps", "sched.max_steps", "eval_samples_interval",
              "eval_frequency", "sched.lr_warmup_iters", "sched.lr_decay_iters", "gradient_accumulation_steps",
              "exp_name", "run_dir", "checkpoint_dir", "local_compile_cache_dir", "model.max_sequence_length"}


def test_tiny_preset_is_the_benchmark_but_for_its_sizes():
    benchmark = flat(load_config(["+experiment=gpt_oss_20b"], num_devices=4))
    tiny = flat(load_config(["+experiment=gpt_oss_20b_tiny"], num_devices=4))
    differ = {key for key in benchmark.keys() | tiny.keys() if benchmark.get(key) != tiny.get(key)}
    assert differ <= SIZE_KNOBS, sorted(differ - SIZE_KNOBS)
    tiny_model = load_model_config(load_config(["+experiment=gpt_oss_20b_tiny"], num_devices=4)).to_dict()
    model = load_model_config(load_config(["+experiment=gpt_oss_20b"], num_devices=4)).to_dict()
    sizes = {"hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "layer_types", "mlp_layer_types"}
    assert {k for k in model if model[k] != tiny_model.get(k)} <= sizes


# ------------------------------------------------------------------- a tiny run, judged

# The keys whose official 6.0.0 rules a run of this size cannot meet: the sequence length, the
# eval sample count (the data holds fewer), the step count, the decay length, the target.
SCALE_KEYS = {"max_sequence_length", "eval_samples", "max_steps", "opt_learning_rate_decay_steps", "eval_accuracy"}


def write_indexed(prefix: str, num_docs: int, seed: int) -> int:
    """Documents of 20..199 Llama-3-range ids, each ending in EOD, with megatron-core's own
    builder; returns the token count."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    total = 0
    for _ in range(num_docs):
        doc = rng.integers(0, 2000, int(rng.integers(20, 200))).astype(np.int32)
        doc[-1] = EOD
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
        total += len(doc)
    builder.finalize(prefix + ".idx")
    return total


def test_tiny_run_on_indexed_data_writes_a_log_the_official_checker_passes_but_for_scale(tmp_path, caplog):
    from clm import runtime
    from clm.compliance import check
    from clm.train import train

    write_indexed(str(tmp_path / "train"), 300, seed=0)
    write_indexed(str(tmp_path / "valid"), 12, seed=1)
    # The preset but smaller: 4 steps of 8 sequences of 32 tokens, an eval every 2 steps.
    cfg = load_config(["+experiment=gpt_oss_20b_tiny", f"dataset.train_dataset_path={tmp_path / 'train'}",
                       f"dataset.eval_dataset_path={tmp_path / 'valid'}", f"output_dir={tmp_path}", "max_length=32",
                       "max_steps=4", "global_train_batch_size=8", "eval_samples_interval=16"], num_devices=runtime.device_count())
    with caplog.at_level(logging.INFO):
        assert train(cfg).steps == 4
    held = re.search(r"fewer than n_eval_examples=1024; evaluating on those (\d+)", caplog.text)
    assert held and 0 < int(held.group(1)) < 1024, caplog.text  # all it holds, and it says how many

    run_dir = Path(cfg.run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert [r["moe/drop_fraction"] for r in rows if "moe/drop_fraction" in r] == [0.0] * 4  # dropless

    log = (run_dir / "mlperf_compliance.log").read_text()
    assert f'"key": "eval_samples", "value": {held.group(1)}' in log
    verdict = check(str(run_dir / "mlperf_compliance.log"))
    failed = set(re.findall(r"CHECK for '(\w+)' failed", verdict.output))
    failed |= set(re.findall(r"Failed checks for (\w+)", verdict.output))
    assert not verdict.passed and failed == SCALE_KEYS, verdict.output
    assert "Required" not in verdict.output and "Could not find" not in verdict.output, verdict.output
