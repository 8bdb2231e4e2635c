"""The one shape set of the tests that do not care about shapes, and the tiny run they share.

The tiny Mixtral (fp32) on the 8 virtual devices, 8 sequences of 64 tokens a step, 10 eval
documents. XLA's CPU client cannot load compiled programs back, so what tests share is the
in-process cache: runs of this shape in one process compile their train and eval graphs once.
The tests that use it are kept on one pytest worker (conftest.py, `xdist_group`).
"""

from __future__ import annotations

import json
from pathlib import Path

from clm import runtime
from clm.config import load_config

SHAPES = ["max_length=64", "per_device_train_batch_size=1", "global_train_batch_size=8", "global_eval_batch_size=8",
          "n_eval_examples=10"]
# The shared run: 10 steps, a checkpoint every 2, evals at 0, 4, 8 and (max_steps is not a multiple
# of eval_frequency) 10, step 3 under the profiler.
TINY_RUN = [*SHAPES, "max_steps=10", "checkpoint_every=2", "eval_frequency=4", "xla_profile_step=3"]
# The xdist group of the tests that run it in-process (their module marks itself with it).
GROUP = "tiny_run"


def config(output_dir, *overrides):
    """A run of the shared shapes under output_dir."""
    return load_config([f"output_dir={output_dir}", *SHAPES, *overrides], num_devices=runtime.device_count())


def tiny_run_config(output_dir, *overrides):
    """The shared run's configuration under output_dir, with overrides."""
    return config(output_dir, *TINY_RUN[len(SHAPES):], *overrides)


def rows(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]
