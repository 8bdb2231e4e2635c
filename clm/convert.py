"""Convert between the hub's layout and this harness's distributed checkpoints.

    python -m clm.convert hf-to-checkpoint HF_DIR OUT [--dtype bfloat16]
    python -m clm.convert checkpoint-to-hf CHECKPOINT OUT_DIR [--max-shard-size 5GB] [--config FILE]

hf-to-checkpoint loads HF_DIR sharded over this host's devices (as a training start does,
never the whole model on one host) and saves step 0 of a checkpoint directory OUT (local or
gs://; the layout of torch_xla's CheckpointManager and of clm's checkpoints), {"model":
state_dict}, which `checkpoint_manager_path=OUT` loads; the step also gets the config.json. checkpoint-to-hf reads the "model" entry of a
step directory of either engine (or the newest complete step under a directory of steps), one output file's
tensor (or the few one hub tensor is made of) at a time through torch.distributed.checkpoint, and writes safetensors files in the
hub's names with an index and config.json, which transformers' `from_pretrained` loads. Both
directions convert between the hub's layout and transformers' in-memory one with transformers'
own conversion mapping for the model's family (clm.model.weights).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings

from clm.checkpoint import DCP_METADATA, newest_complete, storage_reader
from clm.cli import run_command
from clm.errors import UserError
from clm.storage import filesystem

MODEL_KEY = "model"  # the state dict entry holding model.state_dict(); other entries are ignored


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", text.strip().upper())
    if not match:
        raise UserError(f"--max-shard-size={text}: use a size such as 5GB, 500MB")
    return int(float(match[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[match[2]])


def resolve_step_dir(path: str) -> str:
    """CHECKPOINT: a step directory (with torch.distributed.checkpoint's .metadata), or a directory
    of numbered step directories, of which the newest complete one is taken (clm.checkpoint's rule)."""
    fs, raw = filesystem(path)
    if fs.exists(f"{raw.rstrip('/')}/{DCP_METADATA}"):
        return path
    if not fs.isdir(raw):
        raise UserError(f"CHECKPOINT={path}: no such directory (local path or gs://bucket/prefix)")
    newest = newest_complete(path, "CHECKPOINT")
    if newest is None:
        raise UserError(f"CHECKPOINT={path}: neither a checkpoint step (no .metadata) nor a directory of complete steps")
    return newest


def _config_fields(step_dir: str, config: str | None) -> dict:
    from clm.model.config import resolve_config_path

    if config:
        import os

        candidate = os.path.join(config, "config.json") if os.path.isdir(config) else config
        return json.loads(resolve_config_path(candidate).read_text())
    fs, raw = filesystem(step_dir)
    for candidate in (f"{raw.rstrip('/')}/config.json", f"{raw.rstrip('/').rsplit('/', 1)[0]}/config.json"):
        if fs.exists(candidate):
            with fs.open(candidate, "r") as f:
                return json.load(f)
    raise UserError(f"CHECKPOINT={step_dir}: no config.json next to it; pass --config (a model JSON such as "
                    "mixtral80.json, or the pretrained directory)")


def checkpoint_to_hf(checkpoint: str, out_dir: str, max_shard_bytes: int, config: str | None = None) -> list[str]:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from clm.model import weights
    from clm.model.config import config_from_fields, meta_model
    from clm.parallel.sharding import model_tensors

    step_dir = resolve_step_dir(checkpoint)
    fields = _config_fields(step_dir, config)
    model = meta_model(config_from_fields(fields, f"CHECKPOINT={step_dir} config.json"))
    metadata = storage_reader(step_dir).read_metadata()
    prefix = MODEL_KEY + "."
    entries = {key[len(prefix):]: md for key, md in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not entries:
        raise UserError(f"CHECKPOINT={step_dir}: no '{MODEL_KEY}' tensors in it")
    wanted = model_tensors(model)
    absent = sorted(wanted.keys() - entries.keys())
    if absent:
        raise UserError(f"CHECKPOINT={step_dir}: no {', '.join(absent[:3])} in it, which its config.json's "
                        f"{fields.get('model_type')} model has; pass the --config it was trained with")

    def tensors():
        # A few tensors at a time from the checkpoint (those one hub tensor is made of): memory is
        # about one tensor plus the file being filled.
        for group in weights.export_groups(model, [name for name in entries if name in wanted]):
            state = {MODEL_KEY: {name: torch.empty(tuple(entries[name].size), dtype=entries[name].properties.dtype)
                                 for name in group}}
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=storage_reader(step_dir),
                         planner=DefaultLoadPlanner(allow_partial_load=True))
            yield from weights.to_hub(model, state[MODEL_KEY]).items()

    fields = {**fields, "torch_dtype": str(next(iter(entries.values())).properties.dtype).split(".")[1]}
    return weights.write_hub(tensors(), out_dir, fields, max_shard_bytes)


def hf_to_checkpoint(hf_dir: str, out: str, dtype: str | None = None) -> str:
    from clm import checkpoint, parallel, runtime, storage
    from clm.config import load_config
    from clm.model import weights
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan

    source = weights.HubCheckpoint(hf_dir, knob="HF_DIR")
    dtype = dtype or source.config_fields.get("torch_dtype") or source.config_fields.get("dtype") or "float32"
    # The XLA engine's sharded model and checkpoints (torch_xla's CheckpointManager).
    cfg = load_config([f"model.name_or_path={hf_dir}", f"model.dtype={dtype}", "model.fsdp_config.xla_fsdp_grad_ckpt=false",
                       "backend=xla"], num_devices=runtime.device_count())
    runtime.setup(None, False)
    model_plan = ModelPlan.from_config(cfg, parallel.mesh_shape(runtime.device_count(), 1, 1, 1), checkpoint=source)
    steps = list(checkpoint.step_directories(out))
    if steps:
        raise UserError(f"OUT={out}: already holds checkpoint steps {steps}; give a new directory")
    model = build_sharded_model(model_plan)
    runtime.init_process_group()
    # The XLA engine's sharded save of the model (its tensors as they live on the devices, each
    # host writing its own shards), straight from the devices: shard by shard, so the host holds
    # about one tensor's shards at a time, where a training save first copies every shard to host.
    checkpoint.write_step(out, 0, {MODEL_KEY: checkpoint.model_state(model.module)},
                          planner=checkpoint.save_planner())
    with storage.open(storage.join(out, "0", "config.json"), "w") as f:
        f.write(json.dumps(source.config_fields, indent=2) + "\n")
    return storage.join(out, "0")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clm.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_ckpt = commands.add_parser("hf-to-checkpoint", help="hub-layout directory -> CheckpointManager step 0")
    to_ckpt.add_argument("hf_dir")
    to_ckpt.add_argument("out")
    to_ckpt.add_argument("--dtype", help="parameter dtype in the checkpoint (default: config.json's torch_dtype)")
    to_hf = commands.add_parser("checkpoint-to-hf", help="checkpoint step (or directory of steps) -> hub layout")
    to_hf.add_argument("checkpoint")
    to_hf.add_argument("out_dir")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    to_hf.add_argument("--config", help="config JSON (default: config.json in or next to the step)")
    args = parser.parse_args(argv)

    def run():
        if args.command == "hf-to-checkpoint":
            print(f"convert: wrote {hf_to_checkpoint(args.hf_dir, args.out, args.dtype)}")
        else:
            files = checkpoint_to_hf(args.checkpoint, args.out_dir, parse_size(args.max_shard_size), args.config)
            print(f"convert: wrote {len(files)} files to {args.out_dir}")

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
