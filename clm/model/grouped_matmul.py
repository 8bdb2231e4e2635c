"""Dropless experts on a mesh through a grouped matmul: tokens go to their experts' shard by
all-to-all over the `expert` axis, and each device multiplies its own experts' rows inside a
manual-sharding region.

Why a region: the Pallas grouped matmul (torch_xla's GMM, megablox's gmm) is a custom call
that XLA's SPMD partitioner cannot split, so it must see each device's own shapes:
`enable_manual_sharding` / `disable_manual_sharding` turn SPMD off around it (torchprime's
sharded Gmm does the same). A region is not differentiable by itself, so it is one
autograd.Function whose backward is a second region.

One MoE layer, with DF = dcn x fsdp data shards, P = expert-axis size, E_l = E / P experts per
expert shard, T_l = tokens per data shard (the batch is split over dcn, fsdp and expert) and
A = T_l * K (token, choice) assignments per data shard:
1. dispatch (ordinary SPMD, batched over [DF, P]): each data shard writes its A assignments
   into P blocks of R rows, block p holding the rows for the experts of shard p:
   [DF, P_src, P_dst, R, H] split over P_src;
2. exchange: the same tensor split over P_dst instead, which XLA compiles to one all-to-all
   over the expert axis (and back after step 3);
3. region: each device sorts its P x R rows by local expert, runs the grouped matmuls
   (up projection, the family's activation, down projection) and unsorts; padding rows give 0;
4. combine: each assignment reads its row back, times its router weight, summed over K.

Static shapes. R is the worst case, T_l * min(K, E_l) rows: a token picks K distinct experts,
at most min(K, E_l) of them on one shard, so one data shard never sends more than that to one
expert shard, and nothing is ever dropped (the reference is dropless). Any smaller bound (a
capacity) would drop tokens whenever routing is imbalanced, as it is early in training. It is
rounded up to the kernel's row tile. The cost of the bound is memory and all-to-all traffic,
not FLOPs: each device holds P x R rows, P * min(K, E_l) / K times the average it receives,
but the Pallas kernel visits only the row tiles of non-empty groups. With P = 1 (fsdp only)
there is no padding and no exchange: R = A, the device's own assignments.

Weights enter the region split over `expert` only (XLA all-gathers them over fsdp first, as
for any FSDP layer); their gradients leave it per data shard, [DF, E, ...], and are summed
outside. Devices that differ only in `tensor` compute the same rows (the experts are not
split over tensor inside the region). The backward region re-runs the local forward under
autograd (one more expert forward, as activation checkpointing of the expert MLPs would),
so it holds no per-device intermediates across regions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from clm.model import moe
from clm.parallel.mesh import MeshShape

# torch_xla's GMM tiles the rows by 512 and needs the tiles to divide them; it handles any
# hidden and intermediate size (the last k and n tiles are masked).
PALLAS_ROW_TILE = 512
DATA = ("dcn", "fsdp")  # the data axes besides `expert`


def pallas_grouped_matmul(lhs: torch.Tensor, rhs: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """lhs [m, k] rows sorted by group, rhs [G, k, n], group_sizes [G] int32 -> [m, n] (TPU)."""
    from torch_xla.experimental.custom_kernel import GMM

    return GMM.apply(lhs, rhs, group_sizes)


def dropless_experts(model: torch.nn.Module, capacity_factor: float, mesh, shape: MeshShape) -> DroplessExperts | None:
    """The dropless experts of a model built for `mesh`: on TPU when model.capacity_factor <= 0,
    for every layout of transformers' experts interface but a post-expert norm (its weights
    would have to enter the region too). None: the static path (C = S) serves dropless."""
    from clm import runtime

    experts = [m for m in model.modules() if moe.is_experts(m)]
    if capacity_factor > 0 or runtime.device_type() != "TPU" or any(m.has_post_expert_norm for m in experts):
        return None
    return DroplessExperts(mesh, shape)


class DroplessExperts:
    """The dropless experts of one model's mesh (`MoELayer.dropless`, built by clm.model.build)."""

    def __init__(self, mesh, shape: MeshShape,
                 grouped_matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = pallas_grouped_matmul,
                 row_tile: int = PALLAS_ROW_TILE):
        self.mesh = mesh
        self.shape = shape
        self.grouped_matmul = grouped_matmul
        self.row_tile = row_tile

    def receive_rows(self, tokens_per_shard: int, top_k: int, num_experts: int) -> int:
        """R: the static rows of one (source, destination) block (see the module docstring)."""
        worst = tokens_per_shard * min(top_k, num_experts // self.shape.expert)
        return -(-worst // self.row_tile) * self.row_tile

    def __call__(self, experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        """[T, H] tokens, [T, K] routing -> [T, H], as capacity_experts_forward with C = S."""
        num_tokens, hidden = hidden_states.shape
        top_k = top_k_index.shape[-1]
        weights = expert_weights(experts)
        num_experts = weights[0].shape[0]
        data, shards = self.shape.dcn * self.shape.fsdp, self.shape.expert
        if num_tokens % (data * shards):
            raise RuntimeError(f"{num_tokens} tokens do not split over {data * shards} data shards")
        tokens = num_tokens // (data * shards)
        local_experts = num_experts // shards
        rows = self.receive_rows(tokens, top_k, num_experts)
        assignments = tokens * top_k
        source = (DATA, "expert", None, None)

        x = self._constrain(hidden_states.view(data, shards, tokens, hidden), source)
        expert = top_k_index.view(data, shards, assignments)
        destination = torch.div(expert, local_experts, rounding_mode="floor")
        # Place of each assignment in its destination block: earlier assignments to that shard.
        rank = F.one_hot(destination, shards).cumsum(dim=2).gather(3, destination.unsqueeze(-1)).squeeze(-1) - 1
        slot = destination * rows + rank  # [DF, P, A], distinct per source shard
        token = (torch.arange(assignments, device=x.device) // top_k).expand(data, shards, -1)
        token_of_slot = torch.zeros(data, shards, shards * rows, dtype=torch.long, device=x.device).scatter(2, slot, token)
        # Each slot's expert on its destination shard; E_l marks a padding slot.
        expert_of_slot = torch.full((data, shards, shards * rows), local_experts, dtype=torch.long,
                                    device=x.device).scatter(2, slot, expert - destination * local_experts)

        send = self._constrain(moe.gather_rows(x, token_of_slot), source)
        # [DF, P_src, P_dst * R, H] -> [DF, P_src, P_dst, R, H]; the region takes it split over P_dst.
        received = _ExpertRegion.apply(self, experts, send.view(data, shards, shards, rows, hidden),
                                       expert_of_slot.view(data, shards, shards, rows), *weights)
        back = self._constrain(received.view(data, shards, shards * rows, hidden), source)

        gathered = moe.gather_rows(back, slot)  # [DF, P, A, H]: every assignment's expert output
        weighted = gathered * top_k_weights.view(data, shards, assignments, 1)  # router weights are fp32
        output = weighted.view(data, shards, tokens, top_k, hidden).sum(dim=3)
        return output.reshape(num_tokens, hidden).to(hidden_states.dtype)

    # ---- the region
    def received_spec(self, ndim: int) -> tuple:
        """[DF, P_src, P_dst, R, (H)] split over the data shards and the destination."""
        return (DATA, None, "expert", *([None] * (ndim - 3)))

    def region_forward(self, experts, received, expert_of_slot, *weights) -> torch.Tensor:
        local = self._enter(received, self.received_spec(5)), self._enter(expert_of_slot, self.received_spec(4))
        local_weights = [self._enter(w * 1, _weight_spec(w)) for w in weights]  # *1: see _enter
        output = self.local_experts(experts, local[0], local[1], local_weights)
        return self._leave(output, self.received_spec(5), received.shape)

    def region_backward(self, experts, grad, received, expert_of_slot, *weights):
        """(d received, d weights), the weight gradients summed over the data shards."""
        local_grad = self._enter(grad, self.received_spec(5))
        local_rows = self._enter(received, self.received_spec(5))
        local_ids = self._enter(expert_of_slot, self.received_spec(4))
        local_weights = [self._enter(w * 1, _weight_spec(w)) for w in weights]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (local_rows, *local_weights)]
            output = self.local_experts(experts, leaves[0], local_ids, leaves[1:])
            grads = torch.autograd.grad(output, leaves, local_grad, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
        d_received = self._leave(grads[0], self.received_spec(5), received.shape)
        data = self.shape.dcn * self.shape.fsdp
        d_weights = [
            self._leave(g.unsqueeze(0), (DATA, *_weight_spec(w)), (data, *w.shape)).sum(dim=0)
            for g, w in zip(grads[1:], weights)]
        return d_received, d_weights

    def local_experts(self, experts, rows: torch.Tensor, expert_of_row: torch.Tensor, weights) -> torch.Tensor:
        """One device: rows [..., R, H] and their local experts [..., R] (E_l = padding) -> [..., R, H]."""
        shape = rows.shape
        rows, expert_of_row = rows.reshape(-1, shape[-1]), expert_of_row.reshape(-1)
        up, down, *biases = weights
        local_experts = up.shape[0]
        real = (expert_of_row < local_experts).unsqueeze(-1)
        # Padding rows are zeroed on the way in and out: the Pallas kernel leaves the output
        # rows of no group unwritten, and their gradients must not reach the tokens.
        rows = torch.where(real, rows, 0)
        order = torch.argsort(expert_of_row, stable=True)  # padding last
        sorted_expert = expert_of_row[order].clamp(max=local_experts - 1)
        group_sizes = F.one_hot(expert_of_row, local_experts + 1)[:, :local_experts].sum(dim=0).to(torch.int32)

        def project(inputs, weight, bias):  # weight [E_l, out, in], or [E_l, in, out] when transposed
            output = self.grouped_matmul(inputs, weight if experts.is_transposed else weight.transpose(1, 2), group_sizes)
            return output if bias is None else output + bias[sorted_expert]

        up_bias, down_bias = biases if biases else (None, None)
        activated = moe.activate(experts, project(rows[order], up, up_bias))
        sorted_output = project(activated, down, down_bias)
        # (scatter, not index_copy: XLA's shape check fails on index_copy with a sort's
        # indices inside a manual-sharding region)
        output = torch.zeros_like(sorted_output).scatter(0, order.unsqueeze(-1).expand_as(sorted_output), sorted_output)
        return torch.where(real, output, 0).reshape(shape)

    # ---- SPMD helpers
    def _constrain(self, tensor: torch.Tensor, spec: tuple) -> torch.Tensor:
        from torch_xla.distributed.spmd.xla_sharding import MarkShardingFunction

        return MarkShardingFunction.apply(tensor, self.mesh, spec)

    def _enter(self, tensor: torch.Tensor, spec: tuple) -> torch.Tensor:
        """The device's shard of `tensor`. XLA annotates the tensor itself, so a parameter (a
        device buffer with its own sharding) enters as an expression of it (`w * 1`)."""
        import torch_xla.distributed.spmd as xs

        return xs.enable_manual_sharding(tensor, spec, mesh=self.mesh).global_tensor

    def _leave(self, tensor: torch.Tensor, spec: tuple, full_shape) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        return xs.disable_manual_sharding(tensor, spec, torch.Size(full_shape), mesh=self.mesh).global_tensor


class _ExpertRegion(torch.autograd.Function):
    """The region as one differentiable op: inputs received [DF, P, P, R, H], expert_of_slot,
    the experts' weights; output [DF, P, P, R, H]."""

    @staticmethod
    def forward(ctx, owner: DroplessExperts, experts, received, expert_of_slot, *weights):
        ctx.owner, ctx.experts = owner, experts
        ctx.save_for_backward(received, expert_of_slot, *weights)
        return owner.region_forward(experts, received, expert_of_slot, *weights)

    @staticmethod
    def backward(ctx, grad):
        received, expert_of_slot, *weights = ctx.saved_tensors
        d_received, d_weights = ctx.owner.region_backward(ctx.experts, grad, received, expert_of_slot, *weights)
        return None, None, d_received, None, *d_weights


def expert_weights(experts: torch.nn.Module) -> list[torch.Tensor]:
    """[up (gate_up or up), down] and, with biases, [up bias, down bias]."""
    up, up_bias = moe.up_weights(experts)
    return [up, experts.down_proj] + ([up_bias, experts.down_proj_bias] if experts.has_bias else [])


def _weight_spec(weight: torch.Tensor) -> tuple:
    return ("expert", *([None] * (weight.dim() - 1)))
