"""Pretrained weights in the Hugging Face hub's layout, for any family: check, load sharded, write back.

The hub's files and transformers' in-memory model name and shape tensors differently for many
families: Mixtral's hub files hold each expert's `block_sparse_moe.experts.{e}.w1/w2/w3`, Qwen's
and DeepSeek's `mlp.experts.{e}.gate_proj/up_proj/down_proj`, while transformers 5 holds the
experts fused, `mlp.experts.gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`. transformers
says how, per model_type, in its own conversion mapping (conversion_mapping.py: renamings and
`WeightConverter`s with `MergeModulelist`, `Concatenate`, `Chunk`, `Transpose`, ...). clm uses
that mapping as it is, in both directions, and writes no table per family:

- loading runs each converter's operations on `Lazy` stand-ins for the hub tensors instead of
  the tensors themselves. The result is a recipe per in-memory tensor (stack these, concatenate
  those along dim 1, ...) that reads any slice of the fused tensor as slices of the hub
  tensors, so every device's slice is read straight from the files (safetensors' lazy
  `get_slice`). An operation without a slice rule here still works: its inputs are read whole
  for that one tensor, and the result sliced.
- checking and exporting run transformers' reverse conversion (what `save_pretrained` does)
  on meta tensors (the names and shapes the hub layout must have) or on one in-memory tensor
  at a time (the export).

A load reads, per tensor, only the slices this host's devices hold, a few tensors at a time in
threads, so host memory stays a small multiple of the largest tensor.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch

from clm.errors import UserError
from clm.parallel.sharding import model_tensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

Index = tuple[slice, ...]


def _name_list(names, limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------ the model side


def hub_layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every hub tensor's name and shape for `model` (meta is enough): transformers' reverse
    conversion, as `save_pretrained` writes them."""
    return {name: tuple(t.shape) for name, t in to_hub(model, model_tensors(model)).items()}


def to_hub(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory tensors (names as in `model`) -> hub-layout tensors, by transformers' reverse
    conversion. Give it everything one reverse converter needs (`export_groups`)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


def export_groups(model: torch.nn.Module, names) -> list[list[str]]:
    """The in-memory names, grouped so that each group converts to hub tensors on its own
    (a reverse converter that merges several in-memory tensors gets them together)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, apply_converters

    reverse = [t.reverse_transform() for t in get_model_conversion_mapping(model, add_legacy=False)[::-1]]
    converters = [t for t in reverse if isinstance(t, WeightConverter)]
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        target, pattern = apply_converters(name, converters)
        groups[target if pattern is not None else name].append(name)
    return list(groups.values())


# ------------------------------------------------------------------- lazy slices of tensors


class Lazy:
    """A tensor not read yet: its shape, dtype and `read(index)` of any slice of it.

    transformers' conversion operations are run on these (through `__torch_function__`), so
    the recipe of a fused tensor is theirs; `read` then turns a slice of the result into slices
    of the hub tensors.
    """

    def __init__(self, shape, dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def contiguous(self, *args, **kwargs) -> Lazy:
        return self

    def read(self, index: Index) -> torch.Tensor:
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        return self.read(tuple(slice(0, n) for n in self.shape))

    def leaves(self) -> list[Leaf]:
        return [leaf for child in self.children() for leaf in child.leaves()]

    def children(self) -> list[Lazy]:
        return []

    def __getattr__(self, name: str):
        # Tensor methods (tensor.reshape(...)) go where torch functions go.
        method = getattr(torch.Tensor, name, None)
        if method is None or name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: Lazy.__torch_function__(method, (type(self),), (self, *args), kwargs)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _SLICE_RULES.get(func)
        if rule is not None:
            return rule(*args, **kwargs)
        return Computed.of(func, args, kwargs)


class Leaf(Lazy):
    """One tensor of a hub checkpoint file."""

    def __init__(self, checkpoint: HubCheckpoint, key: str, shape, dtype: torch.dtype):
        super().__init__(shape, dtype)
        self.checkpoint, self.key = checkpoint, key

    def read(self, index: Index) -> torch.Tensor:
        return self.checkpoint.read(self.key, index)

    def leaves(self) -> list[Leaf]:
        return [self]


def _dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _empty(index: Index, dtype) -> torch.Tensor:
    return torch.empty(tuple(s.stop - s.start for s in index), dtype=dtype)


class Stacked(Lazy):
    def __init__(self, parts: list[Lazy], dim: int):
        dim = _dim(dim, parts[0].ndim + 1)
        shape = list(parts[0].shape)
        shape.insert(dim, len(parts))
        super().__init__(shape, parts[0].dtype)
        self.parts, self.dim_ = parts, dim

    def children(self) -> list[Lazy]:
        return self.parts

    def read(self, index: Index) -> torch.Tensor:
        along, rest = index[self.dim_], index[:self.dim_] + index[self.dim_ + 1:]
        if along.stop <= along.start:
            return _empty(index, self.dtype)
        return torch.stack([self.parts[i].read(rest) for i in range(along.start, along.stop)], dim=self.dim_)


class Concatenated(Lazy):
    def __init__(self, parts: list[Lazy], dim: int):
        dim = _dim(dim, parts[0].ndim)
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        super().__init__(shape, parts[0].dtype)
        self.parts, self.dim_ = parts, dim

    def children(self) -> list[Lazy]:
        return self.parts

    def read(self, index: Index) -> torch.Tensor:
        along, pieces, offset = index[self.dim_], [], 0
        for part in self.parts:
            size = part.shape[self.dim_]
            start, stop = max(along.start - offset, 0), min(along.stop - offset, size)
            if start < stop:
                pieces.append(part.read(index[:self.dim_] + (slice(start, stop),) + index[self.dim_ + 1:]))
            offset += size
        return torch.cat(pieces, dim=self.dim_) if pieces else _empty(index, self.dtype)


class Narrowed(Lazy):
    """`part` restricted to [start, start + length) along `dim` (a chunk or split piece)."""

    def __init__(self, part: Lazy, dim: int, start: int, length: int):
        dim = _dim(dim, part.ndim)
        shape = list(part.shape)
        shape[dim] = length
        super().__init__(shape, part.dtype)
        self.part, self.dim_, self.start = part, dim, start

    def children(self) -> list[Lazy]:
        return [self.part]

    def read(self, index: Index) -> torch.Tensor:
        along = index[self.dim_]
        shifted = slice(along.start + self.start, along.stop + self.start)
        return self.part.read(index[:self.dim_] + (shifted,) + index[self.dim_ + 1:])


class Transposed(Lazy):
    def __init__(self, part: Lazy, dim0: int, dim1: int):
        dim0, dim1 = _dim(dim0, part.ndim), _dim(dim1, part.ndim)
        shape = list(part.shape)
        shape[dim0], shape[dim1] = shape[dim1], shape[dim0]
        super().__init__(shape, part.dtype)
        self.part, self.dims = part, (dim0, dim1)

    def children(self) -> list[Lazy]:
        return [self.part]

    def read(self, index: Index) -> torch.Tensor:
        swapped = list(index)
        d0, d1 = self.dims
        swapped[d0], swapped[d1] = index[d1], index[d0]
        return self.part.read(tuple(swapped)).transpose(d0, d1)


class Computed(Lazy):
    """Any other operation: its Lazy inputs are read whole (for this one tensor), the operation
    run, the result sliced. Shapes come from running it on meta tensors."""

    def __init__(self, func, args, kwargs, output: int | None, shape, dtype):
        super().__init__(shape, dtype)
        self.func, self.args, self.kwargs, self.output = func, args, kwargs, output
        self._value: torch.Tensor | None = None

    @classmethod
    def of(cls, func, args, kwargs):
        meta = func(*_map_lazy(args, _as_meta), **_map_lazy(kwargs, _as_meta))
        if isinstance(meta, torch.Tensor):
            return cls(func, args, kwargs, None, meta.shape, meta.dtype)
        if isinstance(meta, (tuple, list)) and all(isinstance(m, torch.Tensor) for m in meta):
            return type(meta)(cls(func, args, kwargs, i, m.shape, m.dtype) for i, m in enumerate(meta))
        return meta  # not a tensor (a shape, a number): nothing to read

    def children(self) -> list[Lazy]:
        found = []
        _map_lazy((self.args, self.kwargs), lambda x: found.append(x) or x)
        return found

    def read(self, index: Index) -> torch.Tensor:
        # Kept while one tensor's device slices are read, freed with the recipe.
        if self._value is None:
            result = self.func(*_map_lazy(self.args, Lazy.full), **_map_lazy(self.kwargs, Lazy.full))
            self._value = result if self.output is None else result[self.output]
        return self._value[index]


def _as_meta(x: Lazy) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _map_lazy(value, fn):
    if isinstance(value, Lazy):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_lazy(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_lazy(v, fn) for k, v in value.items()}
    return value


def _stack(tensors, dim=0):
    return Stacked(list(tensors), dim)


def _cat(tensors, dim=0):
    return Concatenated(list(tensors), dim)


def _transpose(tensor, dim0, dim1):
    return Transposed(tensor, dim0, dim1)


def _pieces(tensor: Lazy, sizes: list[int], dim: int) -> tuple[Lazy, ...]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(Narrowed(tensor, dim, start, size) for start, size in zip(starts, sizes))


def _chunk(tensor, chunks, dim=0):
    size = tensor.shape[_dim(dim, tensor.ndim)]
    step = -(-size // chunks)
    return _pieces(tensor, [min(step, size - s) for s in range(0, size, step)], dim)


def _split(tensor, split_size_or_sections, dim=0):
    size = tensor.shape[_dim(dim, tensor.ndim)]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        return _pieces(tensor, [min(step, size - s) for s in range(0, size, step)], dim)
    return _pieces(tensor, list(split_size_or_sections), dim)


def _contiguous(tensor, *args, **kwargs):
    return tensor


_SLICE_RULES = {
    torch.stack: _stack, torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat,
    torch.transpose: _transpose, torch.Tensor.transpose: _transpose,
    torch.chunk: _chunk, torch.Tensor.chunk: _chunk, torch.split: _split, torch.Tensor.split: _split,
    torch.Tensor.contiguous: _contiguous,
}


# ------------------------------------------------------------------------- the hub side


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
        # Each file's header ({key: (shape, dtype)}), read at most once: the single-file layout
        # reads it for the weight map already, and `shapes` (the check, then the load) reuses it.
        self._headers: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
        self.weight_map = self._weight_map()
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._dtypes: dict[str, torch.dtype] = {}

    def _weight_map(self) -> dict[str, str]:
        index_file = self.path / INDEX
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{self.knob}: {INDEX} is not a safetensors index ({e})") from None
        elif (self.path / SINGLE).is_file():
            weight_map = {key: SINGLE for key in self._header(SINGLE)}
        else:
            raise UserError(f"{self.knob}: neither {INDEX} nor {SINGLE} in it")
        for file in sorted(set(weight_map.values())):
            if not (self.path / file).is_file():
                raise UserError(f"{self.knob}: {file}, named in {INDEX}, does not exist")
        return weight_map

    @contextmanager
    def _open(self, file: str):
        """A safetensors file of this directory, opened lazily. safetensors checks on opening that
        the header describes the whole file, so a file cut short (a broken download) fails here."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.path / file, framework="pt") as f:
                yield f
        except SafetensorError as e:
            raise UserError(f"{self.knob}: {file} is cut short or is not a safetensors file ({e}); "
                            "download it again") from None
        except OSError as e:
            raise UserError(f"{self.knob}: {file} cannot be read ({e})") from None

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _header(self, file: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{key: (shape, dtype)} of one file, from its safetensors header (no tensor data is read)."""
        if file not in self._headers:
            header = {}
            with self._open(file) as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype(), torch.float32)
                    header[key] = (tuple(tensor.get_shape()), dtype)
            self._headers[file] = header
        return self._headers[file]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape from the safetensors headers (no tensor data is read)."""
        if self._shapes is None:
            headers = [self._header(file) for file in self.files]
            shapes = {key: shape for header in headers for key, (shape, _) in header.items()}
            self._dtypes = {key: dtype for header in headers for key, (_, dtype) in header.items()}
            absent = [k for k, file in self.weight_map.items() if k not in shapes]
            if absent:
                raise UserError(f"{self.knob}: {INDEX} names tensors that its files do not hold: {_name_list(absent)}")
            self._shapes = shapes
        return self._shapes

    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    def check(self, model: torch.nn.Module) -> None:
        """Every tensor `model` (on meta, from the config) needs is there, with the shape the config
        implies, and nothing else."""
        quantization = self.config_fields.get("quantization_config")
        if quantization:
            method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
            raise UserError(
                f"{self.knob}: its weights are {method}-quantized; clm trains from bf16 or fp32 weights. Write a "
                "dequantized copy once, e.g. `python -c \"import torch; from transformers import AutoModelForCausalLM, "
                "Mxfp4Config as Q; AutoModelForCausalLM.from_pretrained('DIR', dtype=torch.bfloat16, "
                "quantization_config=Q(dequantize=True)).save_pretrained('OUT')\"` (for mxfp4), and set "
                "model.name_or_path=OUT")
        expected = hub_layout(model)
        actual = self.shapes()
        missing, extra = expected.keys() - actual.keys(), actual.keys() - expected.keys()
        if missing:
            raise UserError(f"{self.knob}: missing tensors {_name_list(missing)} (of {len(expected)} this config needs)")
        if extra:
            raise UserError(f"{self.knob}: tensors this config has no place for: {_name_list(extra)}")
        from transformers.core_model_loading import dot_natural_key

        for key in sorted(expected, key=dot_natural_key):
            shape = expected[key]
            if actual[key] != shape:
                raise UserError(f"{self.knob}: tensor {key} has shape {list(actual[key])} but config.json implies "
                                f"{list(shape)}")

    def read(self, key: str, index: Index) -> torch.Tensor:
        # Opened per read: the mapping is dropped right after, so its pages leave this process.
        # (A file cut short after the headers were read fails here, as one line too.)
        with self._open(self.weight_map[key]) as f:
            return f.get_slice(key)[index]

    def sources(self, model: torch.nn.Module) -> dict[str, Lazy]:
        """Each of `model`'s checkpoint tensors as a `Lazy` recipe over this directory's tensors,
        built by transformers' own conversion mapping for the model (as `from_pretrained` does)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        wanted = model_tensors(model)
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        shapes = self.shapes()

        groups: dict[str, WeightRenaming | WeightConverter] = {}
        for key in sorted(shapes, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
            if name not in wanted and key in wanted:  # as from_pretrained: a key already in the model's names
                name, pattern = key, None
            if name not in wanted:
                continue  # `check` reports it
            if pattern is not None:
                transform = groups.setdefault(name, deepcopy(by_pattern[pattern]))
            else:
                transform = groups.setdefault(name, WeightRenaming(key, name))
                pattern = key
            transform.add_tensor(name, key, pattern, Leaf(self, key, shapes[key], self._dtypes[key]))

        recipes: dict[str, Lazy] = {}
        for first, transform in groups.items():
            for name, value in transform.convert(first, model=model, config=model.config).items():
                recipes[name] = value[0] if isinstance(value, list) else value
        for name, recipe in recipes.items():
            if name in wanted and tuple(recipe.shape) != tuple(wanted[name].shape):
                raise UserError(f"{self.knob}: {name} converts to shape {list(recipe.shape)} but the model has "
                                f"{list(wanted[name].shape)}")
        absent = wanted.keys() - recipes.keys()
        if absent:
            raise UserError(f"{self.knob}: nothing in it converts to {_name_list(absent)}")
        return recipes


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


# ---------------------------------------------------------------------------- loading


@dataclass
class LoadStats:
    bytes_read: int
    seconds: float
    parameters: int


def load(model, placements: dict, checkpoint: HubCheckpoint, workers: int = 4, progress: bool = True) -> LoadStats:
    """Fill every checkpoint tensor of the (meta-created, sharded) model from the checkpoint.

    Parameters go where `placements` says; a tensor without a placement (a persistent buffer)
    is copied whole to every device. Reads run in threads, at most `workers` tensors in
    flight, interleaved over files so that concurrent reads hit different files; each tensor
    is placed on the devices by the main thread as soon as its slices are read, and its host
    copy freed.
    """
    from tqdm import tqdm

    from clm.parallel.placement import Placement, place_replicated, place_shards, read_shards, shard_bytes

    tensors = model_tensors(model)
    recipes = checkpoint.sources(model)
    by_file = defaultdict(list)
    for name in tensors:
        by_file[checkpoint.weight_map[recipes[name].leaves()[0].key]].append(name)
    order = [n for group in _round_robin(list(by_file.values())) for n in group]

    def read(name):
        tensor, recipe = tensors[name], recipes.pop(name)
        placement: Placement | None = placements.get(name)
        if placement is None:
            return [recipe.full().to(tensor.dtype)]
        return read_shards(tuple(tensor.shape), tensor.dtype, placement, recipe.read)

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
            if name in placements:
                place_shards(tensors[name], placements[name], shards)
            else:
                place_replicated(tensors[name], shards[0])
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
