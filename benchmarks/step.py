"""Training throughput of a preset through clm's own trainer: tokens/s and MFU on the current
backend (`backend=auto|xla|dtensor`) and device.

    python benchmarks/step.py [--preset default|EXPERIMENT] [--layers N] [--steps 8]
                              [--batch-per-device 1] [OVERRIDES ...]
    torchrun --nproc-per-node 8 benchmarks/step.py --preset gpt_oss_20b --layers 4 ...   # DTensor, one process per GPU

The run is the one `run_clm.py` builds from the same overrides (clm.train.build_trainer: the
engine, the sharded model, optimizer, schedule, data stream and run log), driven by the
trainer's own step (Trainer.train_step) without evals or checkpoints, in a temporary
output_dir. Its time is the run log's: the mean step time past the run log's warm-up steps
(clm.observe.run_log.WARMUP_STEPS: compilation, the first optimizer state), a step ending when
its logged values reach the host. MFU is the run log's too: MaxText's training FLOPs per token
(clm.model.family) over the devices' dense bf16 peak (clm.tpu, clm.gpu); a CPU has no peak
there, so its MFU is n/a.

Presets: `default` is the default job (the tiny Mixtral on the bundled text sample); any other
is an experiment of clm/conf/experiment (`+experiment=NAME`). A preset on pre-tokenized
(Megatron) data, such as gpt_oss_20b, reads random token ids written into the temporary
directory. `--layers N` keeps the first N decoder layers of the preset's model: its layer
shapes, fewer layers. Every preset runs --batch-per-device sequences per device and step,
without gradient accumulation. Overrides are run_clm.py's and come last.
Last line: `step: tokens_per_s=... mfu=... ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

# Run as a script from a checkout: make the repository importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clm.cli import run_command  # noqa: E402
from clm.errors import UserError  # noqa: E402

DEFAULT = "default"


def write_tokens(prefix: str, vocab_size: int, num_tokens: int) -> None:
    """A Megatron indexed dataset (.bin/.idx, version 1, int32 ids) of random ids in documents of
    1024 tokens; the same in every process (seeded)."""
    from clm.data.megatron import DTYPE_CODES, INDEX_HEADER, INDEX_VERSION

    document = 1024
    count = -(-num_tokens // document)
    ids = np.random.default_rng(0).integers(0, vocab_size, size=count * document, dtype=np.int32)
    Path(prefix + ".bin").write_bytes(ids.tobytes())
    code = next(code for code, dtype in DTYPE_CODES.items() if dtype is np.int32)
    with open(prefix + ".idx", "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<QBQQ", INDEX_VERSION, code, count, count + 1))
        f.write(np.full(count, document, np.int32).tobytes())
        f.write((np.arange(count, dtype=np.int64) * document * 4).tobytes())
        f.write(np.arange(count + 1, dtype=np.int64).tobytes())


def fewer_layers(config_path: str, layers: int, directory: str) -> str:
    """A copy of a model JSON with its first `layers` decoder layers (per-layer lists cut to match)."""
    from clm.model.config import resolve_config_path

    fields = json.loads(resolve_config_path(config_path).read_text())
    total = fields["num_hidden_layers"]
    if not 1 <= layers <= total:
        raise UserError(f"--layers {layers}: the preset's model has {total} layers; give 1 to {total}")
    fields = {key: value[:layers] if isinstance(value, list) and len(value) == total else value
              for key, value in fields.items()}
    fields["num_hidden_layers"] = layers
    path = os.path.join(directory, "config.json")
    Path(path).write_text(json.dumps(fields))
    return path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=DEFAULT, help="default (the default job) or an experiment's name")
    parser.add_argument("--layers", type=int, default=None, help="the first N decoder layers of the preset's model")
    parser.add_argument("--steps", type=int, default=8, help="timed steps, after the run log's warm-up steps")
    parser.add_argument("--batch-per-device", type=int, default=1, help="sequences per device and step")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.batch_per_device < 1:
        raise UserError(f"--steps {args.steps} --batch-per-device {args.batch_per_device}: both at least 1")

    from clm import metrics
    from clm.config import load_config
    from clm.data import is_pretokenized
    from clm.engine import device_count
    from clm.observe import console
    from clm.observe.run_log import WARMUP_STEPS
    from clm.train import build_trainer

    with tempfile.TemporaryDirectory(prefix="clm-step-") as tmp:
        knobs = [] if args.preset == DEFAULT else [f"+experiment={args.preset}"]
        knobs += [f"output_dir={tmp}", "exp_name=step", "resume=never", "wandb.mode=disabled", "log_frequency=1",
                  "do_first_eval=false", f"max_steps={WARMUP_STEPS + args.steps}", "gradient_accumulation_steps=1",
                  f"per_device_train_batch_size={args.batch_per_device}"]
        cfg = load_config(knobs + overrides, num_devices=device_count)
        knobs.append(f"global_train_batch_size={args.batch_per_device * device_count(cfg.backend)}")
        if args.layers is not None:
            knobs.append(f"model.config_path={fewer_layers(cfg.model.config_path, args.layers, tmp)}")
        if is_pretokenized(cfg.dataset):
            prefix = os.path.join(tmp, "tokens")
            write_tokens(prefix, cfg.dataset.vocab_size, 2 * cfg.global_train_batch_size * (cfg.max_length + 1))
            knobs += [f"dataset.train_dataset_path={prefix}", f"dataset.eval_dataset_path={prefix}"]
        cfg = load_config(knobs + overrides, num_devices=device_count)

        trainer = build_trainer(cfg)
        try:
            trainer.start()
            for _ in range(cfg.max_steps):
                trainer.train_step()
            trainer.log.flush()  # every step's row, hence its time
        finally:
            trainer.close()
            trainer.checkpointer.close()

    plan, engine, summary = trainer.model_plan, trainer.engine, trainer.log.summary
    devices, kind = plan.mesh_shape.num_devices, engine.device_kind()
    step_time = summary.mean_step_time
    tokens_per_s = summary.tokens_per_step / step_time
    mfu = metrics.mfu(plan.flops_per_token, tokens_per_s, devices, kind)
    peak = metrics.peak_bf16_tflops(kind)
    if not console.reports():
        return
    config = plan.hf_config
    print(f"{args.preset}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{plan.num_params / 1e9:.3g}B parameters, {plan.flops_per_token / 1e9:.3g} GFLOPs per token; "
          f"{cfg.global_train_batch_size} x {cfg.max_length} tokens a step on {devices} {kind} device(s), "
          f"backend={cfg.backend}, dtype={cfg.model.dtype}")
    if peak is None:
        print(f"MFU: n/a, no peak FLOP/s is known for {kind} (clm/tpu.py and clm/gpu.py list the accelerators)")
    print(f"step: tokens_per_s={tokens_per_s:.1f} tokens_per_s_per_device={tokens_per_s / devices:.1f} "
          f"mfu={'n/a' if mfu is None else f'{mfu:.4f}'} step_time_s={step_time:.4f} timed_steps={args.steps} "
          f"warmup_steps={WARMUP_STEPS} peak_tflops={'n/a' if peak is None else f'{peak:g}'} "
          f"backend={cfg.backend} device={kind} devices={devices} preset={args.preset} "
          f"layers={config.num_hidden_layers}", flush=True)


if __name__ == "__main__":
    sys.exit(run_command(lambda: main(sys.argv[1:])))
