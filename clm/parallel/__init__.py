"""Mesh and sharding rules."""

from clm.parallel.mesh import (
    DATA_AXES,
    MeshShape,
    PartitionSpec,
    axes_of,
    build_mesh,
    check_model_fits_mesh,
    check_multihost_input,
    mesh_shape,
    runtime_num_slices,
)
from clm.parallel.sharding import (
    attention_spec,
    batch_spec,
    expert_activation_spec,
    logits_spec,
    plan_model,
    plan_parameters,
    shard_parameters,
    sharding_rules,
)

__all__ = [
    "DATA_AXES", "MeshShape", "PartitionSpec", "axes_of", "build_mesh", "check_model_fits_mesh",
    "check_multihost_input", "mesh_shape", "runtime_num_slices", "attention_spec", "batch_spec",
    "expert_activation_spec", "logits_spec", "plan_model", "plan_parameters", "shard_parameters", "sharding_rules",
]
