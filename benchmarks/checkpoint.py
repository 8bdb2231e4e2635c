"""Checkpoint speed: save, restore, size, and the training time a save blocks, sync vs async.

    python benchmarks/checkpoint.py

For the default (tiny) Mixtral and a wider one that fits a 24 GB CPU box, on XLA's CPU
backend with 4 virtual devices: train 2 steps, then
- blocking_s_sync: how long `checkpointer.save` holds the loop with async_checkpoint=false
  (the whole save), and blocking_s_async the same with async_checkpoint=true (the copy of
  the shards to host memory; the write goes on in the background);
- save_s: the whole save, start to commit marker (async: until the background write is done);
- restore_s: building nothing, loading the checkpoint into the built, primed trainer;
- size_mb: the checkpoint on disk (model, AdamW state, host state).
The last line is the wider model's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clm import runtime  # noqa: E402
from clm.config import load_config  # noqa: E402
from clm.engine.xla import XlaEngine  # noqa: E402
from clm.model.config import CONFIGS_DIR  # noqa: E402
from clm.model.plan import ModelPlan  # noqa: E402
from clm.parallel import mesh_shape  # noqa: E402
from clm.train import Trainer  # noqa: E402

QUICK = ["max_length=128", "per_device_train_batch_size=1", "n_eval_examples=10", "wandb.mode=disabled",
         "log_frequency=100"]


def trainer_for(output_dir: str, model_json: str, *overrides: str, resume_from: str | None = None) -> Trainer:
    cfg = load_config([f"output_dir={output_dir}", f"model.config_path={model_json}", *QUICK, *overrides],
                      num_devices=runtime.device_count())
    trainer = Trainer(ModelPlan.from_config(cfg, mesh_shape(runtime.device_count(), 1, 1, 1)), XlaEngine(), resume_from)
    return trainer


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def measure(name: str, model_json: str, work: Path) -> dict:
    results = {}
    for mode in ("sync", "async"):
        output = work / f"{name}-{mode}"
        trainer = trainer_for(str(output), model_json, f"async_checkpoint={mode == 'async'}")
        trainer.start()
        for _ in range(2):
            trainer.train_step()
        started = time.perf_counter()
        trainer.checkpointer.save(2)
        results[f"blocking_s_{mode}"] = time.perf_counter() - started
        trainer.checkpointer.close()
        results[f"save_s_{mode}"] = time.perf_counter() - started
        trainer.train_batches.close()
    step_dir = work / f"{name}-sync" / "moe_trial" / "checkpoints" / "2"
    restored = trainer_for(str(work / f"{name}-sync"), model_json, resume_from=str(step_dir))
    started = time.perf_counter()
    restored.restore()
    results["restore_s"] = time.perf_counter() - started
    restored.train_batches.close()
    results["size_mb"] = directory_mb(step_dir)
    results["params_m"] = sum(p.numel() for p in restored.model.parameters()) / 1e6
    return results


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="clm-checkpoint-bench-"))
    wide = json.loads((CONFIGS_DIR / "mixtral_tiny.json").read_text())
    wide.update(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=4)
    (work / "wide.json").write_text(json.dumps(wide))
    try:
        lines = []
        for name, model_json in (("mixtral_tiny", "mixtral_tiny.json"), ("wide", str(work / "wide.json"))):
            r = measure(name, model_json, work)
            lines.append(
                f"save_s={r['save_s_sync']:.2f} restore_s={r['restore_s']:.2f} size_mb={r['size_mb']:.0f} "
                f"blocking_s_sync={r['blocking_s_sync']:.2f} blocking_s_async={r['blocking_s_async']:.2f} "
                f"save_s_async={r['save_s_async']:.2f} params_m={r['params_m']:.0f} model={name}")
        print(f"checkpoint[mixtral_tiny]: {lines[0]}")
        print(f"checkpoint: {lines[1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
