"""Which engine runs a job: the `backend` knob, and what `auto` picks on the hardware present.

Plain facts only (no torch_xla import unless on a TPU host): the config resolves the knob
when it loads (clm.config.load_config), so a run's config.yaml and its checkpoints name the
engine that ran; a checkpoint resumes on either engine (`backend` may change on resume).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

from clm import tpu
from clm.errors import UserError

XLA, DTENSOR = "xla", "dtensor"
BACKENDS = ("auto", XLA, DTENSOR)


def resolve(backend: str) -> str:
    """`xla` or `dtensor`: the knob itself unless it is `auto` (see `auto`)."""
    if backend != "auto":
        return backend
    chips = tpu.chips_attached()
    if chips:
        return auto(chips, cuda=False)
    import torch

    return auto(0, cuda=torch.cuda.is_available())


def auto(tpu_chips: int, cuda: bool, installed: Callable[[str], bool] | None = None,
         imports: Callable[[str], bool] | None = None) -> str:
    """What `auto` picks, from the host's facts (`installed`/`imports`: whether a package is
    there / loads; this environment's by default):
    TPU: xla where torch_xla loads, else dtensor where TorchTPU (torch_tpu) is installed: torch
    loads it as its `tpu` device (clm.engine.dtensor); neither is one error line.
    CUDA: dtensor. CPU: xla where torch_xla is installed (its CPU backend with virtual devices), else dtensor."""
    installed, imports = installed or is_installed, imports or loads
    if tpu_chips:
        if imports("torch_xla"):
            return XLA
        if installed("torch_tpu"):
            return DTENSOR
        raise UserError(f"backend=auto: this host has {tpu_chips} TPU chips but neither torch_xla nor torch_tpu "
                        "loads; pip install -e '.[tpu]' (backend xla) or -e '.[torchtpu]' (backend dtensor), "
                        "or set backend=dtensor to run on the CPU")
    if cuda:
        return DTENSOR
    return XLA if installed("torch_xla") else DTENSOR


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def loads(name: str) -> bool:
    # torch_xla 2.9 is built for torch 2.9: beside a newer torch (TorchTPU's) it fails to load.
    try:
        importlib.import_module(name)
    except (ImportError, OSError):
        return False
    return True
