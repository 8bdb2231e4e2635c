"""Sharding rules as data: parameter-name globs -> partition specs, checked against the model.

One function (`plan_parameters`) turns the rule table and a mesh shape into each
parameter's partition spec and per-device shape; the trainer applies it, the planner
prints it. A rule that matches nothing, a matrix no rule covers, a spec of the wrong
length or an unknown axis is an error, never a silently replicated 140B model.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from clm.errors import UserError
from clm.parallel.mesh import AXES, DATA_AXES, MeshShape

# An entry per dimension: None, one axis name, or a tuple of axis names.
PartitionSpec = tuple


@dataclass(frozen=True)
class ParameterSharding:
    name: str
    rule: str | None
    shape: tuple[int, ...]
    spec: PartitionSpec
    local_shape: tuple[int, ...]


def _normalise(entry) -> str | tuple[str, ...] | None:
    if entry is None or isinstance(entry, str):
        return entry
    return tuple(entry)


def _axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def plan_parameters(
    named_shapes: Iterable[tuple[str, Sequence[int]]], rules: Mapping[str, Sequence], mesh: MeshShape
) -> list[ParameterSharding]:
    """Each parameter's partition spec and per-device shape (uneven splits round up, as XLA pads)."""
    rules = {pattern: tuple(_normalise(e) for e in spec) for pattern, spec in rules.items()}
    for pattern, spec in rules.items():
        for axis in (a for entry in spec for a in _axes_of(entry)):
            if axis not in AXES:
                raise UserError(f"sharding rule '{pattern}': unknown mesh axis '{axis}'; axes are {', '.join(AXES)}")

    used = set()
    plan = []
    for name, shape in named_shapes:
        shape = tuple(int(s) for s in shape)
        rule = next((pattern for pattern in rules if fnmatch.fnmatchcase(name, pattern)), None)
        if rule is None:
            if len(shape) >= 2:
                raise UserError(f"parameter '{name}' {list(shape)} matches no sharding rule; add one to the sharding table")
            spec = (None,) * len(shape)
        else:
            used.add(rule)
            spec = rules[rule]
            if len(spec) != len(shape):
                raise UserError(
                    f"sharding rule '{rule}' has {len(spec)} entries but '{name}' has {len(shape)} dimensions"
                )
        local = tuple(
            math.ceil(size / math.prod(mesh.sizes[a] for a in _axes_of(entry))) for size, entry in zip(shape, spec)
        )
        plan.append(ParameterSharding(name, rule, shape, spec, local))

    unused = [pattern for pattern in rules if pattern not in used]
    if unused:
        raise UserError(f"sharding rule '{unused[0]}' matches no parameter of this model; fix or remove it")
    return plan


def shard_parameters(model: torch.nn.Module, mesh, rules: Mapping[str, Sequence], shape: MeshShape) -> dict:
    """Annotate every parameter with its partition spec (before anything is materialised).

    Replicated ones too: a tensor without an annotation and one that a step returned as
    replicated are different inputs to XLA, so a step would compile (and round) differently
    on freshly built or restored parameters than on trained ones.
    Returns {parameter name: Placement}, which the init and the weight loader fill from.
    """
    import torch_xla.distributed.spmd as xs

    from clm.parallel.placement import Placement

    params = dict(model.named_parameters())
    placements = {}
    for entry in plan_parameters(((n, p.shape) for n, p in params.items()), rules, shape):
        xs.mark_sharding(params[entry.name], mesh, entry.spec)
        placements[entry.name] = Placement(mesh, entry.spec)
    return placements


def batch_spec() -> PartitionSpec:
    """[batch, sequence] inputs: rows over every data axis."""
    return (DATA_AXES, None)


def logits_spec() -> PartitionSpec:
    """[batch, sequence, vocab] logits: rows over the data axes, vocab over tensor (as lm_head)."""
    return (DATA_AXES, None, "tensor")


def expert_activation_spec() -> PartitionSpec:
    """[batch, expert, capacity, hidden] MoE buffers: experts over `expert`, so that moving tokens
    from batch-sharded to expert-sharded is an all-to-all along the expert axis."""
    return (("dcn", "fsdp"), "expert", None, None)
