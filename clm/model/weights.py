"""Pretrained Mixtral weights in the Hugging Face hub's layout: check, load sharded, write back.

The hub's files (mistralai/Mixtral-8x22B-v0.1) name each expert's matrices separately,
`block_sparse_moe.experts.{e}.w1/w2/w3.weight`; transformers 5 holds them fused,
`mlp.experts.gate_up_proj [E, 2I, H]` (w1 rows, then w3 rows) and `down_proj [E, H, I]` (w2).
transformers' own conversion mapping (conversion_mapping.py, "mixtral") does the same merge,
but on whole tensors after reading them; the loader here reads per device slice, so the
mapping is the small table below, applied to slices.

A load reads, per parameter, only the slices this host's devices hold (safetensors' lazy
`get_slice`), a few parameters at a time in threads, so host memory stays a small multiple
of the largest tensor.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from clm.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.model"
EXPERTS = re.compile(r"^(?P<layer>model\.layers\.\d+\.)mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")


def hub_name(name: str) -> str:
    """The hub's name of a non-expert parameter (the router and the rest)."""
    return name.replace(".mlp.", ".block_sparse_moe.")


def hub_expert_names(layer: str, expert: int) -> dict[str, str]:
    prefix = f"{hub_name(layer)}block_sparse_moe.experts.{expert}."
    return {w: f"{prefix}{w}.weight" for w in ("w1", "w2", "w3")}


def hub_shapes(named_shapes, num_experts: int) -> dict[str, tuple[int, ...]]:
    """Every hub tensor and its shape, for the in-memory parameters given."""
    shapes = {}
    for name, shape in named_shapes:
        match = EXPERTS.match(name)
        if not match:
            shapes[hub_name(name)] = tuple(shape)
            continue
        for e in range(num_experts):
            keys = hub_expert_names(match["layer"], e)
            if match["kind"] == "gate_up_proj":  # [E, 2I, H]
                half = (shape[1] // 2, shape[2])
                shapes[keys["w1"]] = shapes[keys["w3"]] = half
            else:  # down_proj [E, H, I]
                shapes[keys["w2"]] = (shape[1], shape[2])
    return shapes


def to_hub(name: str, tensor: torch.Tensor):
    """(hub name, tensor) pairs for one in-memory tensor (full, on the host)."""
    match = EXPERTS.match(name)
    if not match:
        yield hub_name(name), tensor
        return
    for e in range(tensor.shape[0]):
        keys = hub_expert_names(match["layer"], e)
        if match["kind"] == "gate_up_proj":
            w1, w3 = tensor[e].chunk(2, dim=0)
            yield keys["w1"], w1
            yield keys["w3"], w3
        else:
            yield keys["w2"], tensor[e]


def _name_list(names, limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class HubCheckpoint:
    """A local directory in the hub's layout: config.json, safetensors files (with an index if several)."""

    def __init__(self, path: str, knob: str = "model.name_or_path"):
        self.knob = f"{knob}={path}"
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            if "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
                raise UserError(
                    f"{self.knob}: not a local directory, and clm does not download from the hub (no network here); "
                    f"download it first, e.g. `hf download {path} --local-dir DIR`, and set model.name_or_path=DIR"
                )
            raise UserError(f"{self.knob}: no such directory; give a local directory in the hub's layout "
                            f"(config.json, *.safetensors, {INDEX})")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{self.knob}: no config.json in it; a hub-layout directory has config.json and *.safetensors")
        try:
            self.config_fields = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.knob}: config.json is not valid JSON ({e})") from None
        self.weight_map = self._weight_map()
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def _weight_map(self) -> dict[str, str]:
        index_file = self.path / INDEX
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{self.knob}: {INDEX} is not a safetensors index ({e})") from None
        elif (self.path / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(self.path / SINGLE, framework="pt") as f:
                weight_map = {key: SINGLE for key in f.keys()}
        else:
            raise UserError(f"{self.knob}: neither {INDEX} nor {SINGLE} in it")
        for file in sorted(set(weight_map.values())):
            if not (self.path / file).is_file():
                raise UserError(f"{self.knob}: {file}, named in {INDEX}, does not exist")
        return weight_map

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape from the safetensors headers (no tensor data is read)."""
        if self._shapes is None:
            from safetensors import safe_open

            shapes = {}
            for file in self.files:
                try:
                    with safe_open(self.path / file, framework="pt") as f:
                        for key in f.keys():
                            shapes[key] = tuple(f.get_slice(key).get_shape())
                except Exception as e:  # safetensors raises its own error types for a corrupt header
                    raise UserError(f"{self.knob}: {file} is not a safetensors file ({e})") from None
            absent = [k for k, file in self.weight_map.items() if k not in shapes]
            if absent:
                raise UserError(f"{self.knob}: {INDEX} names tensors that its files do not hold: {_name_list(absent)}")
            self._shapes = shapes
        return self._shapes

    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    def check(self, hf_config) -> None:
        """Every tensor the model needs is there, with the shape its config implies, and nothing else."""
        from transformers import MixtralForCausalLM

        if hf_config.model_type != "mixtral":
            raise UserError(f"{self.knob}: clm loads pretrained weights of Mixtral only so far "
                            f"(model_type {hf_config.model_type!r}); use model.config_path for a random init")
        with torch.device("meta"):
            model = MixtralForCausalLM(hf_config)
        expected = hub_shapes(((n, p.shape) for n, p in model.named_parameters()), hf_config.num_local_experts)
        actual = self.shapes()
        missing, extra = expected.keys() - actual.keys(), actual.keys() - expected.keys()
        if missing:
            raise UserError(f"{self.knob}: missing tensors {_name_list(missing)} (of {len(expected)} this config needs)")
        if extra:
            raise UserError(f"{self.knob}: tensors this config has no place for: {_name_list(extra)}")
        for key, shape in expected.items():
            if actual[key] != shape:
                raise UserError(f"{self.knob}: tensor {key} has shape {list(actual[key])} but config.json implies "
                                f"{list(shape)}")

    # ------------------------------------------------------------------ reading slices

    def _read(self, key: str, index) -> torch.Tensor:
        from safetensors import safe_open

        # Opened per read: the mapping is dropped right after, so its pages leave this process.
        with safe_open(self.path / self.weight_map[key], framework="pt") as f:
            return f.get_slice(key)[index]

    def reader(self, name: str):
        """read(index) for the in-memory parameter `name`: the slice `index` of its fused form."""
        match = EXPERTS.match(name)
        if not match:
            return lambda index: self._read(hub_name(name), index)
        layer, kind = match["layer"], match["kind"]

        def read_experts(index):
            experts, rows, cols = index
            per_expert = []
            for e in range(experts.start, experts.stop):
                keys = hub_expert_names(layer, e)
                if kind == "down_proj":
                    per_expert.append(self._read(keys["w2"], (rows, cols)))
                    continue
                half = self.shapes()[keys["w1"]][0]
                parts = []
                for key, offset in ((keys["w1"], 0), (keys["w3"], half)):
                    start, stop = max(rows.start - offset, 0), min(rows.stop - offset, half)
                    if start < stop:
                        parts.append(self._read(key, (slice(start, stop), cols)))
                per_expert.append(torch.cat(parts) if parts else torch.empty(0, cols.stop - cols.start))
            if not per_expert:
                return torch.empty(0, rows.stop - rows.start, cols.stop - cols.start)
            return torch.stack(per_expert)

        return read_experts

    def first_file(self, name: str) -> str:
        match = EXPERTS.match(name)
        key = hub_expert_names(match["layer"], 0)["w1" if match["kind"] == "gate_up_proj" else "w2"] if match else hub_name(name)
        return self.weight_map[key]


@dataclass
class LoadStats:
    bytes_read: int
    seconds: float
    parameters: int


def load(model, placements: dict, checkpoint: HubCheckpoint, workers: int = 4, progress: bool = True) -> LoadStats:
    """Fill every parameter of the (meta-created, sharded) model from the checkpoint.

    Reads run in threads, at most `workers` parameters in flight, interleaved over files so
    that concurrent reads hit different files; each parameter is placed on the devices by the
    main thread as soon as its slices are read, and its host copy freed.
    """
    from tqdm import tqdm

    from clm.parallel.placement import place_shards, read_shards, shard_bytes

    params = dict(model.named_parameters())
    by_file = defaultdict(list)
    for name in params:
        by_file[checkpoint.first_file(name)].append(name)
    order = [n for group in _round_robin(list(by_file.values())) for n in group]

    def read(name):
        p = params[name]
        return read_shards(tuple(p.shape), p.dtype, placements[name], checkpoint.reader(name))

    started = time.perf_counter()
    total = 0
    bar = tqdm(desc="load weights", unit="B", unit_scale=True, unit_divisor=1000, disable=not progress,
               total=checkpoint.size_bytes())
    with ThreadPoolExecutor(max(1, min(workers, len(by_file)))) as pool:
        pending = []
        queue = iter(order)
        for name in queue:
            pending.append((name, pool.submit(read, name)))
            if len(pending) >= workers:
                break
        while pending:
            name, future = pending.pop(0)
            shards = future.result()
            place_shards(params[name], placements[name], shards)
            size = shard_bytes(shards)
            del shards
            total += size
            bar.update(size)
            following = next(queue, None)
            if following is not None:
                pending.append((following, pool.submit(read, following)))
    bar.close()
    return LoadStats(total, time.perf_counter() - started, len(order))


def _round_robin(groups: list[list[str]]):
    """One name from each file in turn: [[a1, a2], [b1]] -> [a1], [b1], [a2]."""
    longest = max((len(g) for g in groups), default=0)
    for i in range(longest):
        yield [g[i] for g in groups if i < len(g)]


def tokenizer_source(model_cfg) -> str | None:
    """model.tokenizer_name_or_path, else the pretrained directory's own tokenizer.model."""
    if model_cfg.tokenizer_name_or_path:
        return model_cfg.tokenizer_name_or_path
    if model_cfg.name_or_path and os.path.isfile(os.path.join(model_cfg.name_or_path, TOKENIZER)):
        return model_cfg.name_or_path
    return None


# ------------------------------------------------------------------------------ writing


def write_hub(tensors, out_dir: str, config_fields: dict, max_shard_bytes: int) -> list[str]:
    """Write (hub name, host tensor) pairs as safetensors files of at most `max_shard_bytes`
    (a tensor larger than that gets a file of its own), with the index and config.json.

    `tensors` is consumed lazily and each file is written as soon as it is full, so memory
    stays at one file's worth.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[dict] = []
    batch, batch_bytes = {}, 0
    weight_map: dict[str, int] = {}
    total = 0

    def flush():
        nonlocal batch, batch_bytes
        if batch:
            number = len(files)
            save_file(batch, out / f"part-{number}.tmp", metadata={"format": "pt"})
            files.append({"keys": list(batch)})
            weight_map.update({k: number for k in batch})
            batch, batch_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if batch and batch_bytes + size > max_shard_bytes:
            flush()
        batch[name] = tensor.clone(memory_format=torch.contiguous_format)  # safetensors refuses shared storage
        batch_bytes += size
        total += size
    flush()
    count = len(files)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for i, name in enumerate(names):
        os.replace(out / f"part-{i}.tmp", out / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config_fields, indent=2) + "\n")
    return names
