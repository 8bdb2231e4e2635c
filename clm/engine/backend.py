"""Which engine runs a job: the `backend` knob, and what `auto` picks on the hardware present.

Plain facts only (no torch_xla import unless on a TPU host): the config resolves the knob
when it loads (clm.config.load_config), so a run's config.yaml and its checkpoints name the
engine that ran; a checkpoint resumes on either engine (`backend` may change on resume).
"""

from __future__ import annotations

import importlib.util

from clm import tpu

XLA, DTENSOR = "xla", "dtensor"
BACKENDS = ("auto", XLA, DTENSOR)


def resolve(backend: str) -> str:
    """`xla` or `dtensor`: the knob itself unless it is `auto`, which picks
    TPU: xla where torch_xla imports, else dtensor (TorchTPU); CUDA: dtensor;
    CPU: xla where torch_xla is installed (its CPU backend with virtual devices), else dtensor."""
    if backend != "auto":
        return backend
    if tpu.chips_attached():
        return XLA if _torch_xla_imports() else DTENSOR
    import torch

    if torch.cuda.is_available():
        return DTENSOR
    return XLA if importlib.util.find_spec("torch_xla") is not None else DTENSOR


def _torch_xla_imports() -> bool:
    # torch_xla 2.9 is built for torch 2.9: beside a newer torch (TorchTPU's) it fails to load.
    try:
        import torch_xla  # noqa: F401
    except (ImportError, OSError):
        return False
    return True
