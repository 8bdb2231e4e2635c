"""Sharding rules as data: parameter-name globs -> partition specs, checked against the model.

One table per model family, clm/conf/sharding/<model_type>.yaml, chosen by the model's
model_type unless `sharding=NAME` picks another (or a run's config gives its own). One
function (`plan_parameters`) turns a table and a mesh shape into each parameter's partition
spec and per-device shape; the model builder applies it, the planner prints it. A rule that
matches nothing, a matrix no rule covers, a spec of the wrong length or an unknown axis is
an error, never a silently replicated 140B model.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from omegaconf import OmegaConf

from clm.errors import UserError
from clm.parallel.mesh import AXES, DATA_AXES, MeshShape, PartitionSpec, axes_of
from clm.parallel.placement import Placement

RULES_DIR = Path(__file__).resolve().parents[1] / "conf" / "sharding"


@dataclass(frozen=True)
class ParameterSharding:
    name: str
    rule: str | None
    shape: tuple[int, ...]
    spec: PartitionSpec
    local_shape: tuple[int, ...]


def shipped_rules() -> list[str]:
    return sorted(p.stem for p in RULES_DIR.glob("*.yaml") if p.stem != "auto")


def sharding_rules(table: Mapping | None, model_type: str) -> dict[str, Sequence] | None:
    """The run's rule table: `table` when the config gives one (`sharding=NAME`), else the
    model family's clm/conf/sharding/<model_type>.yaml; None when there is no such file."""
    if table:
        return {str(k): v for k, v in OmegaConf.to_container(OmegaConf.create(dict(table))).items()}
    path = RULES_DIR / f"{model_type}.yaml"
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path))


def _normalise(entry) -> str | tuple[str, ...] | None:
    if entry is None or isinstance(entry, str):
        return entry
    return tuple(entry)


def plan_parameters(
    named_shapes: Iterable[tuple[str, Sequence[int]]],
    rules: Mapping[str, Sequence] | None,
    mesh: MeshShape,
    aliases: Iterable[str] = (),
    model_type: str = "this model",
) -> list[ParameterSharding]:
    """Each parameter's partition spec and per-device shape (uneven splits round up, as XLA pads).

    `aliases` are names of tied parameters (lm_head.weight tied to the embedding): not tensors
    of their own, so they need no rule, and a rule that matches only them still counts as used.
    `rules=None` (the family has no table) fails in one line naming the parameters left unmatched.
    """
    named_shapes = [(name, tuple(int(s) for s in shape)) for name, shape in named_shapes]
    if rules is None:
        unmatched = [name for name, shape in named_shapes if len(shape) >= 2]
        shown = ", ".join(unmatched[:4]) + (f" and {len(unmatched) - 4} more" if len(unmatched) > 4 else "")
        raise UserError(
            f"model_type {model_type!r} has no sharding rules (no clm/conf/sharding/{model_type}.yaml), so these "
            f"parameters match no rule: {shown}; add that file (shipped: {', '.join(shipped_rules())}) or pass "
            "sharding=NAME"
        )
    rules = {pattern: tuple(_normalise(e) for e in spec) for pattern, spec in rules.items()}
    for pattern, spec in rules.items():
        for axis in (a for entry in spec for a in axes_of(entry)):
            if axis not in AXES:
                raise UserError(f"sharding rule '{pattern}': unknown mesh axis '{axis}'; axes are {', '.join(AXES)}")

    used = set()
    plan = []
    for name, shape in named_shapes:
        rule = next((pattern for pattern in rules if fnmatch.fnmatchcase(name, pattern)), None)
        if rule is None:
            if len(shape) >= 2:
                raise UserError(
                    f"parameter '{name}' {list(shape)} matches no sharding rule of {model_type}; add one to the "
                    "sharding table"
                )
            spec = (None,) * len(shape)
        else:
            used.add(rule)
            spec = rules[rule]
            if len(spec) != len(shape):
                raise UserError(
                    f"sharding rule '{rule}' has {len(spec)} entries but '{name}' has {len(shape)} dimensions"
                )
        local = tuple(
            math.ceil(size / math.prod(mesh.sizes[a] for a in axes_of(entry))) for size, entry in zip(shape, spec)
        )
        plan.append(ParameterSharding(name, rule, shape, spec, local))
    for alias in aliases:
        used.update(pattern for pattern in rules if fnmatch.fnmatchcase(alias, pattern))

    unused = [pattern for pattern in rules if pattern not in used]
    if unused:
        raise UserError(f"sharding rule '{unused[0]}' matches no parameter of {model_type}; fix or remove it")
    return plan


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a model's state consists of: its parameters and its persistent buffers (DeepSeek's
    routing correction bias), each once (a tied parameter under its first name)."""
    tensors = dict(model.named_parameters())
    state_keys = model.state_dict(keep_vars=True).keys()
    tensors.update((name, b) for name, b in model.named_buffers() if name in state_keys)
    return tensors


def tied_aliases(model: torch.nn.Module) -> list[str]:
    """Names under which a parameter appears a second time (weight tying)."""
    unique = {name for name, _ in model.named_parameters()}
    return [name for name, _ in model.named_parameters(remove_duplicate=False) if name not in unique]


def plan_model(model: torch.nn.Module, table: Mapping | None, shape: MeshShape) -> list[ParameterSharding]:
    """The sharding plan of a built model (meta tensors are fine: only shapes are read), from the
    config's `sharding` table (empty: the model family's own, see `sharding_rules`)."""
    model_type = model.config.model_type
    return plan_parameters(((n, t.shape) for n, t in model_tensors(model).items()), sharding_rules(table, model_type),
                           shape, aliases=tied_aliases(model), model_type=model_type)


def shard_parameters(model: torch.nn.Module, mesh, shardings: Iterable[ParameterSharding]) -> dict:
    """Annotate every parameter and persistent buffer with its partition spec from `shardings`
    (`plan_model`'s, as the model plan holds them), before anything is materialised.

    Replicated ones too: a tensor without an annotation and one that a step returned as
    replicated are different inputs to XLA, so a step would compile (and round) differently
    on freshly built or restored tensors than on trained ones.
    Returns {name: Placement}, which the init and the weight loader fill from.
    """
    import torch_xla.distributed.spmd as xs

    tensors = model_tensors(model)
    placements = {}
    for entry in shardings:
        xs.mark_sharding(tensors[entry.name], mesh, entry.spec)
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


def attention_spec() -> PartitionSpec:
    """[batch, heads, sequence, head_dim] q/k/v of the flash kernel: rows over the data axes,
    heads over tensor (as the q/k/v projections' output)."""
    return (DATA_AXES, "tensor", None, None)
