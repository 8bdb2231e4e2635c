"""Mesh, sharding rules, activation checkpointing and the memory planner."""

from clm.parallel.mesh import (
    AXES,
    DATA_AXES,
    MeshShape,
    build_mesh,
    check_model_fits_mesh,
    check_multihost_input,
    mesh_shape,
    runtime_num_slices,
)
from clm.parallel.sharding import (
    ParameterSharding,
    batch_spec,
    expert_activation_spec,
    logits_spec,
    plan_parameters,
    shard_parameters,
)
