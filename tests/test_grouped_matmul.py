"""clm.model.grouped_matmul: the dropless experts' manual-sharding region, on 8 virtual CPU
devices, with a grouped matmul standing in for the Pallas kernel inside the same region.

The stand-in behaves as megablox's gmm does where it matters: rows of no group are left
unwritten (NaN here), in the forward and in the backward, so the region's masking is tested.
"""

from __future__ import annotations

import pytest
import torch
import torch_xla
import torch_xla.runtime as xr
from transformers import AutoConfig, AutoModelForCausalLM

from clm import parallel, runtime
from clm.config import load_config
from clm.model import grouped_matmul, mlperf_gpt_oss
from clm.model.build import build_sharded_model
from clm.model.plan import ModelPlan

xr.global_runtime_device_count()  # start XLA's runtime before any CPU backward (see test_moe.py)

BATCH, LENGTH = 8, 16
NUM_EXPERTS, TOP_K = 8, 4  # at expert parallelism 4 a shard holds 2 < K experts: R = 2 x tokens


class StandInGroupedMatmul(torch.autograd.Function):
    """lhs [m, k] sorted by group, rhs [G, k, n], sizes [G] -> [m, n], one einsum per group.
    Rows past the last group come out NaN (forward) and get NaN gradients (backward), as the
    Pallas kernel leaves them unwritten."""

    @staticmethod
    def forward(ctx, lhs, rhs, group_sizes):
        group = (torch.arange(lhs.shape[0], device=lhs.device)[:, None] >= group_sizes.cumsum(0)[None, :]).sum(1)
        ctx.save_for_backward(lhs, rhs, group)
        return _per_group(lhs, rhs, group)

    @staticmethod
    def backward(ctx, grad):
        lhs, rhs, group = ctx.saved_tensors
        d_lhs = _per_group(grad, rhs.transpose(1, 2), group)
        # Only the rows of each group, selected (not multiplied: unwritten rows may hold NaN).
        in_group = torch.nn.functional.one_hot(group, rhs.shape[0] + 1)[:, : rhs.shape[0]].to(lhs.dtype)  # [m, G]
        outside = (group >= rhs.shape[0])[:, None]
        d_rhs = torch.einsum("mg,mk,mn->gkn", in_group, torch.where(outside, 0, lhs), torch.where(outside, 0, grad))
        return d_lhs, d_rhs, None


def _per_group(lhs, rhs, group):
    every = torch.einsum("mk,gkn->gmn", lhs, rhs)
    picked = every.gather(0, group.clamp(max=rhs.shape[0] - 1)[None, :, None].expand(1, -1, every.shape[-1]))[0]
    return torch.where(group[:, None] < rhs.shape[0], picked, float("nan"))


def tiny_config():
    return AutoConfig.for_model(
        mlperf_gpt_oss.MODEL_TYPE, vocab_size=512, hidden_size=32, intermediate_size=24, moe_intermediate_size=24,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K, sliding_window=5, layer_types=["sliding_attention"], mlp_layer_types=["sparse"],
        router_aux_loss_coef=0.0, pad_token_id=None)


def build(fsdp: int, expert: int, tensor: int):
    runtime.setup(None, False)
    cfg = load_config(["model.capacity_factor=0", f"max_length={LENGTH}", f"global_train_batch_size={BATCH}",
                       f"expert_parallelism={expert}", f"tensor_parallelism={tensor}"], num_devices=8)
    shape = parallel.mesh_shape(8, tensor, expert, 1)
    assert (shape.fsdp, shape.expert, shape.tensor) == (fsdp, expert, tensor)
    # the same weights on any mesh (clm.model.init)
    return build_sharded_model(ModelPlan.from_config(cfg, shape, hf_config=tiny_config()))


def loss_and_grads(model):
    input_ids = torch.randint(0, 512, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(torch_xla.device())
    for parameter in model.parameters():
        parameter.grad = None
    terms = model.loss_terms(input_ids, input_ids.roll(-1, dims=1), -100)
    terms.loss.backward()
    torch_xla.sync()
    return terms.loss.item(), {name: p.grad.cpu() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def static_path():
    """Loss and gradients of the static dropless path (C = S), which CPU builds use."""
    model = build(8, 1, 1)
    assert all(layer.dropless is None for layer in model.routing.layers)
    return loss_and_grads(model)


# (fsdp, expert, tensor) on 8 devices
@pytest.mark.parametrize("fsdp,expert,tensor", [(2, 4, 1), (8, 1, 1), (2, 2, 2)])
def test_region_equals_the_static_path_outputs_and_gradients(static_path, fsdp, expert, tensor):
    model = build(fsdp, expert, tensor)
    region = grouped_matmul.DroplessExperts(model.mesh, model.mesh_shape, StandInGroupedMatmul.apply, row_tile=1)
    for layer in model.routing.layers:
        layer.dropless = region
    loss, grads = loss_and_grads(model)

    static_loss, static_grads = static_path
    assert loss == pytest.approx(static_loss, rel=1e-6)
    assert grads.keys() == static_grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, static_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert all(grads[name].abs().sum() > 0 for name in grads if "experts" in name)


def test_receive_rows_are_the_worst_case_rounded_to_the_row_tile():
    shape = parallel.MeshShape(1, 1, 4, 1)
    # 32 experts, 4 per token: 8 per shard >= K, so one shard may send all 4 choices of every token
    assert grouped_matmul.DroplessExperts(None, shape, row_tile=1).receive_rows(8192, 4, 32) == 4 * 8192
    # 8 experts over 4 shards: at most 2 of a token's 4 choices land on one shard
    assert grouped_matmul.DroplessExperts(None, shape, row_tile=1).receive_rows(100, 4, 8) == 200
    assert grouped_matmul.DroplessExperts(None, shape).receive_rows(100, 4, 8) == 512  # Pallas' 512-row tiles


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_local_experts_match_hf_eager_for_each_layout(model_type):
    """One device's part of the region, on CPU eager, with a plain loop standing in for the
    kernel: fused [E, 2I, H] experts (Mixtral) and transposed, biased, interleaved ones (gpt-oss);
    every (token, choice) is one row, weighted and summed afterwards as the combine does."""
    from families import family_config

    def loop_grouped_matmul(lhs, rhs, group_sizes):
        ends = group_sizes.cumsum(0).tolist()
        return torch.cat([lhs[start:end] @ rhs[g] for g, (start, end) in enumerate(zip([0] + ends[:-1], ends))])

    torch.manual_seed(0)
    config = family_config(model_type)
    config._experts_implementation = "eager"
    block = AutoModelForCausalLM.from_config(config).model.layers[0].mlp
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    router = getattr(block, "gate", None) or block.router
    hidden = torch.randn(40, config.hidden_size)
    _, weights, index = router(hidden)
    expected = block.experts(hidden, index, weights)  # HF eager

    region = grouped_matmul.DroplessExperts(None, parallel.MeshShape(1, 1, 1, 1), loop_grouped_matmul, row_tile=1)
    rows = hidden.repeat_interleave(index.shape[1], dim=0)
    output = region.local_experts(block.experts, rows, index.reshape(-1), grouped_matmul.expert_weights(block.experts))
    combined = (output.view(*index.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)
    torch.testing.assert_close(combined, expected, rtol=0, atol=1e-5)
