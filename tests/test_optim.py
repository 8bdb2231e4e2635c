"""Optimizer priming as the reference does it, against AdamW written out by hand."""

import math

import pytest
import torch
import torch_xla

from clm import runtime
from clm.config import load_config
from clm.optim import build_optimizer, prime_optimizer

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


@pytest.mark.parametrize("optimizer", ["ADAMW_TORCH_XLA", "AdamW"])
def test_priming_is_one_zero_gradient_step_then_training_uses_step_2s_bias_correction(optimizer):
    cfg = load_config([f"optimizer={optimizer}", f"lr={LR}", f"weight_decay={WD}"], num_devices=runtime.device_count())
    torch.manual_seed(0)
    start = torch.randn(16, 8)
    grad = torch.randn(16, 8)

    def one_real_step(prime: bool) -> torch.Tensor:
        model = torch.nn.Linear(8, 16, bias=False).to(torch_xla.device())
        with torch.no_grad():
            model.weight.copy_(start.to(model.weight.device))
        torch_xla.sync()
        opt = build_optimizer(cfg, model)
        if prime:
            prime_optimizer(opt)
            assert int(opt.state[model.weight]["step"]) == 1
            assert model.weight.grad is None
            # One decoupled weight decay and nothing else (zero moments give a zero update).
            torch.testing.assert_close(model.weight.cpu(), start * (1 - LR * WD), rtol=1e-6, atol=0)
        model.weight.grad = grad.to(model.weight.device)
        opt.step()
        torch_xla.sync()
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
