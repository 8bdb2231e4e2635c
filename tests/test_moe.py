"""clm.model.moe against HF's stock Mixtral experts and a per-token loop, on CPU eager and XLA.
(tests/test_families.py runs the same checks over every family.)"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torch_xla
import torch_xla.debug.metrics as met
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from clm.model import moe

# Autograd counts each backend's devices once, at the first backward of the process. Start
# XLA's runtime at collection, before any test runs a (CPU) backward, or XLA backwards fail
# an internal assert of the autograd engine (torch_xla.device() alone does not start it
# under SPMD).
xr.global_runtime_device_count()
DEVICE = torch_xla.device()

NUM_EXPERTS, TOP_K, VOCAB = 8, 2, 64
NO_DROP_FACTOR = NUM_EXPERTS / TOP_K  # C = S: no expert queue can be longer than S


def tiny_config(experts_implementation: str = "eager") -> MixtralConfig:
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    config._experts_implementation = experts_implementation
    return config


def hf_and_clm_models(capacity_factor: float) -> tuple[MixtralForCausalLM, MixtralForCausalLM, moe.Routing]:
    """HF's stock eager Mixtral and the same weights with clm's experts (and their routing)."""
    torch.manual_seed(0)
    reference = MixtralForCausalLM(tiny_config())
    model = MixtralForCausalLM(tiny_config(moe.EXPERTS_IMPLEMENTATION))
    model.load_state_dict(reference.state_dict())
    return reference, model, moe.Routing(model, capacity_factor)


def logits_loss_grads(model: MixtralForCausalLM, input_ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    output = model(input_ids=input_ids, labels=input_ids)
    output.loss.backward()
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    return output.logits, output.loss, grads


def assert_same_training_signal(reference, model, input_ids, device, atol):
    ref_logits, ref_loss, ref_grads = logits_loss_grads(reference, input_ids)
    model = model.to(device)
    logits, loss, grads = logits_loss_grads(model, input_ids.to(device))
    torch_xla.sync()  # on XLA, run one graph for all of them rather than one per .cpu()
    torch.testing.assert_close(logits.cpu(), ref_logits, rtol=0, atol=atol)
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=0, atol=atol)
    for name, ref_grad in ref_grads.items():
        torch.testing.assert_close(grads[name].cpu(), ref_grad, rtol=0, atol=atol, msg=name)
    return model


@pytest.mark.parametrize("capacity_factor", [NO_DROP_FACTOR, 0.0], ids=["no_drops", "dropless"])
def test_matches_hf_eager_on_cpu(capacity_factor):
    reference, model, routing = hf_and_clm_models(capacity_factor)
    input_ids = torch.randint(0, VOCAB, (3, 16))
    assert_same_training_signal(reference, model, input_ids, "cpu", atol=1e-6)
    assert routing.metrics()["moe/drop_fraction"].item() == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor", [NO_DROP_FACTOR, 0.0], ids=["no_drops", "dropless"])
def test_matches_hf_eager_on_xla(capacity_factor):
    reference, model, _ = hf_and_clm_models(capacity_factor)
    input_ids = torch.randint(0, VOCAB, (2, 16))
    assert_same_training_signal(reference, model, input_ids, DEVICE, atol=1e-5)


def test_expert_capacity():
    assert moe.expert_capacity(32768, 2, 8, 1.25) == 10240
    assert moe.expert_capacity(4, 2, 8, 1.25) == 1
    assert moe.expert_capacity(2, 2, 8, 1.25) == 1  # int(0.625) = 0 -> clm keeps 1
    assert moe.expert_capacity(3, 2, 8, 1.25) == 1  # int(0.9375) = 0 -> 1
    assert moe.expert_capacity(13, 2, 8, 1.25) == 4  # int(3.25 * 1.25) = int(4.0625)
    # The reference's expression multiplies after dividing: (S*K/E)*cf, not S*K*cf/E.
    for length in range(1, 600):
        expected = max(1, min(length, int((length * 2 / 8) * 1.3)))
        assert moe.expert_capacity(length, 2, 8, 1.3) == expected, length
    assert moe.expert_capacity(16, 2, 8, 0.0) == 16  # dropless: S slots
    assert moe.expert_capacity(16, 2, 8, 100.0) == 16  # no queue is longer than S


# --- capacity semantics against an obviously correct loop ---------------------------------


def loop_reference(block: MixtralSparseMoeBlock, hidden: torch.Tensor, capacity_factor: float):
    """Per sequence, walk positions in order and each token's choices in order; an expert
    takes an assignment while it has fewer than C; a token whose every choice was dropped
    passes its input through (the reference's clone of the block input). Returns the output
    and the dropped count."""
    batch, length, hidden_dim = hidden.shape
    experts = block.experts
    _, weights, index = block.gate(hidden.reshape(-1, hidden_dim))
    weights, index = weights.view(batch, length, TOP_K), index.view(batch, length, TOP_K)
    capacity = max(1, int((length * TOP_K / NUM_EXPERTS) * capacity_factor))
    output = hidden.clone()
    dropped = 0
    for b in range(batch):
        taken = [0] * NUM_EXPERTS
        for s in range(length):
            kept_any = False
            for k in range(TOP_K):
                e = int(index[b, s, k])
                if taken[e] == capacity:
                    dropped += 1
                    continue
                taken[e] += 1
                if not kept_any:
                    output[b, s] = 0
                    kept_any = True
                gate, up = (experts.gate_up_proj[e] @ hidden[b, s]).chunk(2)
                output[b, s] += weights[b, s, k] * (experts.down_proj[e] @ (F.silu(gate) * up))
    return output, dropped


def forced_block_and_input(capacity_factor: float, constrain=None):
    """Sequence 0 sends every token to experts 3 then 5 (through a router direction); the
    others, orthogonal to that direction, route randomly and overflow experts with a mix of
    first and second choices. Capacity must be counted per sequence."""
    torch.manual_seed(0)
    config = tiny_config(moe.EXPERTS_IMPLEMENTATION)
    block = MixtralSparseMoeBlock(config)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    direction = F.normalize(torch.randn(config.hidden_size), dim=0)
    with torch.no_grad():
        block.gate.weight[3] += 3.0 * direction
        block.gate.weight[5] += 2.7 * direction
    routing = moe.Routing(block, capacity_factor, constrain)
    hidden = torch.randn(3, 24, config.hidden_size)
    hidden -= (hidden @ direction).unsqueeze(-1) * direction
    hidden[0] += 10 * direction
    return block, hidden, routing


def test_capacity_matches_per_token_loop():
    block, hidden, routing = forced_block_and_input(1.25)
    expected, dropped = loop_reference(block, hidden, 1.25)
    output = block(hidden)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)

    # The forced sequence fills experts 3 and 5 after C = int(24*2/8*1.25) = 7 tokens:
    # every later token loses both choices and passes its input through. Random ones drop too.
    _, _, index = block.gate(hidden[0])
    assert (index[:, 0] == 3).all() and (index[:, 1] == 5).all()
    assert output[0, :7].abs().amax(dim=-1).gt(0).all()
    assert not torch.equal(output[0, :7], hidden[0, :7])
    assert torch.equal(output[0, 7:], hidden[0, 7:])
    random_dropped = dropped - 2 * (24 - 7)
    assert random_dropped > 0

    metrics = routing.metrics()
    assert metrics["moe/drop_fraction"].item() == pytest.approx(dropped / (3 * 24 * TOP_K))
    assert metrics["moe/expert_load_max"].item() == 24
    assert metrics["moe/expert_load_mean"].item() == 24 * TOP_K / NUM_EXPERTS


def test_capacity_matches_per_token_loop_on_xla():
    block, hidden, _ = forced_block_and_input(1.25)
    expected, _ = loop_reference(block, hidden, 1.25)
    output = block.to(DEVICE)(hidden.to(DEVICE))
    torch.testing.assert_close(output.cpu(), expected, rtol=0, atol=1e-5)


def test_gradients_reach_router_and_every_expert():
    block, hidden, _ = forced_block_and_input(1.25)
    block(hidden[1:]).square().sum().backward()
    assert block.gate.weight.grad.abs().sum() > 0
    for expert in range(NUM_EXPERTS):
        assert block.experts.gate_up_proj.grad[expert].abs().sum() > 0, expert
        assert block.experts.down_proj.grad[expert].abs().sum() > 0, expert


def test_fully_dropped_tokens_get_the_identity_gradient():
    block, hidden, _ = forced_block_and_input(1.25)
    hidden.requires_grad_(True)
    block(hidden).sum().backward()
    # Tokens 7.. of the forced sequence are fully dropped: their output is their input, so the
    # gradient of sum() is exactly 1, with nothing through the experts or the router (their
    # weights are multiplied by zero).
    assert hidden.grad[0, 7:].eq(1).all()
    assert not hidden.grad[0, :7].eq(1).all()
    assert block.experts.gate_up_proj.grad is not None


def test_activation_constraint_sees_every_expert_activation():
    shapes = []
    block, hidden, _ = forced_block_and_input(1.25, constrain=lambda tensor: shapes.append(tuple(tensor.shape)) or tensor)
    capacity = 7  # floor(24 * 2 * 1.25 / 8)
    block(hidden)
    hidden_dim, intermediate_dim = block.experts.hidden_dim, block.experts.intermediate_dim
    assert shapes == [
        (3, NUM_EXPERTS, capacity, hidden_dim),
        (3, NUM_EXPERTS, capacity, intermediate_dim),
        (3, NUM_EXPERTS, capacity, hidden_dim),
    ]


def test_capacity_experts_need_the_routing_of_a_built_model():
    config = tiny_config(moe.EXPERTS_IMPLEMENTATION)
    block = MixtralSparseMoeBlock(config)
    with pytest.raises(RuntimeError, match="build_sharded_model"):
        block(torch.randn(1, 4, config.hidden_size))


# --- load-balancing loss -------------------------------------------------------------------


def random_router_logits() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(48, NUM_EXPERTS, requires_grad=True) for _ in range(3))


def aux_loss() -> moe.AuxLoss:
    return moe.AuxLoss(NUM_EXPERTS, TOP_K, 0.02)


def test_load_balancing_loss_is_hfs_unmasked_value_with_its_gradients():
    """clm counts as HF's masked branch does (scatter_add): the same value and gradients as HF's
    unmasked call (its histc branch, which runs on CPU only)."""
    router_logits = random_router_logits()
    expected = load_balancing_loss_func(router_logits, NUM_EXPERTS, TOP_K)
    loss = aux_loss()(router_logits)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    expected_grads = torch.autograd.grad(expected, router_logits)
    for grad, expected_grad in zip(torch.autograd.grad(loss, router_logits), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_load_balancing_loss_pooled_over_row_holders_is_the_whole_batchs():
    """Two holders of half the rows each (the DTensor engine's processes), their fractions
    averaged by `pool`, get the whole batch's loss and gradients; the mean of the two halves'
    own losses is a different number (what the DTensor engine computed before pooling)."""
    router_logits = random_router_logits()
    expected = load_balancing_loss_func(router_logits, NUM_EXPERTS, TOP_K)
    halves = [tuple(logits[part * 24:(part + 1) * 24] for logits in router_logits) for part in (0, 1)]

    def fractions(rows):  # what a holder of `rows` hands to pool
        held = []
        aux_loss()(rows, lambda local: held.append(local) or local)
        return held[0]

    loss = aux_loss()(halves[0], lambda local: (local + fractions(halves[1])) / 2)  # an all-reduce's mean
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    expected_grads = torch.autograd.grad(expected, router_logits)
    for grad, expected_grad in zip(torch.autograd.grad(loss, router_logits), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    pooled = [aux_loss()(half) for half in halves]
    assert abs(float(sum(pooled).detach() / 2) - float(expected.detach())) > 1e-4 * float(expected.detach())


def test_recorded_router_logits_are_the_ones_transformers_reports():
    _, model, routing = hf_and_clm_models(1.25)
    input_ids = torch.randint(0, VOCAB, (2, 16))
    reported = model.model(input_ids=input_ids, output_router_logits=True).router_logits
    recorded = routing.router_logits()
    assert len(recorded) == len(reported) == model.config.num_hidden_layers
    for ours, theirs in zip(recorded, reported):
        assert ours.requires_grad
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_load_balancing_loss_on_xla():
    # HF's unmasked call fails here (torch.histc on integers); the CPU result is the reference.
    router_logits = random_router_logits()
    expected = load_balancing_loss_func(router_logits, NUM_EXPERTS, TOP_K)
    on_xla = tuple(logits.detach().to(DEVICE) for logits in router_logits)
    loss = aux_loss()(on_xla)
    torch.testing.assert_close(loss.cpu(), expected.detach(), rtol=1e-5, atol=0)


# --- XLA: static shapes --------------------------------------------------------------------


@pytest.mark.slow
def test_xla_training_steps_do_not_recompile_or_sync():
    """Fresh random tokens (so fresh routing) every step, as the trainer calls the API."""

    def sample_count(metric: str) -> int:
        data = met.metric_data(metric)
        return 0 if data is None else data[0]

    _, model, routing = hf_and_clm_models(1.25)
    model = model.to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step():
        input_ids = torch.randint(0, VOCAB, (2, 16)).to(DEVICE)
        outputs = model.model(input_ids=input_ids)
        logits = model.lm_head(outputs.last_hidden_state)
        loss = F.cross_entropy(logits.view(-1, VOCAB), input_ids.view(-1))
        loss = loss + model.config.router_aux_loss_coef * routing.load_balancing_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = routing.metrics()
        torch_xla.sync()
        return metrics

    for _ in range(2):
        train_step()
    compiles, transfers = sample_count("CompileTime"), sample_count("TransferFromDeviceTime")
    drop_fractions = [train_step()["moe/drop_fraction"] for _ in range(3)]
    assert sample_count("CompileTime") - compiles == 0
    assert sample_count("TransferFromDeviceTime") - transfers == 0
    # The routing really changed between steps.
    assert len({fraction.item() for fraction in drop_fractions}) > 1


SHARDED_STEP = """
import glob, sys
import numpy as np, torch, torch_xla
import torch_xla.distributed.spmd as xs, torch_xla.runtime as xr
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from clm.model import moe

xr.use_spmd()
mesh = xs.Mesh(np.arange(4), (4,), ("data",))
torch.manual_seed(0)
config = MixtralConfig(hidden_size=32, intermediate_size=112, num_local_experts=8, num_experts_per_tok=2)
config._experts_implementation = moe.EXPERTS_IMPLEMENTATION
block = MixtralSparseMoeBlock(config)
for parameter in block.parameters():
    torch.nn.init.normal_(parameter, std=0.2)
moe.Routing(block, 1.25)
hidden = torch.randn(8, 24, 32)
expected = block(hidden)
block = block.to(torch_xla.device())
sharded = hidden.to(torch_xla.device())
xs.mark_sharding(sharded, mesh, ("data", None, None))
output = block(sharded)
output.square().sum().backward()
grads = [p.grad for p in block.parameters()]  # alive at the sync, so in the step graph
torch_xla.sync()
torch.testing.assert_close(output.cpu(), expected, rtol=0, atol=1e-5)
step_graphs = glob.glob(sys.argv[1] + "/*SyncTensorsGraph*after_optimizations.txt")
hlo = "".join(open(f).read() for f in step_graphs)
assert "dot(" in hlo
for collective in ("all-gather(", "all-to-all(", "collective-permute("):
    assert collective not in hlo, collective
print("ok")
"""


@pytest.mark.slow
def test_batch_sharded_moe_stays_local_under_spmd(tmp_path):
    """Sequences sharded over 4 devices, weights replicated: same output, and the compiled step
    moves no tokens between devices (only the weight gradients are all-reduced). A separate
    process, because SPMD mode cannot be switched off again."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PJRT_DEVICE="CPU",
        CPU_NUM_DEVICES="4",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text",
        PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_STEP, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_capacity_with_pass_through_under_expert_parallel_spmd(tmp_path):
    """The forced routing (fully dropped tokens included) in a model built for 8 devices,
    fsdp 2 x expert 4 (build_sharded_model: expert weights split by expert, the [B, E, C, *]
    buffers constrained by the model's routing): output and input gradient equal the
    per-token loop's."""
    import json

    from clm import parallel
    from clm.config import load_config
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan
    from clm.parallel.placement import place

    block, hidden, _ = forced_block_and_input(1.25)
    hidden = torch.cat([hidden, hidden.flip(0)[:1]])  # 4 sequences: 2 per fsdp shard
    expected, _ = loop_reference(block, hidden, 1.25)
    cpu_hidden = hidden.clone().requires_grad_(True)
    loop_reference(block, cpu_hidden, 1.25)[0].square().sum().backward()

    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    cfg = load_config([f"model.config_path={tmp_path / 'config.json'}", "expert_parallelism=4", "max_length=24"],
                      num_devices=8)
    model = build_sharded_model(ModelPlan.from_config(cfg, parallel.mesh_shape(8, 1, 4, 1)))
    for name, value in block.state_dict().items():  # the forced weights into layer 0's block
        full_name = f"model.layers.0.mlp.{name}"
        place(model.module.get_parameter(full_name), model.placements[full_name], lambda index: value[index])
    sharded_block = model.module.model.layers[0].mlp
    sharded = hidden.to(DEVICE).requires_grad_(True)
    xs.mark_sharding(sharded, model.mesh, (parallel.DATA_AXES, None, None))
    output = sharded_block(sharded)
    output.square().sum().backward()
    torch_xla.sync()
    # (fsdp-split weights sum their products in another order: fp32 rounding)
    torch.testing.assert_close(output.cpu(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sharded.grad.cpu(), cpu_hidden.grad, rtol=1e-5, atol=1e-4)
    assert torch.equal(output.cpu()[0, 7:], hidden[0, 7:])  # passed through on the device too
