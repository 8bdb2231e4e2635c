"""The XLA runtime: which device, how many, SPMD mode, compile cache, matmul precision.

Split in two because the config needs the device count (the reference's
`get_global_batch_size`) while the compile cache needs the config.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from clm import tpu

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


def setup(compile_cache_dir: str | None, full_precision: bool, compile_analysis: bool = True) -> None:
    """Everything that must happen before the first XLA computation."""
    if compile_analysis:
        enable_compile_analysis()
    import torch_xla
    import torch_xla.runtime as xr

    # XLA's CPU client writes executables but cannot load them back, so there the cache
    # would only cost disk and warnings.
    usable = xr.device_type() != "CPU"
    if compile_cache_dir and usable and not torch_xla._XLAC._xla_computation_cache_is_initialized():
        os.makedirs(compile_cache_dir, exist_ok=True)
        # One writer, as torch_xla recommends for a cache the hosts share: on a pod, point
        # local_compile_cache_dir at storage every host mounts (a GCS FUSE path), and the
        # next launch loads every host's programs from what process 0 wrote on this one.
        xr.initialize_cache(compile_cache_dir, readonly=not is_main_process())
    if not xr.is_spmd():
        xr.use_spmd()
    if full_precision:
        import torch_xla.backends

        torch_xla.backends.set_mat_mul_precision("highest")
    init_process_group()


def process_index() -> int:
    """This host's index in a multi-host job (0 on a single host), from the TPU runtime."""
    import torch_xla.runtime as xr

    return xr.process_index()


def process_count() -> int:
    """The number of hosts (processes) of the job, from the TPU runtime."""
    import torch_xla.runtime as xr

    return xr.process_count()


def is_main_process() -> bool:
    """Process 0: the one host that writes logs, metrics, the MLPerf log, reports and caches."""
    return process_index() == 0


def device_type() -> str:
    """The PJRT device type: 'TPU', 'CPU', ..."""
    import torch_xla.runtime as xr

    return xr.device_type()


def device_kind() -> str:
    """'v4', 'v5e', 'v5p', 'v6e' on TPU (from the accelerator type, e.g. v5p-256); else the PJRT type."""
    import torch_xla.runtime as xr

    if xr.device_type() != "TPU":
        return xr.device_type()
    from torch_xla._internal import tpu as xla_tpu

    return tpu.canonical(xla_tpu.get_tpu_type())


def on_tpu(tensor) -> bool:
    """Whether `tensor` lives on a TPU, where the Pallas kernels run."""
    if tensor.device.type != "xla":
        return False
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU"


def init_process_group() -> None:
    """The gloo process group that torch.distributed.checkpoint and the hosts' stop agreement
    use; set up once per process, before the first checkpoint."""
    import torch.distributed as dist
    import torch_xla.runtime as xr

    if dist.is_initialized():
        return
    with quiet_native_stdout():  # gloo prints a line per group to stdout from C++
        if xr.process_count() > 1 or xr.device_type() == "TPU":
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// rendezvous)

            dist.init_process_group("gloo", init_method="xla://")
        else:
            # One process: an in-memory store, so no rendezvous file is left behind.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def quiet_native_stdout():
    """Silence what C++ code prints to file descriptor 1 (Python's own prints are flushed first)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# Set by clm beside PT_XLA_DEBUG_FILE: the analysis is clm's own (not the user's) and this process's.
ANALYSIS_OWNER = "CLM_XLA_ANALYSIS_PID"


def enable_compile_analysis() -> None:
    """Have torch_xla write its compilation-cause analysis to a file (compile_analysis_file()).

    torch_xla (PT_XLA_DEBUG_LEVEL=1) appends one "Compilation Analysis" block per XLA
    compilation, with the cause and the Python frames that triggered it, to
    PT_XLA_DEBUG_FILE. It reads both variables once, at the process's first compilation, so
    this must run before anything compiles (setup(), when the knob xla_compile_analysis is
    on); clm.observe.recompiles reads the blocks. A user's own PT_XLA_DEBUG_LEVEL is left
    alone (without a file, torch_xla prints to the console). A process started by a clm
    process inherits that process's settings, and so its file: it gets a file of its own, or
    each would read the other's compilations as its own.
    """
    if "PT_XLA_DEBUG_LEVEL" not in os.environ or ANALYSIS_OWNER in os.environ:
        os.environ["PT_XLA_DEBUG_LEVEL"] = "1"
        os.environ["PT_XLA_DEBUG_FILE"] = os.path.join(tempfile.gettempdir(), f"clm-xla-compiles-{os.getpid()}.log")
        os.environ[ANALYSIS_OWNER] = str(os.getpid())


def compile_analysis_file() -> str | None:
    """The file torch_xla writes its compilation analysis to; None when the analysis is off
    (xla_compile_analysis=false and no PT_XLA_DEBUG_LEVEL of the user's) or goes to the console."""
    try:
        level = int(os.environ.get("PT_XLA_DEBUG_LEVEL", "0"))
    except ValueError:
        level = 0
    return os.environ.get("PT_XLA_DEBUG_FILE") if level > 0 else None


def compile_count() -> int:
    """XLA compilations so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return data[0] if data else 0
