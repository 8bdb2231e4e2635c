"""What a run reports: metrics.jsonl and TensorBoard rows, and MFU (from the model's FLOPs per
token, clm.model.family)."""

from __future__ import annotations

import json
import math
import os
import threading

from clm import gpu, tpu


def peak_bf16_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of one chip of `device_kind` (a TPU generation of clm.tpu, a GPU kind
    of clm.gpu); None on hardware without a known peak, such as a CPU."""
    known = tpu.generation(device_kind) or gpu.chip(device_kind)
    return known.peak_bf16_tflops if known else None


def mfu(flops_per_token: float, tokens_per_sec: float, num_chips: int, device_kind: str) -> float | None:
    """Model FLOPs utilization over the chips' peak bf16 FLOP/s; None on hardware without a
    known peak, such as a CPU, rather than a guess."""
    peak = peak_bf16_tflops(device_kind)
    if peak is None:
        return None
    return flops_per_token * tokens_per_sec / (num_chips * peak * 1e12)


class MetricsWriter:
    """One JSON object per logged step in run_dir/metrics.jsonl, mirrored to TensorBoard and
    to W&B (when given a run): the same keys in all three.

    Only process 0 writes. Values must already be host numbers (step closures hand them
    over); rows may come from the logging thread and the main thread, hence the lock.
    Nothing is opened before the first row, so building a writer touches no file.

    Resume: `state_dict()` holds the rows written so far (take it once the step's logging
    closures have run); a writer given `load_state_dict(state)` keeps those rows of
    metrics.jsonl at its first write, drops the rows past the checkpoint from the dead run,
    and goes on; TensorBoard hides the dead run's events past the checkpoint (purge_step).
    """

    def __init__(self, run_dir: str, enabled: bool = True, wandb_run=None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tensorboard_dir = os.path.join(run_dir, "tensorboard")
        self._wandb = wandb_run
        self._file = None
        self._tensorboard = None
        self._rows = 0
        self._last_step = -1
        self._restored: dict | None = None
        self._lock = threading.Lock()

    def state_dict(self) -> dict:
        with self._lock:
            return {"rows": self._rows, "last_step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        self._restored = dict(state)
        self._rows, self._last_step = state["rows"], state["last_step"]

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._restored is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = f.readlines()[: self._restored["rows"]]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)  # a crash here leaves the old or the new file whole
        mode = "a" if self._restored is not None else "w"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, mode, buffering=1)  # line-buffered: a crash keeps every row written
        purge = self._restored["last_step"] + 1 if self._restored is not None else None
        self._tensorboard = SummaryWriter(self._tensorboard_dir, purge_step=purge)

    def write(self, step: int, values: dict[str, float | int | None]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        with self._lock:
            if self._file is None:
                self._open()
            self._file.write(json.dumps(row, allow_nan=True) + "\n")
            self._rows += 1
            self._last_step = max(self._last_step, step)
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
            if self._wandb is not None:
                self._wandb.log(step, values)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._tensorboard.close()
                self._file = None
