"""Optimizer priming as the reference does it, against AdamW written out by hand."""

import math

import pytest
import torch
import torch_xla

from clm import runtime
from clm.config import load_config
from clm.engine.dtensor import DTensorEngine
from clm.engine.xla import XlaEngine
from clm.optim import build_optimizer

LR, WD, BETA1, BETA2, EPS = 2e-3, 0.1, 0.9, 0.999, 1e-8


def adamw_by_hand(param, grads, steps_before=0, wd=WD):
    """Decoupled AdamW (torch's defaults), starting at step count `steps_before` with zero moments."""
    m, v, p = torch.zeros_like(param), torch.zeros_like(param), param.clone()
    for t, g in enumerate(grads, start=steps_before + 1):
        p = p * (1 - LR * wd)
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g * g
        m_hat, v_hat = m / (1 - BETA1 ** t), v / (1 - BETA2 ** t)
        p = p - LR * m_hat / (v_hat.sqrt() + EPS)
    return p


@pytest.mark.parametrize("backend, optimizer", [("xla", "ADAMW_TORCH_XLA"), ("xla", "AdamW"),
                                                ("dtensor", "ADAMW_TORCH_XLA")])
def test_priming_is_one_zero_gradient_step_then_training_uses_step_2s_bias_correction(backend, optimizer):
    """On XLA torch_xla's own priming (and syncfree AdamW); on the DTensor engine clm's plain one
    (and torch's AdamW for ADAMW_TORCH_XLA), on CPU tensors here."""
    cfg = load_config([f"optimizer={optimizer}", f"lr={LR}", f"weight_decay={WD}"], num_devices=runtime.device_count())
    engine = XlaEngine() if backend == "xla" else DTensorEngine()
    device = torch_xla.device() if backend == "xla" else torch.device("cpu")
    torch.manual_seed(0)
    start = torch.randn(16, 8)
    grad = torch.randn(16, 8)

    def one_real_step(prime: bool) -> torch.Tensor:
        model = torch.nn.Linear(8, 16, bias=False).to(device)
        with torch.no_grad():
            model.weight.copy_(start.to(model.weight.device))
        engine.cut()
        opt = build_optimizer(cfg, model, engine.optimizer_class(cfg.optimizer))
        if prime:
            engine.prime_optimizer(opt)
            assert int(opt.state[model.weight]["step"]) == 1
            assert model.weight.grad is None
            # One decoupled weight decay and nothing else (zero moments give a zero update).
            torch.testing.assert_close(model.weight.cpu(), start * (1 - LR * WD), rtol=1e-6, atol=0)
        model.weight.grad = grad.to(model.weight.device)
        opt.step()
        engine.cut()
        return model.weight.detach().cpu()

    primed, unprimed = one_real_step(True), one_real_step(False)
    torch.testing.assert_close(primed, adamw_by_hand(start * (1 - LR * WD), [grad], steps_before=1), rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(unprimed, adamw_by_hand(start, [grad]), rtol=1e-5, atol=1e-7)

    # The first real update's size (weight decay aside): about 0.74x an unprimed one.
    primed_update = (primed - start * (1 - LR * WD) * (1 - LR * WD)).abs()
    unprimed_update = (unprimed - start * (1 - LR * WD)).abs()
    expected = ((1 - BETA1) / (1 - BETA1 ** 2)) / math.sqrt((1 - BETA2) / (1 - BETA2 ** 2))
    assert expected == pytest.approx(0.744, abs=1e-3)
    ratio = (primed_update / unprimed_update).median().item()
    assert ratio == pytest.approx(expected, rel=1e-3)


# The MLPerf Mixtral reference's no-decay patterns and grouping, copied from mlcommons/training
# retired_benchmarks/mixtral8x22b/model_utils_tpu.py (setup_model_optimizer, commit ce651e35ff52):
#     no_decay = ["bias", "layer_norm.weight"]
#     decay group:    [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)]
#     no-decay group: [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)]
REFERENCE_NO_DECAY = ["bias", "layer_norm.weight"]


def reference_decays(name: str) -> bool:
    return not any(nd in name for nd in REFERENCE_NO_DECAY)


@pytest.fixture(scope="module")
def mixtral_8x22b():
    """Mixtral-8x22B with its real parameter names, on the meta device (no memory)."""
    from transformers import AutoConfig, MixtralForCausalLM

    from clm.model.config import CONFIGS_DIR

    with torch.device("meta"):
        return MixtralForCausalLM(AutoConfig.from_pretrained(CONFIGS_DIR / "mixtral822.json"))


def decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("preset", [[], ["+experiment=gbs256_tpu"], ["+experiment=convergence_template"]])
def test_default_and_mlperf_presets_decay_what_the_reference_decays_every_mixtral_parameter(mixtral_8x22b, preset):
    names = dict(mixtral_8x22b.named_parameters())
    assert len(names) == 1 + 56 * 9 + 2  # embeddings; per layer q, k, v, o, router, gate_up, down, 2 norms; norm, head
    assert all(reference_decays(name) for name in names), "the reference's patterns now match a Mixtral parameter"
    cfg = load_config([*preset, "optimizer=AdamW"], num_devices=256)
    decay = decay_of(build_optimizer(cfg, mixtral_8x22b, torch.optim.AdamW))
    assert {name: decay[id(p)] for name, p in names.items()} == {name: cfg.weight_decay for name in names}


def test_norms_and_biases_can_be_exempt_as_megatron_does(mixtral_8x22b):
    cfg = load_config(["optimizer=AdamW", "weight_decay_norms_and_biases=false"], num_devices=4)
    decay = decay_of(build_optimizer(cfg, mixtral_8x22b, torch.optim.AdamW))
    exempt = {name for name, p in mixtral_8x22b.named_parameters() if decay[id(p)] == 0.0}
    assert exempt == {name for name, p in mixtral_8x22b.named_parameters() if p.dim() == 1}
    assert exempt and all(name.endswith("norm.weight") for name in exempt)
    # a bias is exempt whatever its shape (gpt-oss's expert biases are [experts, width])
    model = torch.nn.Module()
    model.experts_bias = torch.nn.Parameter(torch.zeros(4, 8))
    model.proj = torch.nn.Linear(8, 8)
    decay = decay_of(build_optimizer(cfg, model, torch.optim.AdamW))
    assert [decay[id(p)] for p in (model.experts_bias, model.proj.bias, model.proj.weight)] == [0.0, 0.0, WD]


@pytest.mark.parametrize("exempt", [False, True])
def test_a_step_decays_norm_weights_unless_exempt(exempt):
    cfg = load_config(["optimizer=AdamW", f"lr={LR}", f"weight_decay={WD}",
                       f"weight_decay_norms_and_biases={str(not exempt).lower()}"], num_devices=4)
    norm = torch.nn.LayerNorm(8)
    optimizer = build_optimizer(cfg, norm, torch.optim.AdamW)
    for p in norm.parameters():
        p.grad = torch.zeros_like(p)  # zero moments: the step is the decoupled decay alone
    optimizer.step()
    expected = 1.0 if exempt else 1 - LR * WD
    torch.testing.assert_close(norm.weight.detach(), torch.full((8,), expected), rtol=0, atol=1e-7)
