"""The XLA runtime: which device, how many, SPMD mode, compile cache, matmul precision.

Split in two because the config needs the device count (the reference's
`get_global_batch_size`) while the compile cache needs the config.
"""

from __future__ import annotations

import os

DEFAULT_CPU_DEVICES = "4"


def device_count() -> int:
    """Pick the PJRT device (TPU when present, else CPU with virtual devices) and count them.

    `PJRT_DEVICE` overrides the choice, `CPU_NUM_DEVICES` the number of virtual CPU devices.
    """
    # Python scalars such as the learning rate would otherwise be baked into the graph as
    # constants when they happen to be 0 or 1, and a new value would then recompile.
    os.environ.setdefault("XLA_NO_SPECIAL_SCALARS", "1")
    import torch_xla  # noqa: F401  (importing selects TPU if libtpu and a chip are present, else CPU)
    import torch_xla.runtime as xr

    if xr.device_type() == "CPU":
        os.environ.setdefault("CPU_NUM_DEVICES", DEFAULT_CPU_DEVICES)
    return xr.global_runtime_device_count()


def setup(compile_cache_dir: str | None, full_precision: bool) -> None:
    """Everything that must happen before the first XLA computation."""
    import torch_xla
    import torch_xla.runtime as xr

    # XLA's CPU client writes executables but cannot load them back, so there the cache
    # would only cost disk and warnings.
    usable = xr.device_type() != "CPU"
    if compile_cache_dir and usable and not torch_xla._XLAC._xla_computation_cache_is_initialized():
        os.makedirs(compile_cache_dir, exist_ok=True)
        # Only one process per slice writes, as torch_xla recommends for shared caches.
        xr.initialize_cache(compile_cache_dir, readonly=xr.process_index() != 0)
    if not xr.is_spmd():
        xr.use_spmd()
    if full_precision:
        import torch_xla.backends

        torch_xla.backends.set_mat_mul_precision("highest")


def device_type() -> str:
    """The PJRT device type: 'TPU', 'CPU', ..."""
    import torch_xla.runtime as xr

    return xr.device_type()


def device_kind() -> str:
    """'v4', 'v5e', 'v5p', 'v6e' on TPU (from the accelerator type, e.g. v5p-256); else the PJRT type."""
    import torch_xla.runtime as xr

    if xr.device_type() != "TPU":
        return xr.device_type()
    from torch_xla._internal import tpu

    kind = tpu.get_tpu_type()
    return {"v5litepod": "v5e", "v6litepod": "v6e"}.get(kind, kind)


def on_tpu(tensor) -> bool:
    """Whether `tensor` lives on a TPU, where the Pallas kernels run."""
    if tensor.device.type != "xla":
        return False
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU"
