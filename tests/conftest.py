"""Tests run on XLA's CPU backend with 8 virtual devices and real SPMD partitioning, where
torch_xla is installed (the [xla] stack); on a stack without it (the newest torch: the DTensor
engine and everything engine-neutral) the tests marked `xla` are skipped (noxfile.py runs both).

The environment must be set before torch_xla initialises its runtime, so it is set here,
at import time of the test session, not inside fixtures.
"""
import importlib.util
import os

HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
# As every clm process sets before torch_xla starts (clm.runtime.device_count): Python scalars
# become graph inputs, not constants, so in-process runs compile what subprocess runs compile.
os.environ.setdefault("XLA_NO_SPECIAL_SCALARS", "1")
# XLA's CPU backend compiles at LLVM's -O0 here: compiling dominates the tiny models' tests
# (about 3x faster, 23 s -> 8 s for the tiny DeepSeek-V3 on 8 devices), running them does
# not. Values may differ from an -O2 build in the last bits (reductions vectorise
# differently), within every tolerance; bitwise comparisons are between runs of one setting.
# Subprocesses inherit it through the environment.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# Every clm process runs XLA in SPMD mode (clm.runtime.setup), so the test session does too,
# from the start: switching modes later, with XLA tensors already alive, can crash XLA.
# Starting the runtime first also keeps a CPU backward that runs first under SPMD from
# tripping an internal assert of the autograd engine.
# torch_xla reads its compilation-cause settings at the first compilation of the process,
# so the recompilation alerts (clm.observe.recompiles) need them set before any test runs.
if HAS_TORCH_XLA:
    from clm.runtime import enable_compile_analysis

    enable_compile_analysis()

    import torch_xla.runtime

    torch_xla.runtime.global_runtime_device_count()
    torch_xla.runtime.use_spmd()

import pytest  # noqa: E402

# Test modules that import torch_xla (or clm.engine.xla) when they load: where it is absent they
# are not collected, as if each of their tests were marked `xla`.
XLA_MODULES = ["test_families.py", "test_gpt_oss.py", "test_grouped_matmul.py", "test_moe.py", "test_optim.py",
               "test_train.py"]
collect_ignore = [] if HAS_TORCH_XLA else XLA_MODULES


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core, at most 4 (each holds XLA's 8 virtual devices and its
    compiled programs; the suite's memory stays under a 24 GB machine's)."""
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's loadgroup, a module's tests stay on one worker (its module-scoped
    fixtures are made once) unless the module names a group of its own, as the tests sharing the
    tiny run do (tests/runs.py). (tryfirst: before xdist reads the groups.)"""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        if not HAS_TORCH_XLA and item.get_closest_marker("xla") is not None:
            item.add_marker(pytest.mark.skip(reason="needs torch_xla: pip install -e '.[xla]' (nox -s xla)"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The shared run (tests/runs.py), trained once per session and never stopped: (config, summary).
    Read its outputs; never write under its run_dir."""
    import runs
    from clm.train import train

    cfg = runs.tiny_run_config(tmp_path_factory.mktemp("tiny_run"))
    return cfg, train(cfg)
