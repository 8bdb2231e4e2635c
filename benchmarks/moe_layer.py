"""Forward+backward of one MoE block of a family on XLA's CPU backend (4 virtual devices, SPMD).

The block is the first MoE layer of a one-layer model of the family built by clm
(`build_sharded_model`) on a data-parallel mesh (num_slices=4: sequences split over the 4
devices, weights replicated). Contenders, all with the same weights, the same sharding and
fresh random inputs every step, so the routing changes every step as in training:
- clm: the block with clm's capacity experts at capacity factor 1.25;
- batched_mm: the same block class with HF's `batched_mm` experts (gathers one weight matrix
  per assignment);
- eager: HF's stock experts (data-dependent shapes: recompiles and syncs every step);
- ideal: clm's expert computation (`moe.expert_mlp`) on perfectly balanced inputs,
  [E, tokens*K/E, H] split into one group per sequence, with no router and no dispatch
  (plus the family's shared experts on the tokens, where it has them: DeepSeek-V3).

Size: Mixtral's proportions (I/H = 3.5, E=8, K=2) with H=256 for every family, each with its
own router and expert layout (Qwen3-MoE: renormalised softmax top-k; gpt-oss: router bias,
transposed biased experts, clamped SwiGLU; DeepSeek-V3: sigmoid group-limited top-k, a shared
expert). batched_mm's memory grows as tokens*K*3*I*H: peak resident memory is about 13 GB at
4x512 tokens and 18.5 GB at 4x768; `--seq 256` stays near 6 GB.

Usage: python benchmarks/moe_layer.py [--family mixtral|qwen3_moe|gpt_oss|deepseek_v3]
       [--hidden 256] [--batch 4] [--seq 768] [--steps 20] [--slow-steps 3]
"""

import os

# Must be set before torch_xla initialises its runtime.
os.environ["PJRT_DEVICE"] = "CPU"
os.environ["CPU_NUM_DEVICES"] = "4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence XLA's per-compile GSPMD deprecation notice

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
import torch_xla.distributed.spmd as xs  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402

# Run as a script from a checkout: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clm import parallel, runtime  # noqa: E402
from clm.config import load_config  # noqa: E402
from clm.model import moe  # noqa: E402
from clm.model.build import build_sharded_model  # noqa: E402
from clm.model.plan import ModelPlan  # noqa: E402

NUM_EXPERTS, TOP_K, CAPACITY_FACTOR = 8, 2, 1.25
WARMUP_STEPS = 2
DEVICES = 4


def family_fields(family: str, hidden: int) -> dict:
    """config.json of a one-layer model of `family` whose MoE block has the benchmark's size."""
    intermediate = hidden * 7 // 2
    common = dict(model_type=family, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024, num_experts_per_tok=TOP_K, max_position_embeddings=4096)
    return common | {
        "mixtral": dict(num_local_experts=NUM_EXPERTS, intermediate_size=intermediate),
        "qwen3_moe": dict(num_experts=NUM_EXPERTS, moe_intermediate_size=intermediate, norm_topk_prob=True,
                          head_dim=hidden // 4),
        "gpt_oss": dict(num_local_experts=NUM_EXPERTS, intermediate_size=intermediate, head_dim=hidden // 4,
                        layer_types=["full_attention"]),
        "deepseek_v3": dict(n_routed_experts=NUM_EXPERTS, moe_intermediate_size=intermediate, first_k_dense_replace=0,
                            n_group=4, topk_group=2, n_shared_experts=1, q_lora_rank=64, kv_lora_rank=32,
                            qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, head_dim=16),
    }[family]


def sample_count(metric: str) -> int:
    data = met.metric_data(metric)
    return 0 if data is None else data[0]


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


def block_output(block, hidden):
    output = block(hidden)
    return output[0] if isinstance(output, tuple) else output  # gpt-oss also returns its router scores


def block_step(block):
    def step(hidden):
        block_output(block, hidden).float().square().mean().backward()
        # Sync while the gradients are alive: a lazy tensor nobody holds is never computed.
        torch_xla.sync()
        block.zero_grad(set_to_none=True)

    return step


def ideal_step(block, shared_tokens):
    shared = getattr(block, "shared_experts", None)

    def step(tokens):
        loss = moe.expert_mlp(block.experts, tokens).float().square().mean()
        if shared is not None:
            loss = loss + shared(shared_tokens).float().square().mean()
        loss.backward()
        torch_xla.sync()
        block.zero_grad(set_to_none=True)

    return step


def stock_block(clm_block, config, implementation: str, device):
    """The same block class with one of transformers' experts implementations and the same weights."""
    config = type(config).from_dict(config.to_dict())
    config._experts_implementation = implementation
    block = type(clm_block)(config)
    block.load_state_dict({name: tensor.cpu() for name, tensor in clm_block.state_dict().items()})
    return block.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="mixtral", choices=["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences; a multiple of 4")
    parser.add_argument("--seq", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of clm and the ideal")
    parser.add_argument("--slow-steps", type=int, default=3, help="timed steps of batched_mm and eager")
    args = parser.parse_args()
    if args.batch % DEVICES or args.seq * TOP_K % NUM_EXPERTS:
        parser.error("--batch must be a multiple of 4 (one shard per device) and --seq of 4 (E/K)")

    runtime.setup(None, False)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(family_fields(args.family, args.hidden)))
        cfg = load_config([f"model.config_path={tmp}/config.json", f"max_length={args.seq}", f"num_slices={DEVICES}",
                           f"model.capacity_factor={CAPACITY_FACTOR}", f"global_train_batch_size={args.batch}",
                           f"global_eval_batch_size={args.batch}"], num_devices=DEVICES)
        # num_slices=4: the batch over the dcn axis, every weight replicated (the rules split
        # only fsdp, expert and tensor, all of size 1 here).
        model = build_sharded_model(ModelPlan.from_config(cfg, parallel.mesh_shape(DEVICES, 1, 1, DEVICES)))
    block = model.module.get_submodule(model.routing.layers[0].name)
    device, mesh = torch_xla.device(), model.mesh
    config = model.config

    shape = (args.batch, args.seq, args.hidden)
    spec = (parallel.DATA_AXES, None, None)
    print(
        f"MoE block ({args.family}, {type(block).__name__}): H={args.hidden} I={args.hidden * 7 // 2} E={NUM_EXPERTS} "
        f"K={TOP_K} cf={CAPACITY_FACTOR}, {args.batch} sequences x {args.seq} tokens, "
        f"{xr.global_runtime_device_count()} XLA CPU devices, data parallel"
    )
    contenders = []
    for name, steps in (("clm", args.steps), ("batched_mm", args.slow_steps), ("eager", args.slow_steps)):
        inputs = fresh_inputs(WARMUP_STEPS + steps, shape, spec, mesh, device)
        contender_block = block if name == "clm" else stock_block(block, config, name, device)
        contenders.append(Contender(name, block_step(contender_block), inputs))
    # The ideal's [E, tokens*K/E, H] rows, split into one group per sequence so that they
    # shard over the devices exactly like the sequences and go through clm's expert_mlp.
    ideal_shape = (args.batch, NUM_EXPERTS, args.seq * TOP_K // NUM_EXPERTS, args.hidden)
    inputs = fresh_inputs(WARMUP_STEPS + args.steps, ideal_shape, (parallel.DATA_AXES, None, None, None), mesh, device)
    shared_tokens = fresh_inputs(1, shape, spec, mesh, device)[0]
    contenders.append(Contender("ideal", ideal_step(block, shared_tokens), inputs))
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
        f"compiles_after_warmup={ours.compiles} transfers_per_step={ours.transfers / ours.steps:g} family={args.family}"
    )


if __name__ == "__main__":
    main()
