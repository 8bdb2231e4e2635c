"""The random init: the same values bit for bit on 1 and 8 devices (any mesh), host memory bounded
by one parameter whatever the device count; and the host-memory pre-flight turns a CPU run that
cannot fit into one line with an override that does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def worker(*args: str, devices: int) -> str:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return (result.stdout.strip().splitlines() or [""])[-1]


def build(overrides: list[str]):
    from clm import parallel, runtime
    from clm.config import load_config
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan

    cfg = load_config(["model.dtype=float32", *overrides], num_devices=runtime.device_count())
    runtime.setup(None, False)
    shape = parallel.mesh_shape(runtime.device_count(), cfg.tensor_parallelism, cfg.expert_parallelism, 1)
    return cfg, build_sharded_model(ModelPlan.from_config(cfg, shape))


@pytest.fixture(scope="module")
def one_device_state(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The default model's init on one device (a process of its own), which every mesh must equal."""
    path = tmp_path_factory.mktemp("init") / "one.pt"
    worker("state", str(path), devices=1)
    return torch.load(path)


@pytest.mark.xla
@pytest.mark.slow
@pytest.mark.parametrize("mesh", [[], ["tensor_parallelism=2", "expert_parallelism=2"]])
def test_init_is_the_same_on_one_and_eight_devices(one_device_state, mesh):
    one = one_device_state
    _, model = build(mesh)
    eight = {name: p.cpu() for name, p in model.named_parameters()}
    assert one.keys() == eight.keys()
    for name, value in one.items():
        assert torch.equal(value, eight[name]), name
    # transformers' own init: N(0, initializer_range) matrices, unit norms.
    assert one["model.layers.0.mlp.experts.gate_up_proj"].std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(one["model.norm.weight"], torch.ones_like(one["model.norm.weight"]))
    # A different seed, different values.
    _, reseeded = build(["seed=1"])
    assert not torch.equal(reseeded.module.lm_head.weight.cpu(), eight["lm_head.weight"])


@pytest.mark.xla
def test_init_applies_transformers_parent_inits_too(tmp_path):
    """transformers initialises bottom-up, and GPT-2's attention and MLP modules re-draw their
    residual projection c_proj with std 0.02 / sqrt(2 * layers): clm's one-tensor-at-a-time init
    must end with the parents' values too. (The tied output embedding is the input one.)"""
    from families import write_family

    directory = write_family(tmp_path / "gpt2", "gpt2", n_layer=8, tokenizer=False)
    _, model = build([f"model.config_path={directory / 'config.json'}"])
    state = {name: p.cpu() for name, p in model.named_parameters()}
    assert state["transformer.h.0.attn.c_proj.weight"].std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert state["transformer.h.0.mlp.c_proj.weight"].std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert state["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert model.module.lm_head.weight is model.module.transformer.wte.weight


# Largest parameter: the embeddings / lm_head, 32000 x 2048 fp32 = 262 MB.
BIG = {"hidden_size": 2048, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 16,
       "num_key_value_heads": 4}


@pytest.mark.xla
@pytest.mark.slow
def test_init_host_memory_is_bounded_by_one_parameter_for_any_device_count(tmp_path):
    fields = json.loads((REPO / "clm/model/configs/mixtral_tiny.json").read_text()) | BIG
    (tmp_path / "big.json").write_text(json.dumps(fields))
    stats = {n: json.loads(worker("init_memory", str(tmp_path / "big.json"), devices=n)) for n in (1, 8)}
    largest = 32000 * 2048 * 4
    for n, s in stats.items():
        assert s["largest_parameter_bytes"] == largest
        transient = s["peak_bytes"] - s["device_bytes"]
        # The parameter's host values and their shards; XLA's RNG held devices x parameter.
        assert transient < 3 * largest, f"{n} devices: {transient / 1e6:.0f} MB beyond the model"
    assert abs(stats[8]["peak_bytes"] - stats[1]["peak_bytes"]) < largest


# ----------------------------------------------------------------------------- pre-flight


def _plan_inputs(overrides: list[str], devices: int = 4):
    from clm import parallel
    from clm.config import load_config
    from clm.model.plan import ModelPlan

    cfg = load_config(overrides, num_devices=devices)
    return ModelPlan.from_config(cfg, parallel.mesh_shape(devices, cfg.tensor_parallelism, cfg.expert_parallelism, 1))


# The MLPerf reference's v4-8 dry-run command line, as a new user runs it on a CPU box.
REFERENCE_DRY_RUN = ["model.config_path=mixtral80.json", "eval_frequency=3", "n_eval_examples=100",
                     "per_device_train_batch_size=4", "max_steps=30"]


@pytest.mark.parametrize("available_gb", [24, 40])
def test_preflight_refuses_a_cpu_run_that_cannot_fit_and_names_one_that_does(available_gb):
    from clm.errors import UserError
    from clm.plan import host_bytes_needed, preflight

    available = available_gb * GB
    model_plan = _plan_inputs(REFERENCE_DRY_RUN)
    # fp32 AdamW for mixtral80 alone: parameters, gradients and two moments, 4 x 6.85 GB.
    assert host_bytes_needed(model_plan) > 27.4 * GB
    with pytest.raises(UserError) as caught:
        preflight(model_plan, "CPU", "CPU", available_bytes=available)
    message = str(caught.value)
    assert "\n" not in message
    assert "needs about" in message and f"{available_gb:.1f} GB is available" in message and "float32" in message
    suggestion = message.split("; try ")[1].split()
    devices = 4
    if suggestion[0] == "CPU_NUM_DEVICES=1":
        devices, suggestion = 1, suggestion[1:]
    # The suggested command fits by the same estimate, and passes the pre-flight.
    fixed = _plan_inputs(REFERENCE_DRY_RUN + suggestion, devices=devices)
    assert host_bytes_needed(fixed) <= available
    preflight(fixed, "CPU", "CPU", available_bytes=available)


def test_preflight_without_any_fitting_setting_says_so():
    from clm.errors import UserError
    from clm.plan import preflight

    model_plan = _plan_inputs(REFERENCE_DRY_RUN)
    with pytest.raises(UserError, match="no smaller setting of this model fits; use a smaller model"):
        preflight(model_plan, "CPU", "CPU", available_bytes=4 * GB)


def test_preflight_on_tpu_only_warns(capsys):
    from clm.plan import preflight

    model_plan = _plan_inputs(["+experiment=gbs256_tpu", "global_train_batch_size=4", "global_eval_batch_size=4"],
                              devices=4)
    preflight(model_plan, "TPU", "v4", available_bytes=1)
    assert "warning: the planner estimates" in capsys.readouterr().err


# ------------------------------------------------------------------- subprocess workers


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "state":
        _, model = build([])
        torch.save({name: p.cpu() for name, p in model.named_parameters()}, rest[0])
    elif mode == "init_memory":
        import torch_xla  # noqa: F401

        from clm import runtime

        runtime.device_count()
        import clm.config  # noqa: F401
        import clm.model.build  # noqa: F401

        # Measured around build_sharded_model only: the imports and runtime start are the baseline.
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        _, model = build([f"model.config_path={rest[0]}"])
        params = list(model.parameters())
        print(json.dumps({"peak_bytes": _status("VmHWM") - before,
                          "device_bytes": sum(p.numel() * p.element_size() for p in params),
                          "largest_parameter_bytes": max(p.numel() * p.element_size() for p in params)}))
