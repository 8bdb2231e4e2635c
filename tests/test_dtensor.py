"""The DTensor engine against the XLA engine, with real processes: four gloo CPU processes
under torchrun (FSDP2 over fsdp=4) and four XLA CPU devices in one process (SPMD), the same
config and seed, start from the same weights and compute the same losses.

The training data is Megatron indexed data (clm.data.megatron): its global batches do not depend
on how many processes read them, so both runs see the same rows. (The text pipeline gives each
process its own files, so a run of 4 processes reads other rows than a run of 1: that holds for
multi-host XLA too.) fp32, max_length 64, global batch 8, 5 steps, evals at 0 and 5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from families import write_family
from test_megatron_data import EOD, VOCAB, write_indexed

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 4
SHAPES = ["max_length=64", "global_train_batch_size=8", "global_eval_batch_size=8", "n_eval_examples=8",
          "max_steps=5", "eval_frequency=5", "seed=1234", "wandb.mode=disabled"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("indexed")
    write_indexed(str(directory / "train"), 400, seed=0)
    write_indexed(str(directory / "valid"), 150, seed=1)
    return directory


def data(directory: Path) -> list[str]:
    return ["dataset=c4_llama31", f"dataset.train_dataset_path={directory / 'train'}",
            f"dataset.eval_dataset_path={directory / 'valid'}", f"dataset.vocab_size={VOCAB}", f"dataset.eod_id={EOD}"]


def environment(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def torchrun(processes: int, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """run_clm.py backend=dtensor in `processes` gloo CPU processes."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                           str(REPO / "run_clm.py"), "backend=dtensor", *overrides],
                          capture_output=True, text=True, cwd=REPO, env=environment(OMP_NUM_THREADS="1"),
                          timeout=timeout)


def xla_run(devices: int, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """run_clm.py backend=xla on `devices` XLA CPU devices."""
    return subprocess.run([sys.executable, str(REPO / "run_clm.py"), "backend=xla", *overrides],
                          capture_output=True, text=True, cwd=REPO,
                          env=environment(PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices)), timeout=timeout)


def metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl's rows by step, train and eval rows of a step merged."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mixtral", "llama"])
def test_fsdp4_on_gloo_processes_matches_xla_spmd_on_four_devices(data_dir, tmp_path, model):
    """The tiny Mixtral (clm's random init) and a tiny Llama (pretrained weights in the hub's
    layout, each process reading its slices)."""
    if model == "mixtral":
        knobs = []  # the default model: mixtral_tiny.json, capacity factor 1.25
    else:
        knobs = [f"model.name_or_path={write_family(tmp_path / 'llama', 'llama', tokenizer=False)}"]
    runs = {}
    for engine, run in (("dtensor", torchrun), ("xla", xla_run)):
        result = run(PROCESSES, *SHAPES, *data(data_dir), *knobs, f"output_dir={tmp_path / engine}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[engine] = metrics(tmp_path / engine / "moe_trial")

    dtensor, xla = runs["dtensor"], runs["xla"]
    assert sorted(dtensor) == sorted(xla) == [0, 1, 2, 3, 4, 5]
    assert dtensor[0]["eval/loss"] == pytest.approx(xla[0]["eval/loss"], rel=1e-5)  # the same weights
    for step in range(1, 6):
        assert dtensor[step]["train/num_tokens"] == xla[step]["train/num_tokens"] == 8 * 64
        assert dtensor[step]["train/loss"] == pytest.approx(xla[step]["train/loss"], rel=1e-3), step
    assert dtensor[5]["eval/loss"] == pytest.approx(xla[5]["eval/loss"], rel=1e-3)


@pytest.mark.slow
def test_megatron_mixed_precision_computes_in_bf16_and_keeps_fp32_parameters_and_optimizer(data_dir, tmp_path):
    """model.compute_dtype=bfloat16 with model.dtype=float32 (FSDP2's MixedPrecisionPolicy): the
    losses track the fp32 run's; what is saved (parameters, AdamW's moments) stays fp32."""
    from torch.distributed.checkpoint import FileSystemReader

    runs = {}
    for name, knobs in (("fp32", []), ("mixed", ["model.compute_dtype=bfloat16"])):
        result = torchrun(PROCESSES, *SHAPES, *data(data_dir), *knobs, f"output_dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = metrics(tmp_path / name / "moe_trial")
    for step in range(1, 6):
        assert runs["mixed"][step]["train/loss"] == pytest.approx(runs["fp32"][step]["train/loss"], rel=1e-2)
        assert runs["mixed"][step]["train/loss"] != runs["fp32"][step]["train/loss"]  # it did compute in bf16
    saved = FileSystemReader(str(tmp_path / "mixed" / "moe_trial" / "checkpoints" / "5")).read_metadata()
    dtypes = {str(item.properties.dtype) for key, item in saved.state_dict_metadata.items()
              if key.startswith(("model.", "optimizer.state.")) and hasattr(item, "properties")
              and not key.endswith(".step")}
    assert dtypes == {"torch.float32"}


@pytest.mark.slow
def test_what_is_not_built_yet_is_one_line_on_process_0_exit_2(tmp_path):
    """Every process finds it; process 0 says it and exits 2, torchrun stops the other and reports
    process 0's exit code in its own failure summary (torchrun's traceback, then exit 1: the
    launcher's, not clm's)."""
    result = torchrun(2, "tensor_parallelism=2", f"output_dir={tmp_path}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: tensor_parallelism=2: not built yet on backend=dtensor; use backend=xla or "
                      "tensor_parallelism=1"], result.stderr[-3000:]
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert "rank      : 0" in root_cause and "exitcode  : 2" in root_cause, result.stderr[-3000:]
    assert "run_clm.py\", line" not in result.stderr and "/clm/" not in result.stderr  # no traceback of clm's
    assert result.returncode == 1
    assert not (tmp_path / "moe_trial").exists()


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, todo = [], [pid]
    while todo:
        below = todo.pop()
        children = [child for child, parent in parents.items() if parent == below]
        found += children
        todo += children
    return found


@pytest.mark.slow
def test_killed_then_preempted_in_an_eval_resumes_bitwise(data_dir, tmp_path):
    """Two gloo processes, three stops of one run, each resumed by the same command:
    - kill -9 of every process once checkpoint 2 is complete: it resumes from the newest complete
      checkpoint (a later one cut short is skipped);
    - SIGTERM to torchrun once the step-8 eval has started (100 batches), which passes it on to
      both processes: they agree at the same eval batch, save step 8 and exit 75; the eval is not
      reported;
    - the same command redoes that eval first.
    Steps and the eval equal an uninterrupted run's bit for bit, the MLPerf log event for event."""
    import signal
    import time

    from clm.cli import EXIT_CODE_DIR_ENV
    from clm.errors import EXIT_PREEMPTED

    eval_set = ["n_eval_examples=200", "global_eval_batch_size=2"]  # 100 batches: the signal lands in the eval
    shapes = [knob for knob in SHAPES if knob.split("=")[0] not in ("n_eval_examples", "global_eval_batch_size")]
    run = [*shapes, *eval_set, *data(data_dir), "max_steps=8", "eval_frequency=8", "do_first_eval=false",
           "checkpoint_every=2"]
    whole = torchrun(2, *run, f"output_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]

    output = [f"output_dir={tmp_path / 'stopped'}"]
    run_dir = tmp_path / "stopped" / "moe_trial"
    checkpoints = run_dir / "checkpoints"

    def start(**env) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                                 str(REPO / "run_clm.py"), "backend=dtensor", *run, *output],
                                cwd=REPO, env=environment(OMP_NUM_THREADS="1", **env), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_until(condition, process, what):
        deadline = time.monotonic() + 300
        while not condition():
            assert process.poll() is None and time.monotonic() < deadline, f"the run ended before {what}"
            time.sleep(0.02)

    process = start()
    wait_until(lambda: (checkpoints / "2" / ".manager_metadata").exists(), process, "checkpoint 2")
    for pid in [process.pid, *descendants(process.pid)]:  # torchrun starts its processes in sessions of their own
        os.kill(pid, signal.SIGKILL)
    process.wait()
    resumed_from = max(int(p.name) for p in checkpoints.iterdir() if (p / ".manager_metadata").exists())
    mlperf_log = run_dir / "mlperf_compliance.log"
    assert resumed_from < 8 and '"eval_start"' not in mlperf_log.read_text(), "the run reached its eval"

    exit_codes = tmp_path / "exit_codes"
    exit_codes.mkdir()
    process = start(**{EXIT_CODE_DIR_ENV: str(exit_codes)})
    wait_until(lambda: '"eval_start"' in mlperf_log.read_text(), process, "the step-8 eval")
    process.send_signal(signal.SIGTERM)  # as the pod's wrapper (clm.launch.host) passes it on
    preempted, _ = process.communicate(timeout=300)
    assert f"resumed from {checkpoints / str(resumed_from)} (step {resumed_from})" in preempted
    assert sorted(int(p.read_text()) for p in exit_codes.iterdir()) == [EXIT_PREEMPTED] * 2, preempted[-3000:]
    assert "step 8: preempted: eval cut short" in preempted, preempted[-3000:]
    assert (checkpoints / "8" / ".manager_metadata").exists()
    assert "eval/loss" not in metrics(run_dir).get(8, {})
    assert '"eval_start"' not in mlperf_log.read_text()

    resumed = torchrun(2, *run, *output)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / '8'} (step 8)" in resumed.stdout
    expected, actual = metrics(tmp_path / "whole" / "moe_trial"), metrics(run_dir)
    keys = ("train/loss", "train/grad_norm", "moe/drop_fraction", "eval/loss")
    assert actual[8]["eval/loss"] is not None
    for step in range(resumed_from + 1, 9):
        assert [actual[step].get(k) for k in keys] == [expected[step].get(k) for k in keys], step
    assert mlperf_keys(run_dir) == mlperf_keys(tmp_path / "whole" / "moe_trial")


def mlperf_keys(run_dir: Path) -> list[str]:
    lines = (run_dir / "mlperf_compliance.log").read_text().splitlines()
    return [json.loads(line.split(" ", 1)[1])["key"] for line in lines]
