"""Mesh and sharding rules."""

from clm.parallel.mesh import (
    DATA_AXES,
    MeshShape,
    build_mesh,
    check_model_fits_mesh,
    check_multihost_input,
    mesh_shape,
    runtime_num_slices,
)
from clm.parallel.sharding import (
    batch_spec,
    expert_activation_spec,
    logits_spec,
    plan_parameters,
    shard_parameters,
)

__all__ = [
    "DATA_AXES", "MeshShape", "build_mesh", "check_model_fits_mesh", "check_multihost_input", "mesh_shape",
    "runtime_num_slices", "batch_spec", "expert_activation_spec", "logits_spec", "plan_parameters", "shard_parameters",
]
