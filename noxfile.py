"""The test command (README, .ci/run): `pip install nox && nox` runs the suite on both stacks clm
supports, each in a fresh virtual environment of its own.

- current: `pip install -e '.[test]'`, the newest torch, no torch_xla. The DTensor engine's tests
  and the quick tier of the engine-neutral code that runs on torch (packaging, imports, config and
  backend resolution, model init, data, schedules); whatever needs torch_xla is marked `xla` and
  skipped (tests/conftest.py).
  Engine-independent tests that do not touch torch (deploy, docker) run once, in `xla`.
- xla: `pip install -e '.[xla,test]'`, torch 2.9.0 + torch_xla 2.9.0: the whole suite.

`nox -s current` or `nox -s xla` runs one; arguments after `--` go to pytest (`nox -s xla -- -m "not slow"`).
"""

import nox

nox.options.error_on_missing_interpreters = True

# The current stack's selection (see above), within its 8 minutes: the quick tier of these modules,
DTENSOR = "tests/test_dtensor.py::test_"
CURRENT = ["tests/test_packaging.py", "tests/test_imports.py", "tests/test_config.py", "tests/test_init.py",
           "tests/test_schedules.py", "tests/test_data.py", "tests/test_megatron_data.py",
           f"{DTENSOR}each_device_gets_its_collective_backend_beside_gloo",
           f"{DTENSOR}tensor_parallel_styles_come_from_the_rule_table_and_what_has_none_is_refused",
           f"{DTENSOR}dropless_is_transformers_grouped_mm_where_torch_has_a_grouped_gemm"]
# then every module but the XLA engine's imported in a fresh process, and the DTensor engine training
# on the newest torch: 4 gloo processes, 5 steps in fp32 and in bf16 compute with checkpoints (FSDP2,
# DCP), a refusal under torchrun, tensor parallelism with activation checkpointing and torch.compile,
# and kill -9 then SIGTERM in an eval, each resumed bit for bit.
CURRENT_SLOW = ["tests/test_imports.py::test_every_module_but_the_xla_engine_imports_without_loading_torch_xla",
                f"{DTENSOR}megatron_mixed_precision_computes_in_bf16_and_keeps_fp32_parameters_and_optimizer",
                f"{DTENSOR}what_is_not_built_yet_is_one_line_on_process_0_exit_2",
                f"{DTENSOR}activation_checkpointing_and_compile_keep_the_losses_on_tensor_parallel_processes",
                f"{DTENSOR}killed_then_preempted_in_an_eval_resumes_bitwise"]


@nox.session
def current(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-c", "import importlib.util, sys, torch; print('torch', torch.__version__); "
                "sys.exit(importlib.util.find_spec('torch_xla') is not None)")
    if session.posargs:
        session.run("pytest", "-m", "not xla", *session.posargs)
        return
    session.run("pytest", "-m", "not xla and not slow", *CURRENT)
    session.run("pytest", "-m", "not xla", *CURRENT_SLOW)


@nox.session
def xla(session: nox.Session) -> None:
    session.install("-e", ".[xla,test]")
    session.run("pytest", *session.posargs)
