"""Eight families end to end at tiny size, each written by transformers' own `save_pretrained`
in its hub layout (tests/families.py): mixtral, qwen3_moe, olmoe, qwen2_moe, deepseek_v3,
gpt_oss, llama, gpt2.

Model computation (clm.model): (a) step-0 loss and logits equal transformers' own
`from_pretrained` forward (dropless, fp32) on one device and on fsdp x tensor x expert meshes;
(b) the capacity path with real drops equals a per-token loop written here, pass-through
included; (c) three bf16 train steps: loss finite and falling, no recompilation after warm-up,
finite router gradients with real drops; (d) a non-Mixtral family (DeepSeek-V3, with its
correction bias updated every step) resumes bitwise; (e) bad input is one line and exit 2.

One model build and one compiled program serve several assertions (module-scoped fixtures).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met

from clm import parallel, runtime
from clm.config import load_config
from clm.cli import run_command
from clm.errors import EXIT_USER_ERROR
from clm.model import moe
from clm.model.build import build_sharded_model
from clm.model.plan import ModelPlan
from clm.parallel.placement import place
from families import FAMILIES, MOE_FAMILIES, family_config, write_family

REPO = Path(__file__).resolve().parents[1]
BATCH, LENGTH = 8, 32
# (tensor, expert) parallelism of an fsdp x tensor x expert mesh of the 8 devices (dense models:
# fsdp 4 x tensor 2). Data parallelism alone is the one-device case's numerics.
MESHES = {"fsdp2_tp2_ep2": (2, 2)}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: write_family(root / name, name) for name in FAMILIES}


def model_config(directory: Path, *overrides: str, devices: int = 8):
    return load_config([f"model.config_path={directory / 'config.json'}", f"max_length={LENGTH}",
                        f"global_train_batch_size={BATCH}", f"global_eval_batch_size={BATCH}", *overrides],
                       num_devices=devices)


def build(directory: Path, *overrides: str, tensor: int = 1, expert: int = 1, devices: int = 8):
    """The family's model built by clm for a mesh, holding the weights of its directory (placed
    one tensor at a time from transformers' `from_pretrained`: what its weight loader reads)."""
    from transformers import AutoModelForCausalLM

    runtime.setup(None, False)
    cfg = model_config(directory, *overrides, f"tensor_parallelism={tensor}", f"expert_parallelism={expert}",
                       devices=devices)
    model = build_sharded_model(ModelPlan.from_config(cfg, parallel.mesh_shape(devices, tensor, expert, 1)))
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, cfg.model.dtype))
    state = reference.state_dict()
    for name, placement in model.placements.items():
        tensor_ = state[name]
        target = model.module.get_parameter(name) if name in dict(model.named_parameters()) else \
            model.module.get_buffer(name)
        place(target, placement, lambda index: tensor_[index].to(target.dtype))
    return cfg, model


def tokens(seed: int, vocab: int = 32000) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))


def next_tokens(input_ids: torch.Tensor) -> torch.Tensor:
    """The labels clm's data gives the loss: already shifted, the last position not scored."""
    labels = input_ids.roll(-1, dims=1)
    labels[:, -1] = -100
    return labels


def reference_forward(directory: Path, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """transformers' own model from the directory: stock experts, its default attention, fp32."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        output = reference(input_ids=input_ids, labels=input_ids)
    return output.logits, output.loss.item()


def clm_forward(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The eval loss as the trainer computes it, and the logits of that same forward."""
    logits = []
    handle = model.module.register_forward_hook(lambda module, args, output: logits.append(output.logits))
    model.eval()
    with torch.no_grad():
        device_ids = input_ids.to(torch_xla.device())
        terms = model.loss_terms(device_ids, next_tokens(input_ids).to(torch_xla.device()), -100)
        torch_xla.sync()
    handle.remove()
    return logits[0].cpu(), (terms.loss_sum / terms.num_scored).item()


# ------------------------------------------------------------------ (a) equal to transformers


@dataclass
class Built:
    """A family's model as clm builds it from its hub-layout directory (model.name_or_path,
    dropless), with what the build logged and whether it ran the random init."""

    cfg: object
    model: object
    attention_lines: list[str]
    random_init: bool


class AttentionLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        if record.getMessage().startswith("attention:"):
            self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def mesh_models(family_dirs):
    """Each family built once on the fsdp x tensor x expert mesh and shared by the tests that read
    it: step 0 against transformers, and the sharded hub-layout load."""
    from clm.model import init

    models = {}

    def get(model_type: str, mesh: str = "fsdp2_tp2_ep2") -> Built:
        if (model_type, mesh) not in models:
            directory = family_dirs[model_type]
            tensor, expert = MESHES[mesh]
            expert = expert if model_type in MOE_FAMILIES else 1
            runtime.setup(None, False)
            cfg = model_config(directory, f"model.name_or_path={directory}", f"tensor_parallelism={tensor}",
                               f"expert_parallelism={expert}",
                               *(["model.capacity_factor=0"] if model_type in MOE_FAMILIES else []))
            handler, logger = AttentionLines(), logging.getLogger("clm")
            level = logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            initialized = init.initialized["parameters"]
            try:
                model = build_sharded_model(ModelPlan.from_config(cfg, parallel.mesh_shape(8, tensor, expert, 1)))
            finally:
                logger.removeHandler(handler)
                logger.setLevel(level)
            models[model_type, mesh] = Built(cfg, model, handler.lines, init.initialized["parameters"] != initialized)
        return models[model_type, mesh]

    return get


@pytest.fixture(scope="module")
def one_device_outputs(family_dirs, tmp_path_factory) -> Path:
    """Every family built from its hub-layout directory on a single device (one process with
    CPU_NUM_DEVICES=1 for all eight): each one's tensors and its step-0 logits and loss."""
    out = tmp_path_factory.mktemp("one_device")
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    directories = json.dumps({name: str(path) for name, path in family_dirs.items()})
    result = subprocess.run([sys.executable, __file__, "one_device", directories, str(out)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_step0_loss_and_logits_equal_transformers(family_dirs, mesh_models, model_type, mesh):
    built = mesh_models(model_type, mesh)
    # The attention variant is said once per build, not per layer.
    assert built.attention_lines == [f"attention: {built.model.attention.reason}"]
    input_ids = tokens(0)
    logits, loss = clm_forward(built.model, input_ids)
    expected_logits, expected_loss = reference_forward(family_dirs[model_type], input_ids)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=2e-5)
    assert loss == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.slow
def test_step0_on_one_device_equals_transformers_for_every_family(family_dirs, one_device_outputs):
    """The same on a single device."""
    for model_type, directory in family_dirs.items():
        saved = torch.load(one_device_outputs / f"{model_type}.pt")
        expected_logits, expected_loss = reference_forward(directory, tokens(0))
        torch.testing.assert_close(saved["logits"], expected_logits, rtol=1e-4, atol=2e-5, msg=model_type)
        assert saved["loss"] == pytest.approx(expected_loss, rel=1e-5), model_type


# ---------------------------------------------------------------- (b) capacity against a loop


def loop_experts(experts, hidden, top_k_index, top_k_weights, sequence_length: int, capacity_factor: float):
    """Per sequence, positions in order and each token's choices in order; an expert takes an
    assignment while it holds fewer than C; a kept assignment adds its weight times the
    family's own (transformers' eager) expert MLP of that token; a token whose every choice
    was dropped passes its input through."""
    eager = type(experts).forward.__wrapped__  # transformers' own experts forward
    num_tokens, _ = hidden.shape
    top_k = top_k_index.shape[1]
    num_experts = experts.num_experts
    capacity = max(1, int((sequence_length * top_k / num_experts) * capacity_factor))
    output = hidden.clone()
    dropped = 0
    for start in range(0, num_tokens, sequence_length):
        taken = [0] * num_experts
        for t in range(start, start + sequence_length):
            kept_any = False
            for k in range(top_k):
                e = int(top_k_index[t, k])
                if taken[e] == capacity:
                    dropped += 1
                    continue
                taken[e] += 1
                if not kept_any:
                    output[t] = 0
                    kept_any = True
                one = torch.ones(1, 1, dtype=top_k_weights.dtype)
                output[t] += top_k_weights[t, k] * eager(experts, hidden[t:t + 1], torch.tensor([[e]]), one)[0]
    return output, dropped


def forced_moe_block(model_type: str):
    """A family's first MoE block (clm's experts, capacity 1.25) and an input where sequence 0
    sends every token to experts 3 and 5 (through a router direction: at C = 7 of 24 tokens its
    later tokens lose both choices) and the others route randomly with overflows of their own."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = family_config(model_type)
    config._experts_implementation = moe.EXPERTS_IMPLEMENTATION
    model = AutoModelForCausalLM.from_config(config)
    block = model.get_submodule(next(n for n, m in model.named_modules() if moe.is_experts(m)).rpartition(".")[0])
    routing = moe.Routing(block, 1.25)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    router = next(m for name, m in block.named_children() if name in ("gate", "router"))
    direction = torch.nn.functional.normalize(torch.randn(config.hidden_size), dim=0)
    with torch.no_grad():  # (sigmoid routers saturate: push the other experts down too)
        router.weight += torch.tensor([-30.0] * 3 + [30.0, -30.0, 27.0] + [-30.0] * 2).unsqueeze(-1) * direction
    hidden = torch.randn(3, 24, config.hidden_size)
    hidden -= (hidden @ direction).unsqueeze(-1) * direction
    hidden[0] += 10 * direction
    return block, router, hidden, routing


def block_output(block, hidden):
    output = block(hidden)
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_capacity_path_equals_a_per_token_loop(model_type):
    """The whole MoE block (the family's router, shared expert, gate, scaling) with clm's
    capacity experts, against the same block whose experts' output is the loop's."""
    block, router, hidden, routing = forced_moe_block(model_type)
    output = block_output(block, hidden)
    experts = block.experts
    record = {}

    def loop_instead(module, args, kwargs, _):
        record["output"], record["dropped"] = loop_experts(module, *args, 24, 1.25)
        return record["output"]

    handle = experts.register_forward_hook(loop_instead, with_kwargs=True)
    expected = block_output(block, hidden)
    handle.remove()
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)

    # Sequence 0: experts 3 and 5 for every token, so tokens 7.. lose both choices and the
    # experts pass their input through; the random sequences drop some assignments too.
    _, _, index = router(hidden[0])
    assert sorted(index[0].tolist()) == [3, 5] and all(sorted(row.tolist()) == [3, 5] for row in index)
    assert record["dropped"] > 2 * (24 - 7)
    metrics = routing.metrics()
    assert metrics["moe/drop_fraction"].item() == pytest.approx(record["dropped"] / (3 * 24 * 2))
    assert metrics["moe/expert_load_max"].item() == 24

    # The same on the XLA device (one small graph per family; XLA's CPU matmuls round differently).
    on_device = block.to(torch_xla.device())
    torch.testing.assert_close(block_output(on_device, hidden.to(torch_xla.device())).cpu(), expected,
                               rtol=1e-4, atol=1e-4)


def test_pass_through_is_the_experts_identity():
    """At the experts' boundary: a token with no kept choice comes out exactly as it went in."""
    block, router, hidden, routing = forced_moe_block("deepseek_v3")
    flat = hidden.reshape(-1, hidden.shape[-1])
    _, weights, index = router(flat)
    routing.layers[0].sequence_length = 24
    output = moe.capacity_experts_forward(block.experts, flat, index, weights, moe_layer=routing.layers[0])
    assert torch.equal(output[7:24], flat[7:24])
    assert not torch.equal(output[:7], flat[:7])


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_load_balancing_loss_is_the_familys_own(model_type):
    """clm's aux loss is transformers' own for the family (its load_balancing_loss_func, its
    coefficient), computed from the router logits clm records; none for DeepSeek-V3."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(family_config(model_type))
    config = family_config(model_type)
    config._experts_implementation = moe.EXPERTS_IMPLEMENTATION
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(reference.state_dict())
    routing = moe.Routing(model, 0.0)
    input_ids = tokens(0)[:2]
    expected = reference(input_ids=input_ids, output_router_logits=True)
    model(input_ids=input_ids)
    loss = routing.load_balancing_loss()
    if model_type == "deepseek_v3":
        assert loss is None and getattr(expected, "aux_loss", None) is None
        return
    torch.testing.assert_close(loss, expected.aux_loss, rtol=1e-5, atol=0)
    assert routing.aux_loss.coefficient == config.router_aux_loss_coef > 0


EXPECTED_ATTENTION = {
    "mixtral": "clm_pallas", "qwen3_moe": "clm_pallas", "olmoe": "clm_pallas", "qwen2_moe": "clm_pallas",
    "llama": "clm_pallas", "deepseek_v3": "sdpa", "gpt_oss": "eager", "gpt2": "sdpa",
}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_attention_is_flash_where_the_kernel_computes_the_family(model_type):
    """Plain causal attention with one head dim runs the flash path; DeepSeek's latent attention
    (q/k wider than v), gpt-oss's sinks and sliding window, GPT-2's attention dropout do not."""
    from clm.model import attention
    from clm.model.config import meta_model

    choice = attention.select(meta_model(family_config(model_type)), flash_attention=True, max_length=LENGTH)
    assert choice.implementation == EXPECTED_ATTENTION[model_type], choice.reason
    reasons = {"deepseek_v3": "latent attention", "gpt_oss": "a sliding window of 8 < max_length 32, attention sinks",
               "gpt2": "attention dropout 0.1"}
    assert reasons.get(model_type, "clm flash attention") in choice.reason


@pytest.mark.slow
@pytest.mark.parametrize("model_type, layer", [("gpt_oss", "GptOssDecoderLayer"), ("gpt2", "GPT2Block")])
def test_activation_checkpointing_keeps_every_gradient(tmp_path, model_type, layer):
    """transformers' checkpointing hook with torch_xla's checkpoint: the same gradients, the
    routers' (through the load-balancing loss, recorded inside the checkpointed layer) included;
    GPT-2 passes its mask positionally. (Dropout off: checkpointing draws other masks.)"""
    directory = write_family(tmp_path / model_type, model_type, tokenizer=False,
                             **({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if model_type == "gpt2" else {}))
    grads = {}
    for checkpointed in (False, True):
        _, model = build(directory, f"model.fsdp_config.xla_fsdp_grad_ckpt={checkpointed}",
                         f"model.fsdp_config.fsdp_transformer_layer_cls_to_wrap=[{layer}]")
        model.train()
        input_ids = tokens(0)
        terms = model.loss_terms(input_ids.to(torch_xla.device()), next_tokens(input_ids).to(torch_xla.device()), -100)
        terms.loss.backward()
        torch_xla.sync()
        grads[checkpointed] = {name: p.grad.cpu() for name, p in model.named_parameters()}
        assert (terms.aux_loss_coef > 0) == (model_type == "gpt_oss")
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_activation_checkpointing_recomputes_only_the_layer_classes_named():
    """`fsdp_transformer_layer_cls_to_wrap` selects the layers recomputed: Jamba alternates
    Mamba and attention decoder layers, two classes (on the meta device: flags only)."""
    from transformers import AutoConfig

    from omegaconf import OmegaConf

    from clm.model.build import enable_activation_checkpointing
    from clm.model.config import meta_model
    from clm.plan import recomputed_layers

    config = AutoConfig.for_model("jamba", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                  attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4)
    for names, recomputed in [(["JambaAttentionDecoderLayer"], [1, 3]), (["JambaMambaDecoderLayer"], [0, 2]),
                              (["JambaMambaDecoderLayer", "JambaAttentionDecoderLayer"], [0, 1, 2, 3])]:
        model = meta_model(config)
        enable_activation_checkpointing(model, None, names)
        assert [i for i, layer in enumerate(model.model.layers) if layer.gradient_checkpointing] == recomputed, names
        # the memory planner counts the same layers as recomputed (the others keep their activations)
        knobs = OmegaConf.create({"model": {"fsdp_config": {"xla_fsdp_grad_ckpt": True,
                                                            "fsdp_transformer_layer_cls_to_wrap": names}}})
        assert recomputed_layers(SimpleNamespace(cfg=knobs, meta_model=model)) == len(recomputed), names


# ------------------------------------------------------------------- (c) three bf16 steps


def compile_count() -> int:
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_three_bf16_train_steps(family_dirs, model_type):
    """bf16, capacity factor 1 (real drops), the trainer's calls: the loss is finite and falls,
    the third step compiles nothing, every gradient is finite and the routers get one."""
    from clm.engine.xla import XlaEngine
    from clm.optim import build_optimizer

    tensor, expert = MESHES["fsdp2_tp2_ep2"]
    moe_knobs = ["model.capacity_factor=1.0"] if model_type in MOE_FAMILIES else []
    cfg, model = build(family_dirs[model_type], "model.dtype=bfloat16", "lr=2e-3", *moe_knobs,
                       tensor=tensor, expert=expert if model_type in MOE_FAMILIES else 1)
    optimizer = build_optimizer(cfg, model.module, XlaEngine().optimizer_class(cfg.optimizer))
    model.train()
    losses, compiles, drops = [], [], []
    for step in range(3):
        before = compile_count()
        input_ids = tokens(step, vocab=64)  # a small vocabulary: quick to learn
        terms = model.loss_terms(input_ids.to(torch_xla.device()), next_tokens(input_ids).to(torch_xla.device()), -100)
        terms.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        optimizer.step()
        model.update_router_bias()
        optimizer.zero_grad(set_to_none=True)
        torch_xla.sync()
        losses.append(terms.loss.item())
        drops.append(terms.router_metrics.get("moe/drop_fraction", torch.zeros(())).item())
        compiles.append(compile_count() - before)
        if step == 0:
            for name, grad in grads.items():
                assert grad is not None and torch.isfinite(grad.float().cpu()).all(), name
            routers = [g for name, g in grads.items() if re.search(r"mlp\.(gate|router)\.weight$", name)]
            assert len(routers) == (len(model.routing.layers) if model.is_moe else 0)
            assert all(g.float().abs().sum().item() > 0 for g in routers)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[2] < losses[0], losses
    assert compiles[2] == 0, compiles
    if model.is_moe:
        assert all(0 < drop < 1 for drop in drops), drops  # real drops, every step


# ------------------------------------------------------------------ (d) resume bitwise


@pytest.mark.slow
def test_deepseek_resumes_bitwise_with_its_correction_bias(family_dirs, tmp_path):
    """DeepSeek-V3 with aux-loss-free balancing: stopped after step 2 (kill switch) and resumed,
    it ends exactly as the uninterrupted run, correction biases included, and the biases moved."""
    from clm import checkpoint
    from clm.train import train

    def config(output_dir, *overrides):
        return model_config(family_dirs["deepseek_v3"], f"output_dir={output_dir}", "max_steps=4",
                            "eval_frequency=100", "do_first_eval=false", "n_eval_examples=8", "per_device_train_batch_size=1",
                            "model.router_bias_update=true", "model.router_bias_update_rate=0.01",
                            "model.capacity_factor=1.0", "wandb.mode=disabled", *overrides, devices=8)

    uninterrupted = config(tmp_path / "uninterrupted")
    assert train(uninterrupted).steps == 4
    switch = tmp_path / "STOP"
    switch.touch()
    resumed = config(tmp_path / "resumed", f"kill_switch_path={switch}")
    assert train(resumed).steps == 1
    switch.unlink()
    assert train(resumed).steps == 4

    def final_state(cfg):
        step_dir = Path(cfg.checkpoint_dir) / "4"
        shapes = checkpoint.tensor_shapes(str(step_dir))
        state = {"model": {k[6:]: torch.empty(s) for k, s in shapes.items() if k.startswith("model.")}}
        return checkpoint.read_items(str(step_dir), state)["model"]

    a, b = final_state(uninterrupted), final_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    biases = [name for name in a if name.endswith("e_score_correction_bias")]
    assert biases and all(a[name].abs().sum() > 0 for name in biases)


# -------------------------------------------------------------------- (e) bad input


def run_clm(*argv: str) -> int:
    spec = importlib.util.spec_from_file_location("run_clm", REPO / "run_clm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return run_command(lambda: module.main(list(argv)))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_a_family_without_sharding_rules_is_one_line(tmp_path, capsys):
    directory = write_family(tmp_path / "qwen2", "llama", tokenizer=False)
    fields = json.loads((directory / "config.json").read_text()) | {"model_type": "qwen2",
                                                                      "architectures": ["Qwen2ForCausalLM"]}
    (directory / "config.json").write_text(json.dumps(fields))
    code = run_clm(f"model.config_path={directory / 'config.json'}", f"output_dir={tmp_path / 'out'}")
    line = one_error_line(capsys)
    assert code == EXIT_USER_ERROR
    assert "model_type 'qwen2' has no sharding rules" in line and "model.embed_tokens.weight" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("knob, message", [
    ("model.capacity_factor=0.5", "model.capacity_factor=0.5: llama is a dense model"),
    ("expert_parallelism=2", "expert_parallelism=2: llama is a dense model"),
    ("model.router_bias_update=true", "model.router_bias_update=true: llama has no routing correction bias"),
])
def test_moe_knobs_on_a_dense_model_are_one_line(family_dirs, tmp_path, capsys, knob, message):
    code = run_clm(f"model.config_path={family_dirs['llama'] / 'config.json'}", knob, f"output_dir={tmp_path}")
    assert code == EXIT_USER_ERROR
    assert message in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


def test_router_bias_update_needs_a_correction_bias(family_dirs, tmp_path, capsys):
    code = run_clm(f"model.config_path={family_dirs['mixtral'] / 'config.json'}", "model.router_bias_update=true",
                   f"output_dir={tmp_path}")
    assert code == EXIT_USER_ERROR
    assert "mixtral has no routing correction bias" in one_error_line(capsys)


# =========================================================================================
# Weights, config, tokenizer, FLOPs and presets (models-io): the hub layout of every family
# loads sharded as transformers' from_pretrained reads it and exports back to it; bad model
# directories are one line; FLOPs per token against a count on the model; a plan per preset.
# =========================================================================================


def hub_state(directory: Path) -> dict[str, torch.Tensor]:
    """What transformers' own from_pretrained makes of a hub-layout directory."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()


def device_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.cpu() for name, tensor in parallel.sharding.model_tensors(model.module).items()}


def assert_same_state(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() <= expected.keys(), (what, sorted(actual.keys() - expected.keys()))
    for name, tensor in actual.items():
        assert torch.equal(tensor, expected[name]), f"{what}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_hub_layout_loads_sharded_and_exports_back(family_dirs, mesh_models, model_type, tmp_path):
    """model.name_or_path on an fsdp x tensor x expert mesh holds exactly from_pretrained's tensors
    (no random init); hf-to-checkpoint then checkpoint-to-hf give the family's hub layout again
    (the same tensor names), which from_pretrained loads to the same tensors."""
    from clm.convert import checkpoint_to_hf, hf_to_checkpoint

    directory = family_dirs[model_type]
    built = mesh_models(model_type)
    assert not built.random_init, "a pretrained start does no random init"
    expected = hub_state(directory)
    assert_same_state(device_state(built.model), expected, f"{model_type} loaded")

    hf_to_checkpoint(str(directory), str(tmp_path / "ckpt"))
    checkpoint_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hub"), 100_000)
    names = lambda d: json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].keys()  # noqa: E731
    assert set(names(tmp_path / "hub")) == set(names(directory))
    exported = hub_state(tmp_path / "hub")
    assert exported.keys() == expected.keys()
    assert_same_state(exported, expected, f"{model_type} exported")


def test_hub_layout_loads_on_one_device_for_every_family(family_dirs, one_device_outputs):
    for model_type, directory in family_dirs.items():
        assert_same_state(torch.load(one_device_outputs / f"{model_type}.state.pt"), hub_state(directory), model_type)


class Held(__import__("clm.model.weights", fromlist=["Lazy"]).Lazy):
    """A Lazy over a tensor in memory: transformers' ops run on it as on the hub's tensors."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__(tensor.shape, tensor.dtype)
        self.tensor = tensor

    def read(self, index):
        return self.tensor[index]


def every_slice(shape):
    """A few index tuples of contiguous slices, straddling the middle of every dimension."""
    import itertools

    choices = [[slice(0, n), slice(0, max(1, n // 2)), slice(n // 3, n), slice(n // 2, n // 2 + 1)] for n in shape]
    return itertools.product(*choices)


@pytest.mark.parametrize("ops", ["merge_concatenate", "chunk", "transpose", "interleave"])
def test_slices_of_converted_tensors_equal_the_converted_tensors_sliced(ops):
    """Each conversion op of transformers' mapping, run on lazy tensors, reads any slice of its
    result as that slice of the op run on the tensors themselves (interleave has no slice rule:
    it is computed whole, then sliced)."""
    from transformers.core_model_loading import Chunk, Concatenate, Interleave, MergeModulelist, Transpose

    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 4, generator=generator) for _ in range(6)]
    if ops == "merge_concatenate":
        run = [MergeModulelist(dim=0), Concatenate(dim=1)]
        inputs = {"w1": tensors[:3], "w3": tensors[3:]}
        patterns = (["w1", "w3"], ["gate_up"])
    else:
        run = {"chunk": [Chunk(dim=0)], "transpose": [Transpose(0, 1)], "interleave": [Interleave(dim=0)]}[ops]
        inputs = {"fused": [torch.cat(tensors[:2])]}
        patterns = (["fused"], ["q", "k"] if ops == "chunk" else ["out"])

    def convert(values):
        for op in run:
            values = op.convert(values, source_patterns=patterns[0], target_patterns=patterns[1])
        return {k: v[0] if isinstance(v, list) else v for k, v in values.items()}

    expected = convert({k: list(v) for k, v in inputs.items()})
    lazy = convert({k: [Held(t) for t in v] for k, v in inputs.items()})
    assert lazy.keys() == expected.keys()
    for name, value in expected.items():
        assert tuple(lazy[name].shape) == tuple(value.shape)
        for index in every_slice(value.shape):
            torch.testing.assert_close(lazy[name].read(index), value[index], rtol=0, atol=0)


# ----------------------------------------------------------------------- bad model input


def rewrite_config(directory: Path, **fields) -> Path:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **fields}))
    return directory


def drop_tensor(directory: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    file = index["weight_map"].pop(name)
    tensors = load_file(directory / file)
    del tensors[name]
    save_file(tensors, directory / file, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    return directory


def copy_family(family_dirs, model_type: str, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(family_dirs[model_type], tmp_path / model_type))


@pytest.mark.parametrize("case", ["unknown", "seq2seq", "encoder", "missing", "mis-shaped", "quantized",
                                  "vocabulary"])
def test_bad_model_directories_are_one_line(family_dirs, tmp_path, capsys, case):
    from transformers import AutoConfig

    if case == "unknown":
        directory = rewrite_config(copy_family(family_dirs, "llama", tmp_path), model_type="llama9")
        message = "model_type 'llama9' is not an architecture this transformers knows"
    elif case in ("seq2seq", "encoder"):
        directory = tmp_path / case
        directory.mkdir()
        architecture = "t5" if case == "seq2seq" else "bert"
        config = AutoConfig.for_model(architecture, architectures=["T5Model" if case == "seq2seq" else "BertForMaskedLM"])
        config.save_pretrained(directory)
        message = ("T5Model is an encoder-decoder (seq2seq) model" if case == "seq2seq"
                   else "BertForMaskedLM is an encoder; clm trains decoder-only causal LMs")
        code = run_clm(f"model.config_path={directory / 'config.json'}", f"output_dir={tmp_path / 'out'}")
        assert code == EXIT_USER_ERROR and message in one_error_line(capsys)
        return
    elif case == "missing":
        directory = drop_tensor(copy_family(family_dirs, "deepseek_v3", tmp_path),
                                "model.layers.2.mlp.experts.3.up_proj.weight")
        message = "missing tensors model.layers.2.mlp.experts.3.up_proj.weight"
    elif case == "mis-shaped":
        directory = rewrite_config(copy_family(family_dirs, "qwen2_moe", tmp_path), shared_expert_intermediate_size=64)
        message = "tensor model.layers.0.mlp.shared_expert.down_proj.weight has shape [64, 96] but config.json implies [64, 64]"
    elif case == "quantized":
        directory = rewrite_config(copy_family(family_dirs, "gpt_oss", tmp_path),
                                   quantization_config={"quant_method": "mxfp4"})
        message = "its weights are mxfp4-quantized; clm trains from bf16 or fp32 weights. Write a dequantized copy once"
    else:  # a model whose vocabulary is smaller than its own directory's tokenizer
        from families import write_family as write

        directory = write(tmp_path / "small_vocab", "llama", vocab_size=1000)
        message = "its ids go up to 31999 but the model's vocab_size is 1000"
    code = run_clm(f"model.name_or_path={directory}", f"output_dir={tmp_path / 'out'}", "max_steps=1")
    assert code == EXIT_USER_ERROR
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out" / "moe_trial" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_comes_from_the_model_directory(family_dirs, tmp_path):
    """tokenizer.model (SentencePiece's own ids, leading '▁' included) over tokenizer.json; a
    directory with only tokenizer.json gets the Hugging Face tokenizer, its EOS as padding; none:
    the Mixtral v1 model."""
    import shutil

    import sentencepiece
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from clm.data.tokenizer import load_model_tokenizer, mixtral_v1_tokenizer_path

    both = Path(shutil.copytree(family_dirs["llama"], tmp_path / "both"))
    AutoTokenizer.from_pretrained(both).save_pretrained(both)  # adds tokenizer.json, keeps tokenizer.model
    only_json = Path(shutil.copytree(both, tmp_path / "only_json"))
    (only_json / "tokenizer.model").unlink()
    bare = write_family(tmp_path / "bare", "llama", tokenizer=False)

    def tokenizer(directory: Path, override=None):
        model_cfg = OmegaConf.create({"name_or_path": str(directory), "tokenizer_name_or_path": override})
        return load_model_tokenizer(model_cfg, 32000)

    sentencepiece_ids = sentencepiece.SentencePieceProcessor(model_file=mixtral_v1_tokenizer_path()).encode("Hello")
    assert sentencepiece_ids == [22557]
    assert tokenizer(both).encode_batch(["Hello"]) == [sentencepiece_ids]
    hf = tokenizer(only_json)
    assert hf.name == str(only_json) and type(hf).__name__ == "HuggingFaceTokenizer"
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (1, 2, 2)
    assert hf.encode_batch(["Hello"]) == [[16230]]  # transformers 5 drops the leading '▁' (docs/design.md)
    default = tokenizer(bare)
    assert default.name == mixtral_v1_tokenizer_path() and (default.eos_id, default.pad_id) == (2, 2)
    assert tokenizer(bare, str(only_json)).name == str(only_json)


# ------------------------------------------------------------------------- FLOPs per token


def counted_matmul_weights(config) -> float:
    """The weights one token multiplies by, counted on transformers' model itself: every matrix
    but the embedding lookups, routed experts' stacked [E, ...] matrices at K of E, the output
    head counted when tied to the embedding too."""
    from clm.model.config import meta_model
    from clm.model.family import num_experts

    model = meta_model(config)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    E = num_experts(config)
    total = 0.0
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2 or id(parameter) in lookups or name.endswith("bias"):
            continue
        routed = ".experts." in name and E and parameter.shape[0] == E and parameter.dim() == 3
        total += parameter.numel() * (config.num_experts_per_tok / E if routed else 1)
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        total += model.get_output_embeddings().weight.numel()
    return total


# Attention by hand for the tiny families at S=32, per layer: keys attended on average x query
# heads x (q/k head dim + v head dim).
ATTENTION_BY_HAND = {
    "mixtral": 2 * 16 * 4 * (16 + 16),  # head_dim = 64 / 4
    "qwen3_moe": 2 * 16 * 4 * (16 + 16),
    "olmoe": 2 * 16 * 4 * (16 + 16),
    "qwen2_moe": 3 * 16 * 4 * (16 + 16),
    "deepseek_v3": 3 * 16 * 4 * (24 + 16),  # MLA: qk_nope 16 + qk_rope 8, v_head_dim 16
    "gpt_oss": (8 - 8 * 8 / 64 + 16) * 4 * (16 + 16),  # window 8 on layer 0: 8 - 8^2/(2*32) keys
    "llama": 2 * 16 * 4 * (16 + 16),
    "gpt2": 2 * 16 * 4 * (16 + 16),
}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_flops_per_token_against_the_model_and_attention_by_hand(model_type):
    from clm.model.config import meta_model
    from clm.model.family import active_matmul_weights, num_experts, reference_flops_per_token, training_flops_per_token

    config = family_config(model_type)
    assert active_matmul_weights(config) == counted_matmul_weights(config)
    assert training_flops_per_token(config, 32) == pytest.approx(
        6 * (counted_matmul_weights(config) + ATTENTION_BY_HAND[model_type]), rel=1e-12)
    parameters = sum(p.numel() for p in meta_model(config).parameters())
    ratio = config.num_experts_per_tok / num_experts(config) if model_type in MOE_FAMILIES else 1
    assert reference_flops_per_token(config, parameters) == pytest.approx(6 * parameters * ratio)


# ------------------------------------------------------------------------------ presets

# Each preset on a topology where it fits, as a user would plan it.
PRESET_PLANS = {
    "mixtral_8x7b": ["v5p-128", "model.dtype=bfloat16", "max_length=4096", "per_device_train_batch_size=1",
                     "model.fsdp_config.xla_fsdp_grad_ckpt=true"],
    "mixtral_8x22b": ["v5p-256", "model.dtype=bfloat16", "max_length=4096", "per_device_train_batch_size=1",
                      "model.fsdp_config.xla_fsdp_grad_ckpt=true"],
    "qwen3_30b_a3b": ["v5p-256", "model.dtype=bfloat16", "max_length=4096", "per_device_train_batch_size=1"],
    "deepseek_v3_671b": ["v5p-1024", "model.dtype=bfloat16", "expert_parallelism=64", "max_length=4096",
                         "per_device_train_batch_size=1", "model.fsdp_config.xla_fsdp_grad_ckpt=true"],
    "gpt_oss_20b": ["v5p-64", "model.dtype=bfloat16", "max_length=8192", "per_device_train_batch_size=1",
                    "model.fsdp_config.xla_fsdp_grad_ckpt=true"],
    "olmoe_1b_7b": ["v5e-16", "model.dtype=bfloat16", "max_length=4096", "per_device_train_batch_size=1",
                    "model.fsdp_config.xla_fsdp_grad_ckpt=true"],
    "llama3_1_8b": ["v5p-64", "model.dtype=bfloat16", "max_length=8192", "per_device_train_batch_size=1",
                    "model.fsdp_config.xla_fsdp_grad_ckpt=true"],
}
# Parameters of the published models (transformers' count of the configs shipped).
PRESET_PARAMETERS_B = {"mixtral_8x7b": 46.70, "mixtral_8x22b": 140.62, "qwen3_30b_a3b": 30.53,
                       "deepseek_v3_671b": 671.03, "gpt_oss_20b": 20.91, "olmoe_1b_7b": 6.92, "llama3_1_8b": 8.03}


@pytest.mark.parametrize("preset", PRESET_PLANS)
def test_plan_for_every_preset_with_no_download(preset, capsys):
    from clm.model.config import load_model_config
    from clm.model.family import training_flops_per_token
    from clm.plan import main, parse_topology

    topology, *overrides = PRESET_PLANS[preset]
    assert main([topology, f"+model={preset}", *overrides]) == 0
    summary = dict(kv.split("=") for kv in capsys.readouterr().out.strip().splitlines()[-1].split()[1:])
    assert summary["fits"] == "yes", summary
    assert float(summary["params_b"]) == pytest.approx(PRESET_PARAMETERS_B[preset], abs=0.005)
    length = int(next(o.split("=")[1] for o in overrides if o.startswith("max_length=")))
    cfg = load_config([f"+model={preset}", *overrides], num_devices=parse_topology(topology).chips)
    assert float(summary["gflops_per_token"]) == pytest.approx(
        training_flops_per_token(load_model_config(cfg), length) / 1e9, abs=0.005)
    if preset == "deepseek_v3_671b":
        assert cfg.model.router_bias_update is True


# ------------------------------------------------------------------- subprocess worker


if __name__ == "__main__":
    mode, directories, out = sys.argv[1:]
    if mode == "one_device":
        runtime.setup(None, False)
        for model_type, directory in json.loads(directories).items():
            moe_knobs = ["model.capacity_factor=0"] if model_type in MOE_FAMILIES else []
            cfg = model_config(Path(directory), f"model.name_or_path={directory}", *moe_knobs, devices=1)
            model = build_sharded_model(ModelPlan.from_config(cfg, parallel.mesh_shape(1, 1, 1, 1)))
            torch.save(device_state(model), Path(out) / f"{model_type}.state.pt")
            logits, loss = clm_forward(model, tokens(0))
            torch.save({"logits": logits, "loss": loss}, Path(out) / f"{model_type}.pt")
