"""SPMD on 8 virtual CPU devices: every mesh trains to the 1-device losses, parameters get the
partition specs the rule table promises, expert parallelism exchanges tokens by all-to-all,
bad meshes and bad rules fail in one line, and the planner counts Mixtral-8x22B right."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import MixtralForCausalLM

from clm import parallel
from clm.config import load_config
from clm.errors import UserError
from clm.model.config import load_model_config
from runs import SHAPES

pytestmark = pytest.mark.xla  # the XLA engine's mesh and placements

REPO = Path(__file__).resolve().parents[1]
# fp32, 8 sequences of 64 tokens (the shared shapes, tests/runs.py), 3 optimizer steps, no eval.
RUN = [*SHAPES, "max_steps=3", "eval_frequency=100", "do_first_eval=false", "model.dtype=float32", "wandb.mode=disabled"]

MESHES = {
    "fsdp8": [],
    "fsdp4_tp2": ["tensor_parallelism=2"],
    "fsdp2_ep4": ["expert_parallelism=4"],
    "fsdp2_tp2_ep2": ["tensor_parallelism=2", "expert_parallelism=2"],
    "dcn2_fsdp4": ["num_slices=2"],
    "fsdp8_checkpointed": ["model.fsdp_config.xla_fsdp_grad_ckpt=true"],
}
# Meshes trained in a process of their own: one device is another process's device count, and the
# all-to-all check reads the optimized HLO XLA writes only where XLA_FLAGS is set before it starts.
IN_A_PROCESS_OF_ITS_OWN = {"fsdp2_ep4"}


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.jsonl") as f:
        return [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]


def run_training(tmp_path: Path, name: str, devices: int, overrides: list[str], env: dict | None = None) -> list[float]:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), **(env or {})}
    result = subprocess.run(
        [sys.executable, str(REPO / "run_clm.py"), f"output_dir={tmp_path}", f"exp_name={name}", *RUN, *overrides],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(tmp_path / name)


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    return run_training(tmp_path_factory.mktemp("one_device"), "one_device", 1, [])


@pytest.mark.slow
def test_one_device_losses_equal_the_golden_file(one_device_losses):
    golden = json.loads((REPO / "tests/golden/tiny_fp32_3steps.json").read_text())
    assert one_device_losses == pytest.approx(golden["train/loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_trains_to_the_one_device_losses(tmp_path, one_device_losses, mesh):
    if mesh in IN_A_PROCESS_OF_ITS_OWN:
        losses = run_training(tmp_path, mesh, 8, MESHES[mesh], {"XLA_FLAGS": f"--xla_dump_to={tmp_path / 'hlo'}"})
        optimized = [p for p in (tmp_path / "hlo").glob("*after_optimizations.txt")]
        assert optimized, "XLA wrote no optimized HLO"
        assert any("all-to-all" in p.read_text() for p in optimized), "expert parallelism without all-to-all"
    else:  # on this process's 8 devices
        from clm.train import train

        cfg = load_config([f"output_dir={tmp_path}", f"exp_name={mesh}", *RUN, *MESHES[mesh]], num_devices=8)
        train(cfg)
        losses = train_losses(tmp_path / mesh)
    assert len(losses) == 3
    assert losses == pytest.approx(one_device_losses, rel=1e-4)


@pytest.mark.slow
def test_activation_checkpointing_keeps_every_gradient_including_the_routers():
    """Same weights, same batch: checkpointed layers must give the same gradients. The routers'
    come only from the load-balancing loss path that reentrant checkpointing would cut."""
    import torch_xla

    from clm import runtime
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan

    runtime.setup(None, False)
    grads = {}
    for checkpointed in (False, True):
        cfg = load_config([f"model.fsdp_config.xla_fsdp_grad_ckpt={checkpointed}", "max_length=32"], num_devices=8)
        model = build_sharded_model(ModelPlan.from_config(cfg, parallel.mesh_shape(8, 1, 1, 1)))
        input_ids = torch.arange(8 * 32).reshape(8, 32).remainder(1000).to(torch_xla.device())
        labels = input_ids.roll(-1, dims=1)  # already shifted, as clm's data gives them
        terms = model.loss_terms(input_ids, labels, cfg.pad_token_id)
        assert terms.aux_loss_coef > 0
        terms.loss.backward()
        torch_xla.sync()
        grads[checkpointed] = {name: p.grad.cpu() for name, p in model.named_parameters()}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-8, msg=name)


def tile_shapes(overrides: list[str]) -> dict[str, str]:
    """The tile assignment XLA holds for one parameter of each kind, e.g. '[2,4]'."""
    import torch_xla

    from clm import runtime
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan

    runtime.setup(None, False)
    cfg = load_config(overrides, num_devices=8)
    shape = parallel.mesh_shape(8, cfg.tensor_parallelism, cfg.expert_parallelism,
                                1 if cfg.num_slices == -1 else cfg.num_slices)
    model = build_sharded_model(ModelPlan.from_config(cfg, shape))
    tiles = {}
    for name, param in model.named_parameters():
        kind = re.sub(r"^model\.layers\.\d+\.", "", name)
        spec = torch_xla._XLAC._get_xla_sharding_spec(param)
        match = re.search(r"devices=(\[[\d,]+\])", spec)
        tiles[kind] = match.group(1) + (" replicated-rest" if "last_tile_dim_replicate" in spec else "") if match else "replicated"
    return tiles


# Written out by hand from clm/conf/sharding/mixtral.yaml: one tile count per dimension
# (a trailing extra count, with "replicated-rest", when some mesh axis is not used).
EXPECTED_TILES = {
    "fsdp8": {
        "model.embed_tokens.weight": "[8,1]", "self_attn.q_proj.weight": "[1,8]", "self_attn.k_proj.weight": "[1,8]",
        "self_attn.o_proj.weight": "[8,1]", "mlp.gate.weight": "[1,8]", "mlp.experts.gate_up_proj": "[1,1,8]",
        "mlp.experts.down_proj": "[1,8,1]", "lm_head.weight": "[1,8]", "input_layernorm.weight": "replicated",
    },
    "fsdp4_tp2": {
        "model.embed_tokens.weight": "[4,2]", "self_attn.q_proj.weight": "[2,4]", "self_attn.k_proj.weight": "[2,4]",
        "self_attn.o_proj.weight": "[4,2]", "mlp.gate.weight": "[1,4,2] replicated-rest",
        "mlp.experts.gate_up_proj": "[1,2,4]", "mlp.experts.down_proj": "[1,4,2]", "lm_head.weight": "[2,4]",
        "input_layernorm.weight": "replicated",
    },
    "fsdp2_ep4": {
        "model.embed_tokens.weight": "[8,1]", "self_attn.q_proj.weight": "[1,8]", "self_attn.o_proj.weight": "[8,1]",
        "mlp.gate.weight": "[1,8]", "mlp.experts.gate_up_proj": "[4,1,2]", "mlp.experts.down_proj": "[4,2,1]",
        "lm_head.weight": "[1,8]", "input_layernorm.weight": "replicated",
    },
    "fsdp2_tp2_ep2": {
        "model.embed_tokens.weight": "[4,2]", "self_attn.q_proj.weight": "[2,4]", "self_attn.o_proj.weight": "[4,2]",
        "mlp.gate.weight": "[1,4,2] replicated-rest", "mlp.experts.gate_up_proj": "[2,2,2]",
        "mlp.experts.down_proj": "[2,2,2]", "lm_head.weight": "[2,4]", "input_layernorm.weight": "replicated",
    },
}


@pytest.mark.parametrize("mesh", EXPECTED_TILES)
def test_each_kind_of_parameter_gets_its_partition_spec(mesh):
    tiles = tile_shapes(MESHES[mesh])
    for kind, expected in EXPECTED_TILES[mesh].items():
        assert tiles[kind] == expected, f"{kind}: {tiles[kind]} != {expected}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tensor_parallelism=3"], "tensor_parallelism=3 must be a positive divisor of the device count (8)"),
        (["expert_parallelism=16"], "expert_parallelism=16"),
        (["tensor_parallelism=2", "global_train_batch_size=6"], "data-parallel devices (4)"),
        (["tensor_parallelism=2", "expert_parallelism=2", "global_eval_batch_size=2"], "global_eval_batch_size=2"),
        (["num_slices=3"], "num_slices=3"),
        (["tensor_parallelism=4", "expert_parallelism=4"],
         "tensor_parallelism x expert_parallelism = 16 must divide the device count (8)"),
        (["num_slices=2", "tensor_parallelism=4", "expert_parallelism=2"],
         "must divide the devices of one slice (4 = 8 devices / num_slices=2)"),
    ],
)
def test_bad_mesh_is_a_config_error(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(overrides, num_devices=8)


def test_mesh_that_splits_heads_or_experts_unevenly_is_an_error(tmp_path):
    cfg = load_config(["tensor_parallelism=8"], num_devices=8)
    with pytest.raises(UserError, match=r"tensor_parallelism=8 must divide num_attention_heads=4"):
        parallel.check_model_fits_mesh(parallel.mesh_shape(8, 8, 1, 1), load_model_config(cfg))
    cfg = load_config(["tensor_parallelism=4"], num_devices=8)
    with pytest.raises(UserError, match=r"tensor_parallelism=4 must divide num_key_value_heads=2"):
        parallel.check_model_fits_mesh(parallel.mesh_shape(8, 4, 1, 1), load_model_config(cfg))
    six_experts = json.loads((REPO / "clm/model/configs/mixtral_tiny.json").read_text()) | {"num_local_experts": 6}
    (tmp_path / "six.json").write_text(json.dumps(six_experts))
    cfg = load_config([f"model.config_path={tmp_path / 'six.json'}", "expert_parallelism=4"], num_devices=8)
    with pytest.raises(UserError, match=r"expert_parallelism=4 must divide num_local_experts=6"):
        parallel.check_model_fits_mesh(parallel.mesh_shape(8, 1, 4, 1), load_model_config(cfg))


@pytest.mark.parametrize("model_type, message", [
    ("olmoe", "expert_parallelism=8 must divide num_experts=4"),
    ("deepseek_v3", "expert_parallelism=8 must divide n_routed_experts=4"),
    ("gpt2", "tensor_parallelism=8 must divide num_attention_heads=4"),
    ("llama", "expert_parallelism=8: llama is a dense model (no experts); use expert_parallelism=1"),
])
def test_mesh_checks_read_each_familys_field_names(model_type, message):
    from families import family_config

    overrides = {"olmoe": {"num_experts": 4}, "deepseek_v3": {"n_routed_experts": 4, "n_group": 2}}
    config = family_config(model_type, **overrides.get(model_type, {}))
    tensor, expert = (8, 1) if model_type == "gpt2" else (1, 8)
    with pytest.raises(UserError, match=re.escape(message)):
        parallel.check_model_fits_mesh(parallel.mesh_shape(8, tensor, expert, 1), config)


def test_every_family_has_a_rule_table_that_fits_it_both_ways():
    """clm/conf/sharding/<model_type>.yaml of each tested family matches every parameter and
    uses every rule (dense layers and shared experts included), on an fsdp x expert x tensor mesh."""
    from families import FAMILIES, MOE_FAMILIES, family_config

    from clm.model.config import meta_model

    for model_type in FAMILIES:
        model = meta_model(family_config(model_type))
        mesh = parallel.MeshShape(1, 2, 2 if model_type in MOE_FAMILIES else 1, 2)
        plan = parallel.plan_model(model, {}, mesh)
        assert {entry.name for entry in plan} >= {name for name, _ in model.named_parameters()}, model_type


def test_rule_table_fails_loudly():
    shapes = [("model.embed_tokens.weight", (32000, 128)), ("model.norm.weight", (128,))]
    mesh = parallel.MeshShape(1, 8, 1, 1)
    with pytest.raises(UserError, match="'model.embed_tokens.weight' .* matches no sharding rule"):
        parallel.plan_parameters(shapes, {"model.norm.weight": [None]}, mesh)
    with pytest.raises(UserError, match="'lm_head.weight' matches no parameter"):
        parallel.plan_parameters(shapes, {"model.embed_tokens.weight": ["fsdp", None], "lm_head.weight": [None, None]}, mesh)
    with pytest.raises(UserError, match="has 1 entries but 'model.embed_tokens.weight' has 2"):
        parallel.plan_parameters(shapes, {"model.embed_tokens.weight": ["fsdp"]}, mesh)
    with pytest.raises(UserError, match="unknown mesh axis 'data'"):
        parallel.plan_parameters(shapes, {"model.embed_tokens.weight": ["data", None]}, mesh)
    # 1-D parameters without a rule are replicated; an uneven split rounds up, as XLA pads.
    plan = parallel.plan_parameters(shapes, {"model.embed_tokens.weight": [["fsdp"], None]}, parallel.MeshShape(1, 3, 1, 1))
    assert [p.local_shape for p in plan] == [(10667, 128), (128,)]


def mixtral_params(L, H, I, E, V, Hq, Hkv, d):
    """Mixtral's parameter count from its architecture, independently of transformers."""
    attention = H * Hq * d * 2 + H * Hkv * d * 2
    experts = E * 3 * H * I
    return 2 * V * H + L * (attention + experts + E * H + 2 * H) + H


def test_plan_for_mixtral_8x22b_on_v5p_256(capsys):
    from clm.plan import main

    assert main(["v5p-256", "+experiment=gbs256_tpu"]) == 0
    out = capsys.readouterr().out
    summary = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
    expected = mixtral_params(L=56, H=6144, I=16384, E=8, V=32000, Hq=48, Hkv=8, d=128)
    assert expected == 140_620_634_112  # Mixtral-8x22B: "141B"
    hf_config = load_model_config(load_config(["+experiment=gbs256_tpu"], num_devices=128))
    with torch.device("meta"):
        model = MixtralForCausalLM(hf_config)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert float(summary["params_b"]) == pytest.approx(expected / 1e9, abs=0.005)
    assert summary["chips"] == "128" and summary["hbm_gb"] == "95.00"
    # fsdp over 128 chips: 141B bf16 parameters are 2.2 GB per chip, and so are the gradients.
    assert float(summary["parameters_gb"]) == pytest.approx(2 * expected / 128 / 1e9, rel=0.01)
    assert "mlp.experts.gate_up_proj" in out and "(expert, tensor, fsdp)" in out


def test_plan_rejects_an_unknown_topology(capsys):
    from clm.plan import main

    assert main(["v9z-8"]) == 2
    assert "topology 'v9z-8'" in capsys.readouterr().err
