"""Pretrained weights in the hub's layout: a random tiny Mixtral written with safetensors (hub names,
per-expert w1/w2/w3, three files and an index) loads into 1- and 8-device meshes with the logits of
transformers' own from_pretrained; hf-to-checkpoint -> checkpoint_manager_path and
checkpoint-to-hf after training steps round-trip; a load's host memory is bounded by the largest
tensor, not the model; and every bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_layout import hub_tensors, write_hub_checkpoint  # noqa: E402

pytestmark = pytest.mark.xla  # the XLA engine's mesh and placements

TINY = json.loads((REPO / "clm/model/configs/mixtral_tiny.json").read_text())
# Dropless experts and fp32 matmuls: the harness's forward equals transformers' stock one.
EXACT = ["model.capacity_factor=0", "full_precision=true", "model.dtype=float32", "max_length=32"]
# Eight rows: the batch splits over the data axes of every mesh tested.
INPUT_IDS = (torch.arange(8 * 24).reshape(8, 24) * 37) % 32000
MESHES = {"1 device": (1, []), "fsdp8": (8, []), "fsdp2_tp2_ep2": (8, ["tensor_parallelism=2", "expert_parallelism=2"])}


def worker(*args: str, devices: int = 8, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """This file run as a script in a fresh process with its own device count."""
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), "PYTHONPATH": str(REPO), **env}
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    return write_hub_checkpoint(tmp_path_factory.mktemp("hub") / "tiny", TINY, num_files=3)


@pytest.fixture(scope="module")
def reference_logits(hub_dir) -> torch.Tensor:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(hub_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def test_the_test_checkpoint_is_in_the_hubs_layout(hub_dir):
    index = json.loads((hub_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in index
    assert not any("gate_up_proj" in k or ".mlp." in k for k in index)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_loaded_logits_equal_transformers_from_pretrained(tmp_path, hub_dir, reference_logits, mesh):
    devices, overrides = MESHES[mesh]
    out = tmp_path / "logits.pt"
    result = worker("logits", str(out), f"model.name_or_path={hub_dir}", *EXACT, *overrides, devices=devices)
    torch.testing.assert_close(torch.load(out), reference_logits, rtol=1e-5, atol=1e-5)
    # A pretrained start does no random init.
    assert json.loads(result.stdout.strip().splitlines()[-1])["init_parameters"] == 0


@pytest.mark.slow
def test_hf_to_checkpoint_then_checkpoint_manager_path_gives_the_same_logits(tmp_path, hub_dir, reference_logits):
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "8", "PYTHONPATH": str(REPO)}
    converted = subprocess.run([sys.executable, "-m", "clm.convert", "hf-to-checkpoint", str(hub_dir), str(tmp_path / "ckpt")],
                               capture_output=True, text=True, env=env, timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert (tmp_path / "ckpt/0/.metadata").is_file()
    out = tmp_path / "logits.pt"
    worker("logits", str(out), f"checkpoint_manager_path={tmp_path / 'ckpt'}", *EXACT, "tensor_parallelism=2")
    torch.testing.assert_close(torch.load(out), reference_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_to_hf_after_training_steps_round_trips(tmp_path, hub_dir):
    from transformers import MixtralForCausalLM

    from clm.convert import main

    ckpt, out = tmp_path / "run_ckpt", tmp_path / "exported"
    worker("train_and_save", str(ckpt), str(tmp_path / "trained_logits.pt"), f"model.name_or_path={hub_dir}", *EXACT,
           "expert_parallelism=2")
    # CHECKPOINT may be the directory of steps (newest complete step) or a step directory.
    assert main(["checkpoint-to-hf", str(ckpt), str(out), "--max-shard-size", "10MB", "--config", str(hub_dir)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 2 and "model.layers.0.block_sparse_moe.experts.0.w1.weight" in index
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(logits, torch.load(tmp_path / "trained_logits.pt"), rtol=1e-5, atol=1e-5)
    original = MixtralForCausalLM.from_pretrained(hub_dir, dtype=torch.float32)
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight), "training changed nothing"


# 8 layers: the model (about 0.56 GB) is 8.5 times its largest tensor (embeddings, 66 MB).
WIDE = TINY | {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8,
               "num_key_value_heads": 4}


@pytest.fixture(scope="module")
def wide_hub(tmp_path_factory) -> Path:
    return write_hub_checkpoint(tmp_path_factory.mktemp("wide") / "hub", WIDE, num_files=4, tokenizer=False)


def memory_of(mode: str, *args: str, **env: str) -> tuple[dict, int, int]:
    """A worker's peak host memory (its JSON line), with the model's and its largest tensor's bytes."""
    stats = json.loads(worker(mode, *args, **env).stdout.strip().splitlines()[-1])
    model_bytes = sum(t.numel() * 4 for _, t in hub_tensors(WIDE))
    largest = max(t.numel() * 4 for _, t in hub_tensors(WIDE))
    assert model_bytes > 8 * largest
    return stats, model_bytes, largest


@pytest.mark.slow
def test_load_host_memory_is_bounded_by_the_largest_tensor(wide_hub):
    stats, model_bytes, largest = memory_of("load_memory", f"model.name_or_path={wide_hub}", "model.dtype=float32")
    # Measured about 3x with 4 reader threads, where a whole-model host copy would be over 8x.
    transient = stats["peak_bytes"] - stats["device_bytes"]
    assert stats["device_bytes"] == pytest.approx(model_bytes, rel=0.01)
    assert transient < 5 * largest, f"{transient / 1e6:.0f} MB beyond the model, largest tensor {largest / 1e6:.0f} MB"


@pytest.mark.slow
def test_convert_on_8_devices_holds_about_one_tensor_beyond_the_model(wide_hub, tmp_path):
    """hf-to-checkpoint on 8 devices (load, then the sharded save): at no point does the host hold
    more beyond the model's own (device) bytes than a few copies of its largest tensor (a tensor's
    shards, their unpadded copies, the bytes being written), where a host copy of the model (as the
    asynchronous save makes) would be over 8x, and the model whole on every device 64x (as the
    first transfer after a build did while placement left to_empty's placeholders alive).
    glibc keeps freed heap blocks and would count memory the process no longer holds, so blocks
    over 1 MiB come from mmap here (returned when freed). Measured: about 4x."""
    stats, model_bytes, largest = memory_of("convert_memory", str(wide_hub), str(tmp_path / "ckpt"),
                                            MALLOC_MMAP_THRESHOLD_="1048576")
    transient = stats["peak_bytes"] - model_bytes
    assert transient < 6 * largest, f"{transient / largest:.1f}x the largest tensor beyond the model"
    assert stats["compiles"] == 0
    assert (tmp_path / "ckpt/0/.metadata").is_file()


# ----------------------------------------------------------------------------- bad input


def _rewrite(hub: Path, drop: str | None = None, add: str | None = None, file: str = "model-00001-of-00003.safetensors"):
    from safetensors.torch import load_file, save_file

    tensors = load_file(hub / file)
    index_file = hub / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    if drop:
        del tensors[drop], index["weight_map"][drop]
    if add:
        tensors[add] = torch.zeros(4)
        index["weight_map"][add] = file
    save_file(tensors, hub / file)
    index_file.write_text(json.dumps(index))


def _copy(hub_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(hub_dir, tmp_path / "copy"))


def _config_error(overrides: list[str]) -> str:
    from clm.config import load_config
    from clm.errors import UserError
    from clm.model.plan import ModelPlan
    from clm.parallel import MeshShape

    with pytest.raises(UserError) as caught:
        ModelPlan.from_config(load_config(overrides, num_devices=8), MeshShape(1, 8, 1, 1))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_shard_named_in_the_index(tmp_path, hub_dir):
    hub = _copy(hub_dir, tmp_path)
    (hub / "model-00002-of-00003.safetensors").unlink()
    assert "model-00002-of-00003.safetensors, named in model.safetensors.index.json, does not exist" in _config_error(
        [f"model.name_or_path={hub}"])


def test_tensor_whose_shape_disagrees_with_the_config(tmp_path, hub_dir):
    hub = _copy(hub_dir, tmp_path)
    (hub / "config.json").write_text(json.dumps(TINY | {"intermediate_size": 512}))
    message = _config_error([f"model.name_or_path={hub}"])
    assert "block_sparse_moe.experts.0.w1.weight has shape [448, 128] but config.json implies [512, 128]" in message


def test_missing_and_extra_keys(tmp_path, hub_dir):
    hub = _copy(hub_dir, tmp_path)
    _rewrite(hub, drop="model.embed_tokens.weight")
    assert "missing tensors model.embed_tokens.weight" in _config_error([f"model.name_or_path={hub}"])
    _rewrite(hub, add="model.layers.0.block_sparse_moe.experts.9.w1.weight")
    _rewrite(hub, add="model.embed_tokens.weight")  # back, as a wrong-shaped stand-in: checked after keys
    assert "no place for: model.layers.0.block_sparse_moe.experts.9.w1.weight" in _config_error(
        [f"model.name_or_path={hub}"])


def test_weights_of_another_family_and_missing_directory_and_hub_names(tmp_path, hub_dir):
    hub = _copy(hub_dir, tmp_path)
    (hub / "config.json").write_text(json.dumps(TINY | {"model_type": "llama"}))  # a Llama has a dense MLP
    message = _config_error([f"model.name_or_path={hub}"])
    assert "missing tensors model.layers.0.mlp.down_proj.weight" in message and "of 21 this config needs" in message
    assert "no such directory" in _config_error([f"model.name_or_path={tmp_path / 'nope'}"])
    message = _config_error(["model.name_or_path=mistralai/Mixtral-8x22B-v0.1"])
    assert "no network" in message and "hf download mistralai/Mixtral-8x22B-v0.1 --local-dir DIR" in message


def test_config_path_and_name_or_path_must_agree(hub_dir):
    message = _config_error([f"model.name_or_path={hub_dir}", "model.config_path=mixtral80.json"])
    assert "disagree on" in message and "hidden_size" in message and "intermediate_size" in message
    assert "model.config_path=null" in message
    from clm.config import load_config
    from clm.model.plan import ModelPlan
    from clm.parallel import MeshShape

    # The shipped tiny config is the same architecture: no complaint.
    ModelPlan.from_config(load_config([f"model.name_or_path={hub_dir}", "model.config_path=mixtral_tiny.json"],
                                      num_devices=8), MeshShape(1, 8, 1, 1))


@pytest.mark.slow
def test_bad_weights_exit_2_with_one_line_before_anything_is_written(tmp_path, hub_dir):
    hub = _copy(hub_dir, tmp_path)
    (hub / "model-00003-of-00003.safetensors").unlink()
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "run_clm.py"), f"model.name_or_path={hub}",
                             f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env, timeout=300)
    from clm.errors import EXIT_USER_ERROR

    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.strip().splitlines()[-1].startswith("error: model.name_or_path=")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout, cut", [("one file", "data"), ("sharded", "header")])
def test_a_safetensors_file_cut_short_is_one_line_saying_to_download_it_again(tmp_path, layout, cut):
    """A broken download: written by transformers' save_pretrained, then the data cut off behind
    an intact header, or the cut inside the header. One file (read for its keys) or sharded."""
    from families import write_family

    from clm.errors import EXIT_USER_ERROR

    hub = write_family(tmp_path / "hub", "mixtral", max_shard_size="1GB" if layout == "one file" else "2MB")
    files = sorted(hub.glob("*.safetensors"))
    assert len(files) > 1 if layout == "sharded" else [f.name for f in files] == ["model.safetensors"]
    broken = files[-1]
    data = broken.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    broken.write_bytes(data[:header + 64] if cut == "data" else data[:header // 2])
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "run_clm.py"), f"model.name_or_path={hub}",
                             f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: model.name_or_path={hub}: {broken.name} is cut short") and line.endswith(
        "download it again"), line
    assert not (tmp_path / "out").exists()


def test_a_file_cut_short_after_its_headers_were_read_is_one_line_when_its_tensors_are_read(tmp_path, hub_dir):
    from clm.errors import UserError
    from clm.model.weights import HubCheckpoint

    hub = _copy(hub_dir, tmp_path)
    checkpoint = HubCheckpoint(str(hub))
    checkpoint.shapes()  # the pre-flight check: the file was whole then
    key = "model.embed_tokens.weight"
    broken = hub / checkpoint.weight_map[key]
    broken.write_bytes(broken.read_bytes()[:-64])
    with pytest.raises(UserError, match=f"{broken.name} is cut short .*; download it again$"):
        checkpoint.read(key, (slice(0, 2), slice(None)))


def test_tokenizer_comes_from_the_pretrained_directory(hub_dir, tmp_path):
    from omegaconf import OmegaConf

    from clm.data.tokenizer import tokenizer_source

    assert tokenizer_source(OmegaConf.create({"tokenizer_name_or_path": None, "name_or_path": str(hub_dir)})) == str(hub_dir)
    assert tokenizer_source(OmegaConf.create({"tokenizer_name_or_path": None, "name_or_path": str(tmp_path)})) is None
    assert tokenizer_source(OmegaConf.create({"tokenizer_name_or_path": "x.model", "name_or_path": str(hub_dir)})) == "x.model"


# ------------------------------------------------------------------- subprocess workers


def _build(overrides: list[str]):
    import torch_xla  # noqa: F401

    from clm import checkpoint, parallel, runtime
    from clm.config import load_config
    from clm.model import init
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan

    cfg = load_config(overrides, num_devices=runtime.device_count())
    runtime.setup(None, cfg.full_precision)
    shape = parallel.mesh_shape(runtime.device_count(), cfg.tensor_parallelism, cfg.expert_parallelism, 1)
    model = build_sharded_model(ModelPlan.from_config(cfg, shape))
    if cfg.checkpoint_manager_path:
        checkpoint.restore_model_weights(model.module, cfg.checkpoint_manager_path)
    return cfg, model, {"init_parameters": init.initialized["parameters"]}


def _logits(model) -> torch.Tensor:
    import torch_xla

    model.eval()
    with torch.no_grad():
        return model(INPUT_IDS.to(torch_xla.device())).cpu()


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "logits":
        out, *overrides = rest
        _, model, counted = _build(overrides)
        torch.save(_logits(model), out)
        print(json.dumps(counted))
    elif mode == "train_and_save":
        ckpt, out, *overrides = rest
        import torch_xla

        import torch.distributed as dist
        from torch_xla.experimental.distributed_checkpoint import CheckpointManager

        from clm import runtime

        cfg, model, _ = _build(overrides)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(3):
            logits = model(INPUT_IDS.to(torch_xla.device()))
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     INPUT_IDS[:, 1:].reshape(-1).to(logits.device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch_xla.sync()
        runtime.init_process_group()
        manager = CheckpointManager(ckpt, save_interval=1, process_group=dist.group.WORLD, chkpt_on_preemption=False)
        # A training checkpoint: the model next to other state, which the export ignores.
        manager.save(3, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "trainer": {"step": torch.tensor(3)}}, force=True)
        torch.save(_logits(model), out)
    elif mode == "convert_memory":
        import torch_xla.debug.metrics as met

        from clm import runtime
        from clm.convert import hf_to_checkpoint

        hub, out = rest
        runtime.device_count()
        # Measured around the conversion only: imports and the runtime start are the baseline.
        import clm.checkpoint  # noqa: F401
        import clm.model.build  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        before = _rss()
        _reset_peak()
        hf_to_checkpoint(hub, out, "float32")
        compiles = met.metric_data("CompileTime")
        print(json.dumps({"peak_bytes": _peak_rss() - before, "compiles": compiles[0] if compiles else 0}))
    elif mode == "load_memory":
        import torch_xla

        from clm import parallel, runtime
        from clm.config import load_config
        from clm.model import weights
        from clm.model.config import meta_model
        from clm.model.plan import ModelPlan

        cfg = load_config(rest, num_devices=runtime.device_count())
        runtime.setup(None, False)
        shape = parallel.mesh_shape(runtime.device_count(), 1, 1, 1)
        mesh = parallel.build_mesh(shape)
        model_plan = ModelPlan.from_config(cfg, shape)
        model = meta_model(model_plan.hf_config)
        model.to_empty(device=torch_xla.device())
        placements = parallel.shard_parameters(model, mesh, model_plan.shardings)
        before = _rss()
        _reset_peak()
        stats = weights.load(model, placements, model_plan.checkpoint, progress=False)
        peak = _peak_rss() - before
        device_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(json.dumps({"peak_bytes": peak, "device_bytes": device_bytes, "bytes_read": stats.bytes_read}))
