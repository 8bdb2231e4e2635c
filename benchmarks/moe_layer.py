"""Forward+backward of one Mixtral MoE block on XLA's CPU backend (4 virtual devices, SPMD).

Contenders, all with the same weights, the same data-parallel sharding (sequences sharded
over the 4 devices, weights replicated) and fresh random inputs every step, so the routing
changes every step as in training:
- clm: clm.model.moe at capacity factor 1.25;
- batched_mm: HF's `batched_mm` experts (gathers one weight matrix per assignment);
- eager: HF's stock experts (data-dependent shapes: recompiles and syncs every step);
- ideal: clm's expert computation (`moe.expert_mlp`) on perfectly balanced inputs,
  [E, tokens*K/E, H] split into one group per sequence, with no router and no dispatch.

Size: Mixtral's proportions (I/H = 3.5, E=8, K=2) with H=256 and the largest token count
at which batched_mm, whose memory grows as tokens*K*3*I*H, leaves headroom in 24 GB: peak
resident memory of the run is about 13 GB at 4x512 tokens and 18.5 GB at the default 4x768.

Usage: python benchmarks/moe_layer.py [--hidden 256] [--batch 4] [--seq 768] [--steps 20] [--slow-steps 3]
"""

import os

# Must be set before torch_xla initialises its runtime.
os.environ["PJRT_DEVICE"] = "CPU"
os.environ["CPU_NUM_DEVICES"] = "4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence XLA's per-compile GSPMD deprecation notice

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
import torch_xla.distributed.spmd as xs  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402

# Run as a script from a checkout: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clm.model import moe  # noqa: E402

NUM_EXPERTS, TOP_K, CAPACITY_FACTOR = 8, 2, 1.25


def sample_count(metric: str) -> int:
    data = met.metric_data(metric)
    return 0 if data is None else data[0]


WARMUP_STEPS = 2


def fresh_inputs(count: int, shape: tuple, spec: tuple, mesh, device) -> list[torch.Tensor]:
    """`count` different random inputs, sharded and materialised before any timing.

    Each step gets its own, so the routing changes every step; drawing them inside the step
    would time XLA's CPU random number generator, not the MoE.
    """
    inputs = []
    for _ in range(count):
        tensor = torch.randn(shape, device=device)
        xs.mark_sharding(tensor, mesh, spec)
        inputs.append(tensor)
    torch_xla.sync()
    xm.wait_device_ops()
    return inputs


class Contender:
    """A step function, its inputs, and what its timed steps measured."""

    def __init__(self, name: str, step_fn, inputs: list[torch.Tensor]):
        self.name, self.step_fn, self.inputs = name, step_fn, inputs
        self.steps = len(inputs) - WARMUP_STEPS
        self.times, self.compiles, self.transfers = [], 0, 0

    def warm_up(self) -> None:
        for _ in range(WARMUP_STEPS):
            self.step_fn(self.inputs.pop())
            xm.wait_device_ops()

    def timed_step(self) -> None:
        compiles, transfers = sample_count("CompileTime"), sample_count("TransferFromDeviceTime")
        start = time.perf_counter()
        self.step_fn(self.inputs.pop())
        xm.wait_device_ops()
        self.times.append(time.perf_counter() - start)
        self.compiles += sample_count("CompileTime") - compiles
        self.transfers += sample_count("TransferFromDeviceTime") - transfers

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def make_block(config: MixtralConfig, implementation: str, state: dict, device) -> MixtralSparseMoeBlock:
    config = MixtralConfig(**config.to_dict())
    if implementation == "clm":
        moe.configure(config, CAPACITY_FACTOR)
    else:
        config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    block.load_state_dict(state)
    block = block.to(device)
    if implementation == "clm":
        moe.attach(block)
    return block


def block_step(block):
    def step(hidden):
        block(hidden).float().square().mean().backward()
        # Sync while the gradients are alive: a lazy tensor nobody holds is never computed.
        torch_xla.sync()
        block.zero_grad(set_to_none=True)

    return step


def ideal_step(experts):
    def step(tokens):
        moe.expert_mlp(experts, tokens).float().square().mean().backward()
        torch_xla.sync()
        experts.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences; a multiple of 4")
    parser.add_argument("--seq", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of clm and the ideal")
    parser.add_argument("--slow-steps", type=int, default=3, help="timed steps of batched_mm and eager")
    args = parser.parse_args()
    if args.batch % 4 or args.seq * TOP_K % NUM_EXPERTS:
        parser.error("--batch must be a multiple of 4 (one shard per device) and --seq of 4 (E/K)")

    xr.use_spmd()
    mesh = xs.Mesh(np.arange(xr.global_runtime_device_count()), (xr.global_runtime_device_count(),), ("data",))
    device = torch_xla.device()
    torch.manual_seed(0)

    config = MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 7 // 2,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    reference = MixtralSparseMoeBlock(config)
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, std=config.initializer_range)
    state = reference.state_dict()

    shape = (args.batch, args.seq, args.hidden)
    print(
        f"MoE block: H={args.hidden} I={config.intermediate_size} E={NUM_EXPERTS} K={TOP_K} "
        f"cf={CAPACITY_FACTOR}, {args.batch} sequences x {args.seq} tokens, "
        f"{xr.global_runtime_device_count()} XLA CPU devices, data parallel"
    )
    contenders = []
    for name, steps in (("clm", args.steps), ("batched_mm", args.slow_steps), ("eager", args.slow_steps)):
        inputs = fresh_inputs(WARMUP_STEPS + steps, shape, ("data", None, None), mesh, device)
        contenders.append(Contender(name, block_step(make_block(config, name, state, device)), inputs))
    # The ideal's [E, tokens*K/E, H] rows, split into one group per sequence so that they
    # shard over the devices exactly like the sequences and go through clm's expert_mlp.
    ideal_shape = (args.batch, NUM_EXPERTS, args.seq * TOP_K // NUM_EXPERTS, args.hidden)
    inputs = fresh_inputs(WARMUP_STEPS + args.steps, ideal_shape, ("data", None, None, None), mesh, device)
    contenders.append(Contender("ideal", ideal_step(make_block(config, "clm", state, device).experts), inputs))
    ours, batched_mm, eager, ideal = contenders
    # clm and the ideal alternate step by step, so that load from other processes on the
    # machine hits both alike; the slow contenders run afterwards, as their aftermath
    # (gigabytes freed, recompilations) would slow down whatever step follows them.
    for contender in (ours, ideal):
        contender.warm_up()
    for _ in range(args.steps):
        ours.timed_step()
        ideal.timed_step()
    for contender in (batched_mm, eager):
        contender.warm_up()
        for _ in range(contender.steps):
            contender.timed_step()

    print(
        f"\n{'contender':<12}{'median s/step':>15}{'steps':>7}{'compiles after warm-up':>24}"
        f"{'d2h transfers/step':>20}"
    )
    for contender in contenders:
        print(
            f"{contender.name:<12}{contender.median_s:>15.4f}{contender.steps:>7}{contender.compiles:>24}"
            f"{contender.transfers / contender.steps:>20.1f}"
        )
    print(
        f"moe_layer: speedup_vs_batched_mm={batched_mm.median_s / ours.median_s:.2f} "
        f"speedup_vs_eager={eager.median_s / ours.median_s:.2f} "
        f"ratio_to_ideal={ours.median_s / ideal.median_s:.2f} "
        f"compiles_after_warmup={ours.compiles} transfers_per_step={ours.transfers / ours.steps:g}"
    )


if __name__ == "__main__":
    main()
