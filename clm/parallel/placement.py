"""Put host data onto the sharded devices one parameter at a time, each device getting only its slice.

`place` builds a parameter's per-device shards from a `read(index)` function that returns the
host tensor for one index (a tuple of slices into the full tensor), so the caller decides
where the values come from: a full host tensor (the random init) or a file read of exactly
that slice (pretrained weights). A host reads only what its own devices hold, each distinct
slice once (replicas share it), and the full tensor is never assembled on the device side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from clm.parallel.mesh import PartitionSpec, axes_of

Index = tuple[slice, ...]


@dataclass(frozen=True)
class Placement:
    """Where one parameter lives: its mesh and partition spec (None entries: not split)."""

    mesh: object  # torch_xla.distributed.spmd.Mesh
    spec: PartitionSpec

    def local_indices(self, shape: tuple[int, ...]) -> list[tuple[str, Index, tuple[int, ...]]]:
        """(device, index into the full tensor, padded shard shape) for each device of this host.

        GSPMD's tiling: along a dimension split over axes (a, b, ...), a device's tile number is
        its mesh coordinates on those axes read major-first; tiles are ceil(size / tiles) long
        and the last ones are padded (possibly empty), as XLA pads.
        """
        import torch_xla

        names = list(self.mesh.axis_names)
        logical = self.mesh.get_logical_mesh()
        coordinates = {int(d): c for c, d in zip(_ndindex(logical.shape), logical.flat)}
        sizes = dict(zip(names, self.mesh.mesh_shape))
        result = []
        for device in torch_xla._XLAC._xla_get_runtime_devices():
            coordinate = dict(zip(names, coordinates[int(device.split(":")[1])]))
            index, padded = [], []
            for size, entry in zip(shape, self.spec):
                tiles, tile = 1, 0
                for axis in axes_of(entry):
                    tiles, tile = tiles * sizes[axis], tile * sizes[axis] + coordinate[axis]
                length = math.ceil(size / tiles)
                start = min(tile * length, size)
                index.append(slice(start, min(start + length, size)))
                padded.append(length)
            result.append((device, tuple(index), tuple(padded)))
        return result


def _ndindex(shape):
    import numpy as np

    return list(np.ndindex(*shape))


def read_shards(shape: tuple[int, ...], dtype: torch.dtype, placement: Placement,
                read: Callable[[Index], torch.Tensor]) -> list[torch.Tensor]:
    """This host's padded shards of one parameter, one per local device; replicas share one tensor.

    Plain host work (no device calls), so the weight loader runs it in threads.
    """
    distinct: dict[tuple, torch.Tensor] = {}
    shards = []
    for _, index, padded in placement.local_indices(shape):
        key = tuple((s.start, s.stop) for s in index)
        if key not in distinct:
            values = read(index)
            expected = tuple(s.stop - s.start for s in index)
            if tuple(values.shape) != expected:
                raise AssertionError(f"read returned {list(values.shape)} for slice {expected}")
            # Always a fresh host buffer: `values` may be a view into a memory-mapped file, which
            # XLA's CPU client could otherwise keep mapped (and resident) behind the device buffer.
            shard = (torch.empty if expected == padded else torch.zeros)(padded, dtype=dtype)
            shard[tuple(slice(0, n) for n in expected)] = values
            distinct[key] = shard
            del values
        shards.append(distinct[key])
    return shards


def shard_bytes(shards: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in shards}.values())


def place_shards(param: torch.Tensor, placement: Placement, shards: list[torch.Tensor]) -> None:
    """Replace `param`'s device data with this host's shards (from `read_shards`)."""
    import torch_xla

    shape = tuple(param.shape)
    op_sharding = placement.mesh.get_op_sharding(placement.spec)
    sharded = torch_xla._XLAC._global_tensor_from_cpu_shards(shards, op_sharding, list(shape))
    # XLA's own view of the same tiling: a mismatch would silently scramble the weights.
    actual = torch_xla._XLAC._get_local_shard_replica_and_indices([sharded])[0]
    for (_, index, _), (_, xla_index) in zip(placement.local_indices(shape), actual):
        if xla_index is not Ellipsis and [(s.start, s.stop) for s in xla_index] != [(s.start, s.stop) for s in index]:
            raise AssertionError(f"shard index {index} disagrees with XLA's {xla_index}")
    # Swapped in as the tensor's data: replacing the XLA tensor under it instead
    # (_replace_xla_tensor) leaves the to_empty() placeholder alive in the pending graph,
    # and the next sync then materialises it, whole and unsharded, on every device.
    param.data = sharded


def place(param: torch.Tensor, placement: Placement, read: Callable[[Index], torch.Tensor]) -> None:
    """Fill `param` from `read`, sharded as `placement` says; the host shards are freed on return."""
    place_shards(param, placement, read_shards(tuple(param.shape), param.dtype, placement, read))


def place_replicated(tensor: torch.Tensor, host_values: torch.Tensor) -> None:
    """A small tensor (a buffer) copied whole to every device."""
    tensor.data = host_values.to(tensor.dtype).to(tensor.device)
