"""The device mesh: data parallel across slices (dcn), fsdp, expert and tensor parallel.

The batch is split over every axis but `tensor`; parameters are split as the sharding
rules say (clm/conf/sharding). Shapes and checks are plain arithmetic so the planner can
use them for a pod it is not running on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clm.errors import UserError
from clm.model import family

AXES = ("dcn", "fsdp", "expert", "tensor")
# The batch dimension is split over these; devices that differ only in `tensor` share a batch shard.
DATA_AXES = ("dcn", "fsdp", "expert")

# A partition spec: one entry per tensor dimension, each None (not split), an axis name, or a
# tuple of axis names (split over their product, major first).
PartitionSpec = tuple


def axes_of(entry) -> tuple[str, ...]:
    """The mesh axes one partition-spec entry splits its dimension over."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


@dataclass(frozen=True)
class MeshShape:
    dcn: int
    fsdp: int
    expert: int
    tensor: int

    @property
    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def num_devices(self) -> int:
        return self.dcn * self.fsdp * self.expert * self.tensor

    @property
    def data_parallel(self) -> int:
        return self.dcn * self.fsdp * self.expert

    def __str__(self) -> str:
        return " x ".join(f"{axis}={size}" for axis, size in self.sizes.items())


def mesh_shape(num_devices: int, tensor_parallelism: int, expert_parallelism: int, num_slices: int) -> MeshShape:
    """fsdp = devices / (slices x tp x ep); one line naming the knob when that does not divide."""
    for knob, value in (("tensor_parallelism", tensor_parallelism), ("expert_parallelism", expert_parallelism),
                        ("num_slices", num_slices)):
        if value < 1 or num_devices % value:
            raise UserError(f"{knob}={value} must be a positive divisor of the device count ({num_devices})")
    model_parallel = tensor_parallelism * expert_parallelism
    per_slice = num_devices // num_slices
    if per_slice % model_parallel:
        devices = (f"the device count ({num_devices})" if num_slices == 1 else
                   f"the devices of one slice ({per_slice} = {num_devices} devices / num_slices={num_slices})")
        raise UserError(f"tensor_parallelism x expert_parallelism = {model_parallel} must divide {devices}")
    return MeshShape(num_slices, per_slice // model_parallel, expert_parallelism, tensor_parallelism)


def check_model_fits_mesh(shape: MeshShape, hf_config) -> None:
    """Tensor parallelism splits attention heads; expert parallelism splits experts (of any family)."""
    tp, ep = shape.tensor, shape.expert
    heads, kv_heads = family.num_attention_heads(hf_config), family.num_key_value_heads(hf_config)
    if heads % tp:
        raise UserError(f"tensor_parallelism={tp} must divide num_attention_heads={heads}")
    if kv_heads % tp:
        raise UserError(f"tensor_parallelism={tp} must divide num_key_value_heads={kv_heads}")
    experts = family.num_experts(hf_config)
    if ep > 1 and not experts:
        raise UserError(f"expert_parallelism={ep}: {hf_config.model_type} is a dense model (no experts); "
                        "use expert_parallelism=1")
    if experts % ep:
        raise UserError(f"expert_parallelism={ep} must divide {family.expert_count_field(hf_config)}={experts}")


def check_multihost_input(shape: MeshShape) -> None:
    """torch_xla assembles a global batch from per-host rows only when the rows are split over
    every device; with tensor parallelism they are replicated over `tensor`."""
    import torch_xla.runtime as xr

    if xr.process_count() > 1 and shape.tensor > 1:
        raise UserError(
            f"tensor_parallelism={shape.tensor} on a {xr.process_count()}-host job: torch_xla cannot assemble a "
            "batch that is replicated over the tensor axis from per-host rows; use tensor_parallelism=1 "
            "(fsdp, expert parallelism) on multi-host jobs"
        )


def runtime_num_slices() -> int:
    """Slices in this job: TPU devices carry a slice_index; anything else is one slice."""
    import torch_xla.runtime as xr

    attributes = xr.global_runtime_device_attributes()
    return 1 + max(int(a.get("slice_index", 0)) for a in attributes)


def build_mesh(shape: MeshShape):
    import torch_xla.distributed.spmd as xs

    ici = (1, shape.fsdp, shape.expert, shape.tensor)
    if shape.dcn > 1 and runtime_num_slices() > 1:
        # Real multislice: lay the dcn axis across slices, the others inside one slice's ICI.
        return xs.HybridMesh(ici_mesh_shape=ici, dcn_mesh_shape=(shape.dcn, 1, 1, 1), axis_names=AXES)
    # One slice (or a logical dcn axis on one slice, as tests use): devices in order.
    return xs.Mesh(np.arange(shape.num_devices), tuple(shape.sizes.values()), AXES)
