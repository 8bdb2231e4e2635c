"""The observability pieces on their own: secret names, the resume contract of the metrics
writer and the MLPerf logger, torch_xla's compilation analysis, W&B's offline run, MFU."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clm.compliance import check
from clm.metrics import MetricsWriter
from clm.model.family import training_flops_per_token
from clm.observe.mlperf import MLPerfLogger
from clm.observe.recompiles import parse_analysis
from clm.secrets import REDACTED, is_secret_name, redact, redact_text


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "MY_SECRET", "foo_password", "aws_secret_access_key",
                                  "GITHUB_TOKEN", "apiKey", "db-password-file", "secret_value"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["tokenizer_name_or_path", "pad_token_id", "num_key_value_heads", "max_length",
                                  "keyboard", "tokens_per_sec", "TOKENIZERS_PARALLELISM", "monkey"])
def test_names_that_only_contain_a_secret_word_are_not_secret(name):
    assert not is_secret_name(name)


def test_redact_hides_secret_keys_and_secret_env_values_everywhere():
    env = {"HF_TOKEN": "hf_abcdefgh123", "PATH": "/usr/bin"}
    values = [v for k, v in env.items() if is_secret_name(k)]
    cfg = {"model": {"tokenizer_name_or_path": "/tok/hf_abcdefgh123/x", "api_key": "zzz", "pad_token_id": -100},
           "wandb": {"password": None}, "tags": ["a", "hf_abcdefgh123"]}
    out = redact(cfg, values)
    assert out == {"model": {"tokenizer_name_or_path": f"/tok/{REDACTED}/x", "api_key": REDACTED, "pad_token_id": -100},
                   "wandb": {"password": None}, "tags": ["a", REDACTED]}
    assert redact_text("token hf_abcdefgh123 end", values) == f"token {REDACTED} end"


def test_the_runs_own_lines_go_to_stdout_with_secrets_hidden():
    """console.say, which the trainer's lines (eval losses, resume, a stop) go through: stdout,
    as users read them, with a secret's value hidden (a token pasted into a path, say)."""
    code = "from clm.observe import console; console.say('resumed from gs://b/hf_plantedToken123/ckpt/4 (step 4)')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                               "HF_TOKEN": "hf_plantedToken123"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"resumed from gs://b/{REDACTED}/ckpt/4 (step 4)\n" and done.stderr == ""


def test_a_bad_inputs_error_line_hides_a_secret_it_quotes():
    """The one `error:` line quotes the knob's value; a token pasted into it is hidden there too."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "run_clm.py"),
                           "output_dir=/proc/hf_plantedToken123/x"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                               "HF_TOKEN": "hf_plantedToken123", "PJRT_DEVICE": "CPU"})
    assert done.returncode == 2, done.stderr
    assert "hf_plantedToken123" not in done.stdout + done.stderr
    assert done.stderr.startswith("error: output_dir: ") and REDACTED in done.stderr


def test_metrics_writer_resume_keeps_rows_to_the_checkpoint_and_drops_the_dead_runs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists(), "building a writer must not touch the files"
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": float(step)})
    state = writer.state_dict()
    for step in (4, 5):  # the dead run went on past its checkpoint
        writer.write(step, {"train/loss": 100.0 + step})
    writer.close()

    # TensorBoard reads event files in name order, and a name starts with the second it was made
    # in: a resumed process starts seconds later; here, in one process, wait for the next second
    # (within one second the names sort by a per-process counter, as text: 10 before 9).
    made = int(time.time())
    while int(time.time()) == made:
        time.sleep(0.01)
    resumed = MetricsWriter(str(tmp_path))
    resumed.load_state_dict(state)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5, "load_state_dict must not write"
    for step in (4, 5, 6):
        resumed.write(step, {"train/loss": -float(step)})
    resumed.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, -4.0), (5, -5.0), (6, -6.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, -4.0), (5, -5.0), (6, -6.0)]


def _log_prefix(logger, cfg):
    logger.init_start()
    logger.run_config(cfg, optimizer_defaults={"betas": (0.9, 0.999), "eps": 1e-8}, warmup_steps=1, eval_samples=4,
                      aux_loss_coef=0.02, platform="CPU-8")
    logger.run_start()


def test_mlperf_log_after_a_resume_continues_the_same_run(tmp_path):
    from clm.config import load_config

    cfg = load_config([f"output_dir={tmp_path}", "max_steps=6", "eval_frequency=2"], num_devices=8)
    path = tmp_path / "mlperf_compliance.log"
    gbs = cfg.global_train_batch_size

    first = MLPerfLogger(str(path))
    _log_prefix(first, cfg)
    assert path.exists()
    for step in range(4):
        if step and step % 2 == 0:
            first.eval_start(step * gbs)
            first.eval_stop(step * gbs, 9.0 - step)
        first.train_block(step * gbs)
    state = first.state_dict()  # checkpoint after step 4's block started
    first.eval_start(4 * gbs)  # the dead run's eval at step 4: dropped on resume
    first.eval_stop(4 * gbs, 123.0)
    first.close()

    second = MLPerfLogger(str(path))
    second.load_state_dict(state)
    _log_prefix(second, cfg)  # the resumed process starts up the same way: nothing of this is logged again
    for step in (4, 5):
        if step % 2 == 0:
            second.eval_start(step * gbs)
            second.eval_stop(step * gbs, 9.0 - step)
        second.train_block(step * gbs)
    second.eval_start(6 * gbs)
    second.eval_stop(6 * gbs, 3.0)
    second.run_stop(6 * gbs, success=False)

    events = [json.loads(line.split(" ", 1)[1]) for line in path.read_text().splitlines()]
    keys = [e["key"] for e in events]
    assert keys.count("run_start") == 1 and keys.count("run_stop") == 1 and keys.count("init_start") == 1
    assert [e["value"] for e in events if e["key"] == "eval_accuracy"] == [7.0, 5.0, 3.0]
    assert check(str(path), "dryrun").passed


ANALYSIS = """
Compilation Analysis: ================================================================================
Compilation Analysis: Compilation Cause
Compilation Analysis:   most likely user code trying to access tensor value before torch_xla.sync
Compilation Analysis: Graph Info: 
Compilation Analysis:   Graph Hash: 953f74a5c1f8295659e0658ec732e468
Compilation Analysis:   Number of Graph Inputs: 0
Compilation Analysis:   Number of Graph Outputs: 1
Compilation Analysis: Python Frame Triggered Execution: 
Compilation Analysis:   sync (/usr/lib/python3.11/site-packages/torch_xla/torch_xla.py:87)
Compilation Analysis:   train_step (/work/clm/train.py:190)
Compilation Analysis:   train (/work/clm/train.py:120)
Compilation Analysis: --------------------------------------------------------------------------------
Compilation Analysis: ================================================================================

Post Compilation Analysis: Graph input size: 0.000000 GB
"""


def test_compilation_analysis_names_cause_graph_and_the_first_frame_outside_libraries():
    (compilation,) = parse_analysis(ANALYSIS + ANALYSIS.replace("most likely user code trying to access tensor value "
                                                                "before torch_xla.sync", "user torch_xla.sync"))[:1]
    assert compilation.cause.startswith("most likely user code trying to access tensor value")
    assert compilation.graph_hash == "953f74a5c1f8295659e0658ec732e468"
    assert compilation.frame == "train_step (/work/clm/train.py:190)"
    assert len(parse_analysis(ANALYSIS * 2)) == 2


# A fresh process (torch_xla reads PT_XLA_DEBUG_LEVEL at its first compilation, and the test
# session has it on): set the runtime up as the trainer does with the knob, compile a graph
# through warm-up, then a new one after it, and report what the recompilation watch said.
KNOB_PROBE = """
import json, logging, os, sys, torch
from clm import runtime
from clm.observe.recompiles import RecompileWatch
runtime.device_count()
runtime.setup(None, False, compile_analysis=sys.argv[1] == "true")
import torch_xla
messages = []
logging.getLogger("clm.observe.recompiles").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: messages.append(r.getMessage())})())
watch = RecompileWatch(runtime.compile_count, runtime.compile_analysis_file(), warmup={"probe": 1})
x = torch.arange(6.0, device=torch_xla.device())
(x * 2).cpu(); watch.observe("probe", 1)        # warm-up
(x.sum() + 7).cpu(); watch.observe("probe", 2)  # a new graph after it
path = runtime.compile_analysis_file()
print(json.dumps({"level": os.environ.get("PT_XLA_DEBUG_LEVEL"), "file": path, "messages": messages,
                  "file_text": open(path).read() if path and os.path.exists(path) else None}))
"""


@pytest.mark.xla
@pytest.mark.slow
@pytest.mark.parametrize("analysis", [True, False])
def test_compile_analysis_knob_names_causes_when_on_and_is_not_set_up_when_off(tmp_path, analysis):
    env = {k: v for k, v in os.environ.items() if k not in ("PT_XLA_DEBUG_LEVEL", "PT_XLA_DEBUG_FILE")}
    env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1", TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", KNOB_PROBE, str(analysis).lower()], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    (message,) = report["messages"]
    assert message.startswith("step 2: XLA compiled a new probe graph after warm-up (cause: ")
    if analysis:
        assert report["level"] == "1" and report["file"].startswith(str(tmp_path))
        assert report["file_text"].count("Compilation Cause") >= 2
        assert "cause: unknown" not in message and "<string>" in message  # the probe's own line
    else:
        assert report["level"] is None and report["file"] is None  # clm set nothing up
        assert "cause: unknown (torch_xla's compilation analysis is off: xla_compile_analysis=false" in message


@pytest.mark.xla
def test_a_process_started_by_a_clm_process_gets_an_analysis_file_of_its_own(tmp_path):
    """A process a clm process starts (a test worker, a run a test launches) inherits its settings:
    with the same file, each would read the other's compilations as its own. A user's own
    setting is still left alone."""
    from clm import runtime

    probe = ("import os; from clm import runtime; runtime.enable_compile_analysis(); "
             "print(os.getpid(), runtime.compile_analysis_file())")
    repo = str(Path(__file__).resolve().parent.parent)

    def child(env):
        done = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": repo}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    mine = runtime.compile_analysis_file()
    assert mine and str(os.getpid()) in mine  # this test process's own (tests/conftest.py set it up)
    pid, path = child(dict(os.environ))
    assert path != mine and pid in path
    user_file = str(tmp_path / "mine.log")
    env = {k: v for k, v in os.environ.items() if k != runtime.ANALYSIS_OWNER}
    _, path = child({**env, "PT_XLA_DEBUG_LEVEL": "1", "PT_XLA_DEBUG_FILE": user_file})
    assert path == user_file


def test_mfu_flops_per_token_for_mixtral_8x22b_by_hand():
    from clm.model.config import CONFIGS_DIR
    from transformers import MixtralConfig

    config = MixtralConfig(**json.loads((CONFIGS_DIR / "mixtral822.json").read_text()))
    L, H, I, E, K, Hq, Hkv, d, V, S = 56, 6144, 16384, 8, 2, 48, 8, 128, 32000, 32768
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size) == (L, H, I, V)
    router = H * E
    experts = K * 3 * H * I  # gate, up and down projections of the k chosen experts
    qkv = H * Hq * d + 2 * H * Hkv * d
    out = Hq * d * H
    attention = S * Hq * d  # causal: a token meets S/2 keys on average, in QK^T and in AV
    # multiply-adds per token; x2 FLOPs each, x3 for forward + backward
    by_hand = 3 * 2 * (L * (router + experts + qkv + out + attention) + H * V)
    assert training_flops_per_token(config, S) == by_hand
    assert math.isclose(by_hand, 3.01e11, rel_tol=0.002)


def test_report_throughput_is_flat_when_the_rows_before_each_eval_come_bunched(tmp_path):
    """1000 tokens a second throughout, but the closure thread ran late before each eval (as
    measured in the default job on 2 shared cores): the first row of the bunch carries the
    wait, the others 1 ms. Windows of a few rows spike to a million tokens/s there; windows
    that end at an eval (a device sync) show the true 1000, as the summary's mean does."""
    from clm.report import load_run, summarize, throughput_curve

    rows = [{"step": 0, "eval/loss": 10.0}]
    for step in range(1, 24):
        seconds = 30.0 if step <= 2 else 1.0  # warm-up: compilation
        if step in (5, 15):
            seconds = 5.995  # stamped late, once steps up to the eval had finished
        elif 5 < step <= 10 or 15 < step <= 20:
            seconds = 0.001
        rows.append({"step": step, "train/loss": 5.0, "train/num_tokens": 1000, "perf/step_time_seconds": seconds})
        if step in (10, 20):
            rows.append({"step": step, "eval/loss": 4.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    run = load_run(str(tmp_path))
    steps, values = throughput_curve(run)
    assert steps == [10, 20, 23], "one window up to each eval, and the steps after the last eval"
    assert values == pytest.approx([1000.0] * 3)
    assert summarize(run)["tokens/s"] == pytest.approx(1000.0)


def test_report_skips_the_warm_up_of_a_resumed_process_too(tmp_path):
    """A run preempted after step 6 and resumed: the new process compiles again (its clock,
    perf/elapsed_seconds, restarts), so its first two steps are warm-up as the first process's were."""
    from clm.report import load_run, summarize

    rows, elapsed = [], 0.0
    for step in range(1, 13):
        if step == 7:
            elapsed = 0.0  # the resumed process's clock
        seconds = 30.0 if step in (1, 2, 7, 8) else 1.0
        elapsed += seconds
        rows.append({"step": step, "train/loss": 5.0, "train/num_tokens": 1000, "perf/step_time_seconds": seconds,
                     "perf/elapsed_seconds": elapsed})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert summarize(load_run(str(tmp_path)))["tokens/s"] == pytest.approx(1000.0)


def test_wandb_offline_run_is_read_back_with_wandbs_own_records(tmp_path):
    from omegaconf import OmegaConf

    from clm.observe.wandb_run import WandbRun
    from wandb_records import offline_run

    cfg = OmegaConf.create({"mode": "offline", "project": "clm-test", "entity": None, "tags": ["t1"]})
    run = WandbRun(cfg, str(tmp_path), {"lr": 0.1, "model": {"dtype": "float32"}})
    assert not (tmp_path / "wandb").exists(), "building the W&B run must not start it"
    run.log(1, {"train/loss": 2.5, "perf/mfu": None})
    run.log(2, {"train/loss": 2.0})
    run.finish()
    read = offline_run(str(tmp_path))
    assert read["id"] == run.run_id and read["tags"] == ["t1"]
    assert read["config"]["lr"] == 0.1 and read["config"]["model"] == {"dtype": "float32"}
    losses = [(row["_step"], row["train/loss"]) for row in read["history"]]
    assert losses == [(1, 2.5), (2, 2.0)]


@pytest.mark.parametrize("final_loss, success, passes", [(1.7, True, True), (2.0, False, False), (2.0, True, False)])
def test_closed_rules_judge_a_benchmark_scale_log(tmp_path, final_loss, success, passes):
    """No CPU can train at sequence 32768, so the logger writes the log of the gbs256 preset's
    run by hand: evals every 6 steps, target 1.8. Only a run that reached it (and says so) passes."""
    from clm.config import load_config
    from clm.optim import warmup_steps

    cfg = load_config(["+experiment=gbs256_tpu", f"output_dir={tmp_path}"], num_devices=256)
    path = str(tmp_path / "mlperf_compliance.log")
    logger = MLPerfLogger(path)
    logger.init_start()
    logger.run_config(cfg, optimizer_defaults={"betas": (0.9, 0.999), "eps": 1e-8}, warmup_steps=warmup_steps(cfg.sched),
                      eval_samples=24567, aux_loss_coef=0.001, platform="v5p-512")
    logger.run_start()
    gbs = cfg.global_train_batch_size
    for block, loss in enumerate([3.0, 2.5, final_loss]):
        for step in range(block * 6, block * 6 + 6):
            logger.train_block(step * gbs)
        logger.eval_start((block + 1) * 6 * gbs)
        logger.eval_stop((block + 1) * 6 * gbs, loss)
    logger.run_stop(18 * gbs, success=success)
    assert check(path, "closed").passed == passes
    assert check(path, "dryrun").passed == (success == (final_loss <= 1.8))
