"""Learning-rate schedules against NeMo's formulas (nemo/core/optim/lr_scheduler.py), step by step."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from clm.optim import build_scheduler, learning_rate

BASE_LR = 2e-5


def sched(name, max_steps=100, warmup_ratio=0.25, hold_steps=None, min_lr=0.0):
    return OmegaConf.create(dict(name=name, warmup_ratio=warmup_ratio, max_steps=max_steps,
                                 hold_steps=hold_steps, min_lr=min_lr))


# Expected values written out from NeMo's code with max_steps=100, warmup_ratio=0.25:
# warmup_steps = int(0.25 * 100) = 25; warmup lr = base * (step + 1) / 26.
@pytest.mark.parametrize(
    "step, expected",
    [(0, BASE_LR / 26), (10, BASE_LR * 11 / 26), (24, BASE_LR * 25 / 26), (25, BASE_LR),
     (26, BASE_LR), (100, BASE_LR),
     # hold_steps = 1e13 + 25 covers every step, and the hold branch comes before the
     # past-max_steps branch in NeMo, so the lr stays at base even after max_steps.
     (101, BASE_LR), (10_000, BASE_LR)],
)
def test_warmup_hold_with_the_reference_hold(step, expected):
    assert learning_rate(step, BASE_LR, sched("WarmupHoldPolicy", hold_steps=10**13)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [(0, BASE_LR / 26), (25, BASE_LR), (34, BASE_LR), (35, BASE_LR), (100, BASE_LR), (101, 1e-6), (500, 1e-6)],
)
def test_warmup_hold_with_a_short_hold_falls_to_min_lr_after_max_steps(step, expected):
    # hold ends at 10 + 25 = 35; then _get_lr (base) until max_steps, min_lr after.
    s = sched("WarmupHoldPolicy", hold_steps=10, min_lr=1e-6)
    assert learning_rate(step, BASE_LR, s) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [(0, BASE_LR / 26), (12, BASE_LR * 13 / 26), (25, BASE_LR),
     (50, (BASE_LR - 2e-6) * 0.5 * (1 + math.cos(math.pi * 25 / 75)) + 2e-6),
     (75, (BASE_LR - 2e-6) * 0.5 * (1 + math.cos(math.pi * 50 / 75)) + 2e-6),
     (100, 2e-6), (101, 2e-6)],
)
def test_cosine_annealing(step, expected):
    s = sched("CosineAnnealing", min_lr=2e-6)
    assert learning_rate(step, BASE_LR, s) == pytest.approx(expected, rel=1e-12)


def test_no_warmup_starts_at_base_lr():
    assert learning_rate(0, BASE_LR, sched("WarmupHoldPolicy", warmup_ratio=0.0, hold_steps=10**13)) == BASE_LR
    assert learning_rate(0, BASE_LR, sched("CosineAnnealing", warmup_ratio=0.0)) == BASE_LR


@pytest.mark.parametrize("name", ["WarmupHoldPolicy", "CosineAnnealing"])
def test_optimizer_sees_the_schedule_step_by_step(name):
    """The optimizer's k-th step (0-based) runs at learning_rate(k), as with NeMo's scheduler."""
    s = sched(name, max_steps=20, hold_steps=10**13 if name == "WarmupHoldPolicy" else None, min_lr=2e-6)
    cfg = OmegaConf.create({"lr": BASE_LR, "sched": s})
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=BASE_LR)
    scheduler = build_scheduler(cfg, optimizer)
    for step in range(30):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(step, BASE_LR, s), rel=1e-12)
        optimizer.step()
        scheduler.step()
