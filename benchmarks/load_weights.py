"""Load throughput and host memory of a pretrained start, on a generated hub-layout Mixtral.

    python benchmarks/load_weights.py [--gb 2.5] [--dir /tmp/clm-load-bench] [--keep]

Writes a random Mixtral in the hub's layout (bf16, per-expert w1/w2/w3, several safetensors
files with an index) of about --gb GB, then builds the model through
`clm.model.build.build_sharded_model` with model.name_or_path pointing at it, on the default virtual
CPU devices, and measures the load. XLA's CPU backend keeps the devices' buffers in host
memory, so peak_host_gb includes the loaded model itself; peak_over_largest_tensor is what
the load needs beyond that, in units of the largest parameter as placed (a fused expert
tensor). init_parameters and compiles show that a pretrained start does no random init and
compiles nothing. Last line: `load_weights: key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def fields_for(gb: float) -> dict:
    """mixtral_tiny's shape family, wide enough that 4 layers are about `gb` GB in bf16."""
    base = json.loads((REPO / "clm/model/configs/mixtral_tiny.json").read_text())
    H, L, E, V = 2048, 4, 8, 32000
    # bytes = 2 * (2*V*H + L*(E*3*H*I + attention))
    attention = 2 * H * H + 2 * H * 512
    intermediate = int((gb * 1e9 / 2 - 2 * V * H) / L - attention) // (E * 3 * H)
    return base | {"hidden_size": H, "num_hidden_layers": L, "intermediate_size": intermediate // 128 * 128,
                   "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 4096}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.5)
    parser.add_argument("--dir", default="/tmp/clm-load-bench")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = parser.parse_args()

    import torch

    from hub_layout import write_hub_checkpoint

    hub = Path(args.dir)
    if not (hub / "model.safetensors.index.json").is_file():
        print(f"writing a {args.gb} GB hub-layout Mixtral to {hub}", flush=True)
        write_hub_checkpoint(hub, fields_for(args.gb), num_files=args.files, dtype=torch.bfloat16, tokenizer=False)
    try:
        run(hub)
    finally:
        if not args.keep:
            shutil.rmtree(hub, ignore_errors=True)


def run(hub: Path) -> None:
    import torch_xla.debug.metrics as met

    from clm import parallel, runtime
    from clm.config import load_config
    from clm.model import init
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan

    cfg = load_config([f"model.name_or_path={hub}", "model.dtype=bfloat16", "backend=xla"],
                      num_devices=runtime.device_count())
    runtime.setup(None, False)
    shape = parallel.mesh_shape(runtime.device_count(), 1, 1, 1)
    model_plan = ModelPlan.from_config(cfg, shape)  # the checks and the headers' read are not timed
    size = model_plan.checkpoint.size_bytes()

    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    started = time.perf_counter()
    model = build_sharded_model(model_plan)
    load_s = time.perf_counter() - started
    peak = _status("VmHWM") - before
    params = list(model.parameters())
    device_bytes = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() * p.element_size() for p in params)
    compile_time = met.metric_data("CompileTime")
    summary = {
        "gb": size / 1e9,
        "load_s": load_s,
        "gb_per_s": size / 1e9 / load_s,
        "peak_host_gb": peak / 1e9,
        "peak_over_largest_tensor": (peak - device_bytes) / largest,
        "device_gb": device_bytes / 1e9,
        "largest_tensor_gb": largest / 1e9,
        "init_parameters": init.initialized["parameters"],
        "compiles": compile_time[0] if compile_time else 0,
        "devices": shape.num_devices,
    }
    print("load_weights: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    main()
