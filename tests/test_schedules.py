"""Learning-rate schedules step by step: NeMo's formulas (nemo/core/optim/lr_scheduler.py),
and megatron-core's own OptimizerParamScheduler."""

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
    cfg = OmegaConf.create({"lr": BASE_LR, "sched": s, "global_train_batch_size": 8})
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=BASE_LR)
    scheduler = build_scheduler(cfg, optimizer)
    for step in range(30):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(step, BASE_LR, s), rel=1e-12)
        optimizer.step()
        scheduler.step()


# ------------------------------------------------------------------ Megatron's


def megatron_sched(lr_warmup_iters, lr_decay_iters, min_lr, style="cosine", max_steps=1_200_000, init=0.0):
    return OmegaConf.create(dict(name="OptimizerParamScheduler", lr_decay_style=style, lr_warmup_iters=lr_warmup_iters,
                                 lr_decay_iters=lr_decay_iters, lr_warmup_init=init, min_lr=min_lr,
                                 max_steps=max_steps))


def megatron_lrs(sched, max_lr, global_batch_size, steps):
    """megatron-core's OptimizerParamScheduler, built and stepped as Megatron-LM's training loop
    does (get_optimizer_param_scheduler, train_step): in samples, one step per iteration."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class Optimizer:  # the scheduler writes each group's lr; a plain list of groups is all it needs
        param_groups = [{}]

    decay_iters = sched.lr_decay_iters if sched.lr_decay_iters is not None else sched.max_steps
    scheduler = OptimizerParamScheduler(
        Optimizer(), init_lr=sched.lr_warmup_init, max_lr=max_lr, min_lr=sched.min_lr,
        lr_warmup_steps=sched.lr_warmup_iters * global_batch_size, lr_decay_steps=decay_iters * global_batch_size,
        lr_decay_style=sched.lr_decay_style, start_wd=0.1, end_wd=0.1,
        wd_incr_steps=sched.max_steps * global_batch_size, wd_incr_style="constant")
    lrs = {}
    for step in range(max(steps) + 1):
        if step in steps:
            lrs[step] = scheduler.optimizer.param_groups[0]["lr"]
        scheduler.step(increment=global_batch_size)
    return lrs


def test_gpt_oss_20b_schedule_equals_megatron_core():
    """The reference's values (conf/gpt_oss_20B-pretrain.yaml, config_B200_1x8x1.sh): lr 4e-4 to
    min_lr 4e-5, 128 warmup iterations, decay ending at 1,200,000 - 128, global batch 16; every
    step of warmup and the start of the decay, then steps across the decay, its end and beyond."""
    sched = megatron_sched(128, 1_200_000 - 128, 4e-5)
    steps = {*range(0, 600), *range(0, 1_200_100, 9_973), *range(1_199_700, 1_200_100)}
    expected = megatron_lrs(sched, 4e-4, 16, steps)
    for step in sorted(steps):
        assert learning_rate(step, 4e-4, sched, 16) == expected[step], step
    assert expected[0] == 0.0 and expected[128] == 4e-4 and expected[1_199_872] == expected[1_200_000] == 4e-5


@pytest.mark.parametrize("style, global_batch_size, init", [("cosine", 24, 0.0), ("linear", 7, 1e-5),
                                                            ("constant", 16, 0.0)])
def test_megatron_styles_equal_megatron_core(style, global_batch_size, init):
    sched = megatron_sched(10, None, 3e-5, style=style, max_steps=100, init=init)  # decay ends at max_steps
    steps = set(range(130))
    expected = megatron_lrs(sched, 3e-4, global_batch_size, steps)
    assert [learning_rate(k, 3e-4, sched, global_batch_size) for k in sorted(steps)] == [expected[k] for k in sorted(steps)]


def test_optimizer_follows_megatrons_schedule():
    """Through the trainer's scheduler: the k-th optimizer step runs at Megatron's lr after k steps."""
    sched = megatron_sched(4, 20, 2e-6, max_steps=20)
    cfg = OmegaConf.create({"lr": BASE_LR, "sched": sched, "global_train_batch_size": 16})
    expected = megatron_lrs(sched, BASE_LR, 16, set(range(30)))
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=BASE_LR)
    scheduler = build_scheduler(cfg, optimizer)
    for step in range(30):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected[step], rel=1e-12, abs=1e-20)
        optimizer.step()
        scheduler.step()
