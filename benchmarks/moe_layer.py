"""Forward+backward of one MoE block of a family, on the XLA engine (XLA's CPU backend, 4 virtual
devices, SPMD) or the DTensor engine (this process's device: a GPU, or the CPU).

`--backend xla` (the default where torch_xla is installed, as clm's `backend=auto`): the block
is the first MoE layer of a one-layer model of the family built by clm (`build_sharded_model`)
on a data-parallel mesh (num_slices=4: sequences split over the 4 devices, weights replicated).
Contenders, all with the same weights, the same sharding and fresh random inputs every step,
so the routing changes every step as in training:
- clm: the block with clm's capacity experts at the shapes' capacity factor;
- batched_mm: the same block class with HF's `batched_mm` experts (gathers one weight matrix
  per assignment);
- eager: HF's stock experts (data-dependent shapes: recompiles and syncs every step);
- ideal: clm's expert computation (`moe.expert_mlp`) on perfectly balanced inputs,
  [E, tokens*K/E, H] split into one group per sequence, with no router and no dispatch
  (plus the family's shared experts on the tokens, where it has them: DeepSeek-V3).

`--backend dtensor` (one process, on CUDA when there is a GPU): the block of the same model as
the DTensor engine builds it (`DTensorEngine.build_model`: FSDP2 on a mesh of one device, its
decoder layer's weights gathered once, in the compute dtype, as its forward gathers them),
against HF's stock experts, HF's `grouped_mm` where torch has a grouped GEMM for the device,
and the ideal. It also reports the block's tokens/s and, on a GPU of clm/gpu.py, its MFU: the
block's matmul FLOPs (router and K experts, x3 for the backward: clm.model.family) over the
GPU's dense bf16 peak.

Shapes (--shapes): `small`, Mixtral's proportions (I/H = 3.5, E=8, K=2, cf 1.25) with H=256
for every family, 4 sequences of 768; `gpt_oss_20b`, gpt-oss-20b's MoE layer (H=I=2880, E=32,
K=4), dropless, one sequence of 8192 tokens (the MLPerf benchmark's length), bf16: the
default on a GPU. Each family keeps its own router and expert layout (Qwen3-MoE: renormalised
softmax top-k; gpt-oss: router bias, transposed biased experts, clamped SwiGLU; DeepSeek-V3:
sigmoid group-limited top-k, a shared expert). batched_mm's memory grows as tokens*K*3*I*H:
peak resident memory is about 13 GB at 4x512 tokens and 18.5 GB at 4x768; `--seq 256` stays
near 6 GB; it runs on XLA only.

Usage: python benchmarks/moe_layer.py [--backend auto|xla|dtensor] [--shapes small|gpt_oss_20b]
       [--family mixtral|qwen3_moe|gpt_oss|deepseek_v3] [--hidden H] [--batch B] [--seq S]
       [--steps 20] [--slow-steps 3]
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Run as a script from a checkout: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clm import metrics, parallel  # noqa: E402
from clm.config import load_config  # noqa: E402
from clm.engine.backend import BACKENDS, XLA, resolve  # noqa: E402
from clm.model import family, moe  # noqa: E402
from clm.model.plan import ModelPlan  # noqa: E402

WARMUP_STEPS = 2
XLA_DEVICES = 4
FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"]


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    capacity_factor: float  # <= 0: dropless
    batch: int  # sequences
    seq: int
    dtype: str


SHAPES = {
    "small": Shapes(256, 896, 8, 2, 1.25, 4, 768, "float32"),
    "gpt_oss_20b": Shapes(2880, 2880, 32, 4, 0.0, 1, 8192, "bfloat16"),  # its hub config.json's MoE sizes
}


def family_fields(family: str, shapes: Shapes) -> dict:
    """config.json of a one-layer model of `family` whose MoE block has the benchmark's shapes."""
    hidden, intermediate, experts = shapes.hidden, shapes.intermediate, shapes.experts
    common = dict(model_type=family, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024, num_experts_per_tok=shapes.top_k,
                  max_position_embeddings=max(4096, shapes.seq))
    return common | {
        "mixtral": dict(num_local_experts=experts, intermediate_size=intermediate),
        "qwen3_moe": dict(num_experts=experts, moe_intermediate_size=intermediate, norm_topk_prob=True,
                          head_dim=hidden // 4),
        "gpt_oss": dict(num_local_experts=experts, intermediate_size=intermediate, head_dim=hidden // 4,
                        layer_types=["full_attention"]),
        "deepseek_v3": dict(n_routed_experts=experts, moe_intermediate_size=intermediate, first_k_dense_replace=0,
                            n_group=4, topk_group=2, n_shared_experts=1, q_lora_rank=64, kv_lora_rank=32,
                            qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, head_dim=16),
    }[family]


class Xla:
    """Steps on XLA: a step is cut by torch_xla.sync; compilations and device-to-host transfers are counted."""

    def __init__(self):
        # Set before torch_xla initialises its runtime.
        os.environ["PJRT_DEVICE"] = "CPU"
        os.environ["CPU_NUM_DEVICES"] = str(XLA_DEVICES)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence XLA's per-compile GSPMD deprecation notice
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.debug.metrics as met

        self.torch_xla, self.xm, self.met = torch_xla, xm, met

    def cut(self) -> None:
        self.torch_xla.sync()

    def wait(self) -> None:
        self.xm.wait_device_ops()

    def counts(self) -> tuple[int, int]:
        return self._count("CompileTime"), self._count("TransferFromDeviceTime")

    def _count(self, metric: str) -> int:
        data = self.met.metric_data(metric)
        return 0 if data is None else data[0]


class Eager:
    """Steps on an eager device: launched as written; nothing compiles; the host waits for a GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def cut(self) -> None:
        pass

    def wait(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def counts(self) -> tuple[int, int]:
        return 0, 0


class Contender:
    """A step function, its inputs, and what its timed steps measured."""

    def __init__(self, name: str, step_fn, inputs: list[torch.Tensor], steps):
        self.name, self.step_fn, self.inputs, self.run = name, step_fn, inputs, steps
        self.steps = len(inputs) - WARMUP_STEPS
        self.times, self.compiles, self.transfers = [], 0, 0

    def warm_up(self) -> None:
        for _ in range(WARMUP_STEPS):
            self.step_fn(self.inputs.pop())
            self.run.wait()

    def timed_step(self) -> None:
        compiles, transfers = self.run.counts()
        start = time.perf_counter()
        self.step_fn(self.inputs.pop())
        self.run.wait()
        self.times.append(time.perf_counter() - start)
        compiles_after, transfers_after = self.run.counts()
        self.compiles += compiles_after - compiles
        self.transfers += transfers_after - transfers

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def block_output(block, hidden):
    output = block(hidden)
    return output[0] if isinstance(output, tuple) else output  # gpt-oss also returns its router scores


def block_step(block, steps):
    def step(hidden):
        block_output(block, hidden).float().square().mean().backward()
        # Cut while the gradients are alive: on XLA a lazy tensor nobody holds is never computed.
        steps.cut()
        block.zero_grad(set_to_none=True)

    return step


def ideal_step(block, shared_tokens, steps):
    shared = getattr(block, "shared_experts", None)

    def step(tokens):
        loss = moe.expert_mlp(block.experts, tokens).float().square().mean()
        if shared is not None:
            loss = loss + shared(shared_tokens).float().square().mean()
        loss.backward()
        steps.cut()
        block.zero_grad(set_to_none=True)

    return step


def stock_block(clm_block, config, implementation: str, device, dtype):
    """The same block class with one of transformers' experts implementations and the same weights."""
    config = type(config).from_dict(config.to_dict())
    config._experts_implementation = implementation
    block = type(clm_block)(config)
    # Read as attributes, not through state_dict: FSDP's state-dict hook would put the DTensor
    # engine's gathered weights back to their shards.
    source = dict(clm_block.named_parameters()) | dict(clm_block.named_buffers())
    block.load_state_dict({name: source[name].detach().cpu() for name in block.state_dict()})
    return block.to(device, dtype)


def model_config(args, shapes: Shapes, tmp: str, backend: str, devices: int):
    (Path(tmp) / "config.json").write_text(json.dumps(family_fields(args.family, shapes)))
    return load_config([f"model.config_path={tmp}/config.json", f"max_length={shapes.seq}", f"backend={backend}",
                        f"model.capacity_factor={shapes.capacity_factor}", f"model.dtype={shapes.dtype}",
                        f"global_train_batch_size={shapes.batch}", f"global_eval_batch_size={shapes.batch}",
                        *([f"num_slices={devices}"] if devices > 1 else [])], num_devices=devices)


def describe(args, shapes: Shapes, block, where: str) -> None:
    cf = "dropless" if shapes.capacity_factor <= 0 else f"cf={shapes.capacity_factor}"
    print(f"MoE block ({args.family}, {type(block).__name__}): H={shapes.hidden} I={shapes.intermediate} "
          f"E={shapes.experts} K={shapes.top_k} {cf} {shapes.dtype}, {shapes.batch} sequences x {shapes.seq} tokens, "
          f"{where}")


def run_xla(args, shapes: Shapes) -> None:
    steps = Xla()
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    from clm import runtime
    from clm.model.build import build_sharded_model

    def fresh_inputs(count: int, shape: tuple, spec: tuple) -> list[torch.Tensor]:
        """`count` different random inputs, sharded and materialised before any timing.

        Each step gets its own, so the routing changes every step; drawing them inside the step
        would time XLA's CPU random number generator, not the MoE.
        """
        inputs = []
        for _ in range(count):
            tensor = torch.randn(shape, device=device, dtype=dtype)
            xs.mark_sharding(tensor, mesh, spec)
            inputs.append(tensor)
        steps.cut()
        steps.wait()
        return inputs

    if shapes.batch % XLA_DEVICES:
        sys.exit(f"--batch {shapes.batch}: a multiple of {XLA_DEVICES} (one shard per XLA device)")
    runtime.setup(None, False)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = model_config(args, shapes, tmp, XLA, XLA_DEVICES)
        # num_slices=4: the batch over the dcn axis, every weight replicated (the rules split
        # only fsdp, expert and tensor, all of size 1 here).
        model = build_sharded_model(ModelPlan.from_config(cfg, parallel.mesh_shape(XLA_DEVICES, 1, 1, XLA_DEVICES)))
    block = model.module.get_submodule(model.routing.layers[0].name)
    device, mesh, config, dtype = steps.torch_xla.device(), model.mesh, model.config, getattr(torch, shapes.dtype)

    shape = (shapes.batch, shapes.seq, shapes.hidden)
    spec = (parallel.DATA_AXES, None, None)
    describe(args, shapes, block, f"{xr.global_runtime_device_count()} XLA CPU devices, data parallel")
    contenders = []
    for name, count in (("clm", args.steps), ("batched_mm", args.slow_steps), ("eager", args.slow_steps)):
        inputs = fresh_inputs(WARMUP_STEPS + count, shape, spec)
        contender_block = block if name == "clm" else stock_block(block, config, name, device, dtype)
        contenders.append(Contender(name, block_step(contender_block, steps), inputs, steps))
    # The ideal's [E, tokens*K/E, H] rows, split into one group per sequence so that they
    # shard over the devices exactly like the sequences and go through clm's expert_mlp.
    ideal_shape = (shapes.batch, shapes.experts, shapes.seq * shapes.top_k // shapes.experts, shapes.hidden)
    inputs = fresh_inputs(WARMUP_STEPS + args.steps, ideal_shape, (parallel.DATA_AXES, None, None, None))
    shared_tokens = fresh_inputs(1, shape, spec)[0]
    contenders.append(Contender("ideal", ideal_step(block, shared_tokens, steps), inputs, steps))
    ours, batched_mm, eager, ideal = contenders
    # clm and the ideal alternate step by step, so that load from other processes on the
    # machine hits both alike; the slow contenders run afterwards, as their aftermath
    # (gigabytes freed, recompilations) would slow down whatever step follows them.
    race(ours, ideal, args.steps)
    for contender in (batched_mm, eager):
        run_alone(contender)

    table(contenders, xla=True)
    print(
        f"moe_layer: speedup_vs_batched_mm={batched_mm.median_s / ours.median_s:.2f} "
        f"speedup_vs_eager={eager.median_s / ours.median_s:.2f} "
        f"ratio_to_ideal={ours.median_s / ideal.median_s:.2f} "
        f"compiles_after_warmup={ours.compiles} transfers_per_step={ours.transfers / ours.steps:g} family={args.family} "
        f"backend=xla shapes={args.shapes}"
    )


def run_dtensor(args, shapes: Shapes) -> None:
    from clm.engine.dtensor import DTensorEngine

    engine = DTensorEngine()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = model_config(args, shapes, tmp, "dtensor", 1)
        engine.setup(cfg)  # this process's device: the GPU (LOCAL_RANK's) or the CPU; one process
        model = engine.build_model(ModelPlan.from_config(cfg, parallel.mesh_shape(1, 1, 1, 1)))
    name = model.routing.layers[0].name
    block = model.module.get_submodule(name)
    # The block's decoder layer is one FSDP unit, whose forward gathers its weights in the compute
    # dtype: gather them once here, so that the block runs alone on them.
    model.module.get_submodule(name.rpartition(".")[0]).unshard()
    device, config, dtype = engine.device, model.config, getattr(torch, shapes.dtype)
    steps = Eager(device)

    def fresh_inputs(count: int, shape: tuple) -> list[torch.Tensor]:
        return [torch.randn(shape, device=device, dtype=dtype) for _ in range(count)]

    shape = (shapes.batch, shapes.seq, shapes.hidden)
    kind = engine.device_kind()
    describe(args, shapes, block, f"one {kind} device, DTensor engine")
    grouped = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)  # torch's grouped GEMM
    contenders = [Contender("clm", block_step(block, steps), fresh_inputs(WARMUP_STEPS + args.steps, shape), steps)]
    for implementation in ("eager", *(["grouped_mm"] if grouped else [])):
        contenders.append(Contender(implementation, block_step(stock_block(block, config, implementation, device, dtype),
                                                               steps),
                                    fresh_inputs(WARMUP_STEPS + args.slow_steps, shape), steps))
    ideal_shape = (shapes.batch, shapes.experts, shapes.seq * shapes.top_k // shapes.experts, shapes.hidden)
    ideal = Contender("ideal", ideal_step(block, fresh_inputs(1, shape)[0], steps),
                      fresh_inputs(WARMUP_STEPS + args.steps, ideal_shape), steps)
    ours, others = contenders[0], contenders[1:]
    race(ours, ideal, args.steps)
    for contender in others:
        run_alone(contender)
    table([*contenders, ideal], xla=False)

    # The block's training FLOPs per token: 3x the forward's router and K experts (and shared experts).
    flops_per_token = 6 * family.mlp_weights(config, 0)
    tokens = shapes.batch * shapes.seq
    peak = metrics.peak_bf16_tflops(kind)

    def mfu(contender):
        rate = metrics.mfu(flops_per_token, tokens / contender.median_s, 1, kind)
        return "n/a" if rate is None else f"{rate:.3f}"

    if peak is None:
        print(f"MFU: n/a, no peak FLOP/s is known for {kind} (clm/gpu.py lists the GPUs)")
    by_name = {contender.name: contender for contender in contenders}
    grouped_mm = f"{by_name['grouped_mm'].median_s / ours.median_s:.2f}" if "grouped_mm" in by_name else "n/a"
    print(
        f"moe_layer: tokens_per_s={tokens / ours.median_s:.0f} mfu={mfu(ours)} ms_per_step={ours.median_s * 1e3:.2f} "
        f"speedup_vs_eager={by_name['eager'].median_s / ours.median_s:.2f} speedup_vs_grouped_mm={grouped_mm} "
        f"ratio_to_ideal={ours.median_s / ideal.median_s:.2f} ideal_mfu={mfu(ideal)} family={args.family} "
        f"backend=dtensor device={kind} shapes={args.shapes}"
    )


def race(ours: Contender, ideal: Contender, steps: int) -> None:
    """Warm both up, then alternate their timed steps, so that load from other processes on the
    machine hits both alike."""
    for contender in (ours, ideal):
        contender.warm_up()
    for _ in range(steps):
        ours.timed_step()
        ideal.timed_step()


def run_alone(contender: Contender) -> None:
    contender.warm_up()
    for _ in range(contender.steps):
        contender.timed_step()


def table(contenders: list[Contender], xla: bool) -> None:
    print(f"\n{'contender':<12}{'median s/step':>15}{'steps':>7}" +
          (f"{'compiles after warm-up':>24}{'d2h transfers/step':>20}" if xla else ""))
    for contender in contenders:
        print(f"{contender.name:<12}{contender.median_s:>15.4f}{contender.steps:>7}" +
              (f"{contender.compiles:>24}{contender.transfers / contender.steps:>20.1f}" if xla else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="clm's engine: auto as run_clm.py resolves it (xla where torch_xla is installed on a "
                             "CPU host, dtensor on a GPU)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                        help="small (the default on a CPU) or gpt_oss_20b (the default on a GPU)")
    parser.add_argument("--family", default=None, choices=FAMILIES,
                        help="mixtral (the default for small shapes), gpt_oss (for gpt_oss_20b) or another")
    parser.add_argument("--hidden", type=int, help="H, with I = 3.5 H")
    parser.add_argument("--batch", type=int, help="sequences")
    parser.add_argument("--seq", type=int, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of clm and the ideal")
    parser.add_argument("--slow-steps", type=int, default=3, help="timed steps of the stock experts")
    args = parser.parse_args()
    backend = resolve(args.backend)
    if args.shapes is None:
        args.shapes = "gpt_oss_20b" if torch.cuda.is_available() else "small"
    if args.family is None:
        args.family = "gpt_oss" if args.shapes == "gpt_oss_20b" else "mixtral"
    shapes = SHAPES[args.shapes]
    if args.hidden:
        shapes = dataclasses.replace(shapes, hidden=args.hidden, intermediate=args.hidden * 7 // 2)
    shapes = dataclasses.replace(shapes, batch=args.batch or shapes.batch, seq=args.seq or shapes.seq)
    if shapes.seq * shapes.top_k % shapes.experts:
        parser.error(f"--seq {shapes.seq}: a multiple of E/K = {shapes.experts}/{shapes.top_k} (the ideal's balance)")
    (run_xla if backend == XLA else run_dtensor)(args, shapes)


if __name__ == "__main__":
    main()
