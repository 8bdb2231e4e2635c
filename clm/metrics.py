"""What a run reports: metrics.jsonl and TensorBoard rows, FLOPs per token and MFU."""

from __future__ import annotations

import json
import math
import os

from transformers import MixtralConfig

# Peak dense bf16 TFLOP/s per chip (DESIGN.md). Unknown hardware gets no MFU rather than a guess.
PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}


def training_flops_per_token(config: MixtralConfig, seq_len: int) -> float:
    """MaxText's convention: 3x the forward matmul FLOPs, causal attention, top-k experts only."""
    L, H, I = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    E, K, V = config.num_local_experts, config.num_experts_per_tok, config.vocab_size
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or H // Hq
    per_layer = H * E + 3 * K * H * I + H * (Hq * d + 2 * Hkv * d) + Hq * d * H + seq_len * Hq * d
    return 6.0 * (L * per_layer + H * V)


def reference_flops_per_token(config: MixtralConfig, num_params: int) -> float:
    """The MLPerf reference's estimate: 6 x all parameters x K / E (it counts embeddings, skips attention)."""
    return 6.0 * num_params * config.num_experts_per_tok / config.num_local_experts


def mfu(flops_per_token: float, tokens_per_sec: float, num_chips: int, device_kind: str) -> float | None:
    peak = PEAK_TFLOPS.get(device_kind)
    if peak is None:
        return None
    return flops_per_token * tokens_per_sec / (num_chips * peak * 1e12)


class MetricsWriter:
    """One JSON object per logged step in run_dir/metrics.jsonl, mirrored to TensorBoard.

    Only process 0 writes. Values must already be host floats (step closures hand them over).
    Files are opened at the first write, not before: a fresh run starts them anew, a run
    resumed with load_state_dict keeps the rows up to the checkpoint's step and drops what
    the interrupted run wrote after it, so no step is duplicated or missing.
    """

    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(run_dir, "tensorboard")
        self.last_step = 0
        self._resumed_step: int | None = None
        self._file = None
        self._tensorboard = None

    def state_dict(self) -> dict:
        return {"step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = self._resumed_step = state["step"]

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._resumed_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self._resumed_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)  # a crash here keeps the old or the new file whole
        mode = "a" if self._resumed_step is not None else "w"
        self._file = open(self.path, mode, buffering=1)  # line-buffered: a crash keeps every row written
        purge = None if self._resumed_step is None else self._resumed_step + 1
        self._tensorboard = SummaryWriter(self.tensorboard_dir, purge_step=purge)

    def write(self, step: int, values: dict[str, float | int | None]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        self.last_step = step
        row = {"step": step, **values}
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tensorboard.close()
