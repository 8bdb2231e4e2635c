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
import torch

from families import write_family
from test_megatron_data import EOD, VOCAB, write_indexed

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 4
# Train losses and the last eval's, DTensor against XLA (the step-0 eval is within 1e-5). The
# issue asks 1e-3; measured within 1.2e-7 for every case once the load-balancing loss is pooled
# (it was per process before, 1e-4 apart on the Mixtral), so a regression of that size fails.
TRAIN_LOSS_REL = 1e-5
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
    """run_clm.py backend=dtensor in `processes` gloo CPU processes (`--standalone`: a free port for
    the rendezvous, so runs of other tests on the machine do not collide on torchrun's default)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={processes}", str(REPO / "run_clm.py"), "backend=dtensor", *overrides],
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


def test_tensor_parallel_styles_come_from_the_rule_table_and_what_has_none_is_refused(tmp_path):
    """Mixtral's table: q/k/v colwise and o rowwise, the embeddings and the head colwise with whole
    outputs, the router and the experts not split over tensor. GPT-2's table splits Conv1D weights,
    for which there is no style: one line naming the rule; tied embeddings are refused too."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from clm.config import load_config
    from clm.engine.dtensor import tensor_parallel_plan
    from clm.errors import UserError
    from clm.model.plan import ModelPlan
    from clm.parallel.mesh import mesh_shape

    def styles(*overrides):
        cfg = load_config(["backend=dtensor", "tensor_parallelism=2", *overrides], num_devices=4)
        model_plan = ModelPlan.from_config(cfg, mesh_shape(4, 2, 1, 1))
        return tensor_parallel_plan(model_plan.meta_model, model_plan.shardings, 2)

    plan = styles()
    layer = "model.layers.{}.self_attn."
    expected = {**{layer.format(i) + p: ColwiseParallel for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")},
                **{layer.format(i) + "o_proj": RowwiseParallel for i in (0, 1)},
                "model.embed_tokens": ColwiseParallel, "lm_head": ColwiseParallel}
    assert {path: type(style) for path, style in plan.items()} == expected
    assert [str(plan[p].output_layouts[0]) for p in ("model.embed_tokens", "lm_head")] == ["R", "R"]
    assert str(plan["model.layers.0.self_attn.q_proj"].output_layouts[0]) == "S(-1)"

    gpt2 = write_family(tmp_path / "gpt2", "gpt2", tokenizer=False)
    with pytest.raises(UserError, match=r"^tensor_parallelism=2: sharding rule 'transformer.h.\*.attn.c_attn.weight' "
                                        r"splits 'transformer.h.0.attn.c_attn.weight' \(Conv1D\) over tensor"):
        styles(f"model.name_or_path={gpt2}")
    tied = write_family(tmp_path / "llama", "llama", tokenizer=False, tie_word_embeddings=True)
    with pytest.raises(UserError, match=r"^tensor_parallelism=2: llama ties its input and output embeddings"):
        styles(f"model.name_or_path={tied}")

    from clm.engine.dtensor import DTensorEngine

    cfg = load_config(["backend=dtensor", "tensor_parallelism=2", "expert_parallelism=2"], num_devices=8)
    with pytest.raises(UserError, match=r"^tensor_parallelism=2 with expert_parallelism=2: not built together"):
        DTensorEngine().check(ModelPlan.from_config(cfg, mesh_shape(8, 2, 2, 1)))


def test_each_device_gets_its_collective_backend_beside_gloo():
    """CPU tensors always go through gloo; the device's through nccl (torch's own default for CUDA)
    or TorchTPU's tpu_dist (the name torch_tpu 0.2.0 registers; untested here: no TPU)."""
    import torch.distributed as dist

    from clm.engine.dtensor import PROCESS_GROUP_BACKENDS, accelerator, process_group_backend

    assert process_group_backend("cpu") == "gloo"
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("tpu") == "cpu:gloo,tpu:tpu_dist"
    assert PROCESS_GROUP_BACKENDS["cuda"] == dist.Backend.default_device_backend_map["cuda"]
    assert accelerator() is None  # this host: no GPU, no TPU


# The model and its parallelism per parity case: the engines' meshes have the same shape.
PARITY = {
    "mixtral": [],  # the default model: mixtral_tiny.json (clm's random init), capacity factor 1.25, fsdp=4
    "llama": [],  # pretrained weights in the hub's layout (each process reading its slices), fsdp=4
    # fsdp=2 x tensor=2: parallelize_module from the rule table (attention and embeddings split over
    # tensor), the processes of a tensor pair reading the same rows
    "mixtral-fsdp2-tensor2": ["tensor_parallelism=2"],
    # fsdp=2 x expert=2: expert weights sharded by expert, tokens moved by all-to-all
    "gpt_oss": ["model.capacity_factor=0", "expert_parallelism=2"],  # dropless
    "qwen3_moe": ["model.capacity_factor=1.25", "expert_parallelism=2"],
}


@pytest.mark.xla
@pytest.mark.slow
@pytest.mark.parametrize("model", list(PARITY))
def test_gloo_processes_match_xla_spmd_on_four_devices(data_dir, tmp_path, model):
    """The same losses, and for MoE models the same load-balancing loss (pooled over the
    processes, as XLA's one program computes it over the global batch) and drops."""
    knobs = list(PARITY[model])
    if not model.startswith("mixtral"):
        knobs.append(f"model.name_or_path={write_family(tmp_path / model, model, tokenizer=False)}")
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
        assert dtensor[step]["train/loss"] == pytest.approx(xla[step]["train/loss"], rel=TRAIN_LOSS_REL), step
        if model != "llama":
            assert dtensor[step]["train/aux_loss"] == pytest.approx(xla[step]["train/aux_loss"], rel=1e-5), step
            assert dtensor[step]["moe/drop_fraction"] == xla[step]["moe/drop_fraction"], step
    assert dtensor[5]["eval/loss"] == pytest.approx(xla[5]["eval/loss"], rel=TRAIN_LOSS_REL)
    drops = [dtensor[step]["moe/drop_fraction"] for step in range(1, 6)] if model != "llama" else []
    if model == "gpt_oss":
        assert drops == [0.0] * 5  # dropless under expert parallelism too
    elif drops:
        assert min(drops) > 0  # the capacity binds: the drops compared above are real ones


def test_dropless_is_transformers_grouped_mm_where_torch_has_a_grouped_gemm():
    """The selection: a capacity factor, or expert parallelism (whose all-to-all moves the static
    [B, E, C = S, H] buffer), takes the static path; dropless otherwise takes transformers'
    grouped_mm experts where torch has a grouped GEMM for the device. On this CPU (torch 2.9's
    CPU kernel) that is checked to give the static path's logits and gradients for a tiny
    gpt-oss (biased, transposed, clamped experts) and Qwen3-MoE; CUDA (sm90+) is not tested here."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from clm.engine.dtensor import grouped_mm_dropless
    from clm.model import moe
    from families import family_config

    cpu = torch.device("cpu")
    assert grouped_mm_dropless(cpu, 1.25, 1) is None
    assert grouped_mm_dropless(cpu, 0, 2) is None
    assert grouped_mm_dropless(torch.device("meta"), 0, 1) is None
    assert grouped_mm_dropless(cpu, 0, 1) is ALL_EXPERTS_FUNCTIONS["grouped_mm"]  # torch >= 2.9 on CPU

    for model_type in ("gpt_oss", "qwen3_moe"):
        config = family_config(model_type)
        config._experts_implementation = moe.EXPERTS_IMPLEMENTATION
        torch.manual_seed(0)
        static = AutoModelForCausalLM.from_config(config)
        grouped = copy.deepcopy(static)
        moe.Routing(static, 0.0)
        moe.Routing(grouped, 0.0, dropless=grouped_mm_dropless(cpu, 0, 1))
        input_ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        logits = {}
        for name, model in (("static", static), ("grouped", grouped)):
            logits[name] = model(input_ids=input_ids).logits
            logits[name].square().mean().backward()
        torch.testing.assert_close(logits["grouped"], logits["static"], rtol=1e-5, atol=1e-5)
        for (name, expected), actual in zip(static.named_parameters(), grouped.parameters()):
            torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=f"{model_type} {name}")


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


def profiled_ops(run_dir: Path) -> dict[str, int]:
    """How often each operator ran in process 0's profiled step (xla_profile_step)."""
    from collections import Counter

    trace = sorted((run_dir / "profile").glob("*.pt.trace.json"))[0]
    return Counter(event.get("name") for event in json.loads(trace.read_text())["traceEvents"])


@pytest.mark.slow
def test_activation_checkpointing_and_compile_keep_the_losses_on_tensor_parallel_processes(data_dir, tmp_path):
    """fsdp=1 x tensor=2 on 2 processes: activation checkpointing (per decoder layer) gives the
    same losses, bit for bit, and recomputes the layers' projections in the backward pass;
    compile=true (with it, aot_eager: the graphs torch.compile captures, without inductor's code
    generation, which takes minutes here) gives them within 1e-5 and runs compiled regions."""
    profile = ["xla_profile_step=2"]
    runs, ops = {}, {}
    for name, knobs in (("eager", []), ("recompute", ["model.fsdp_config.xla_fsdp_grad_ckpt=true"]),
                        ("compiled", ["model.fsdp_config.xla_fsdp_grad_ckpt=true", "compile=true",
                                      "compile_backend=aot_eager"])):
        result = torchrun(2, *SHAPES, *data(data_dir), "tensor_parallelism=2", *profile, *knobs,
                          f"output_dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = metrics(tmp_path / name / "moe_trial")
        ops[name] = profiled_ops(tmp_path / name / "moe_trial")

    keys = ("train/loss", "train/grad_norm", "eval/loss")
    for step in range(6):
        assert [runs["recompute"][step].get(k) for k in keys] == [runs["eager"][step].get(k) for k in keys], step
        for key in keys:
            if key in runs["eager"][step]:
                assert runs["compiled"][step][key] == pytest.approx(runs["eager"][step][key], rel=1e-5), (step, key)
    # Each decoder layer's 4 attention projections and router ran again in the backward pass.
    assert ops["recompute"]["aten::linear"] == ops["eager"]["aten::linear"] + 2 * 5
    assert not any(str(name).startswith("Torch-Compiled Region") for name in ops["recompute"])
    assert any(str(name).startswith("Torch-Compiled Region") for name in ops["compiled"])


@pytest.mark.slow
def test_what_is_not_built_yet_is_one_line_on_process_0_exit_2(tmp_path):
    """Every process finds it; process 0 says it and exits 2, torchrun stops the other and reports
    process 0's exit code in its own failure summary (torchrun's traceback, then exit 1: the
    launcher's, not clm's)."""
    result = torchrun(2, "async_checkpoint=true", f"output_dir={tmp_path}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: async_checkpoint=true: not built yet on backend=dtensor; use backend=xla or "
                      "async_checkpoint=false"], result.stderr[-3000:]
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
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node=2",
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


# ------------------------------------------------------------------ checkpoints that move

MOVING = [*SHAPES, "max_steps=6", "eval_frequency=3", "do_first_eval=false", "checkpoint_every=3"]
RUNS = {"xla": xla_run, "dtensor": torchrun}


@pytest.fixture(scope="module")
def moving(data_dir, tmp_path_factory) -> list[str]:
    """The knobs of the runs that move: the tiny Mixtral without the load-balancing loss, which
    the engines compute differently (README "Backends"), so what differs is the move alone."""
    model = json.loads((REPO / "clm" / "model" / "configs" / "mixtral_tiny.json").read_text())
    path = tmp_path_factory.mktemp("model") / "mixtral_tiny_no_aux.json"
    path.write_text(json.dumps({**model, "router_aux_loss_coef": 0.0}))
    return [*MOVING, *data(data_dir), f"model.config_path={path}"]


@pytest.fixture(scope="module")
def unmoved(moving, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per engine (6 steps, checkpoints at 3 and 6): each is the reference
    of the runs that resume on its engine, and writes the checkpoint the other engine resumes from."""
    runs = {}
    for engine, run in RUNS.items():
        output_dir = tmp_path_factory.mktemp(f"unmoved-{engine}")
        result = run(PROCESSES, *moving, f"output_dir={output_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[engine] = output_dir / "moe_trial"
    return runs


@pytest.mark.xla
@pytest.mark.slow
@pytest.mark.parametrize("source, target", [("xla", "dtensor"), ("dtensor", "xla")])
def test_a_checkpoint_of_one_engine_resumes_on_the_other(moving, tmp_path, unmoved, source, target):
    """Step 3 of one engine's run (one process on 4 XLA devices, or 4 gloo processes) continues
    on the other engine, resharded onto its mesh, with the same data position and schedule: its
    steps 4..6 equal those of the run that never left the target engine (fp32, 1e-3 relative)."""
    step_dir = unmoved[source] / "checkpoints" / "3"
    result = RUNS[target](PROCESSES, *moving, f"resume={step_dir}", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {step_dir} (step 3)" in result.stdout
    moved, expected = metrics(tmp_path / "moe_trial"), metrics(unmoved[target])
    assert sorted(moved) == [4, 5, 6]
    for step in (4, 5, 6):
        assert moved[step]["train/num_tokens"] == 8 * 64
        assert moved[step]["train/lr"] == expected[step]["train/lr"], step
        assert moved[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], rel=1e-3), step
        assert moved[step]["train/grad_norm"] == pytest.approx(expected[step]["train/grad_norm"], rel=1e-3), step
    assert moved[6]["eval/loss"] == pytest.approx(expected[6]["eval/loss"], rel=1e-3)


@pytest.mark.xla
@pytest.mark.slow
def test_a_dtensor_checkpoint_converts_to_the_hub_layout_as_an_xla_one_does(moving, unmoved, tmp_path):
    """checkpoint-to-hf of each engine's step 6 gives the same files, hub names, shapes and
    dtypes; what transformers loads from the DTensor one is that checkpoint's weights exactly.
    (The two runs' weights themselves differ: Adam's near-sign updates amplify the engines' float
    differences, by up to 1e-2 per element after 6 steps.)"""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from clm import checkpoint
    from clm.convert import main

    hub = {}
    for engine in RUNS:
        out = tmp_path / engine
        config = next(knob.split("=", 1)[1] for knob in moving if knob.startswith("model.config_path="))
        assert main(["checkpoint-to-hf", str(unmoved[engine] / "checkpoints"), str(out), "--config", config]) == 0
        hub[engine] = {(file.name, name): (tensor.shape, tensor.dtype) for file in sorted(out.glob("*.safetensors"))
                       for name, tensor in load_file(file).items()}
    assert hub["dtensor"] == hub["xla"]
    assert ("model-00001-of-00001.safetensors", "model.layers.0.block_sparse_moe.experts.0.w1.weight") in hub["xla"]

    step_dir = str(unmoved["dtensor"] / "checkpoints" / "6")
    saved = checkpoint.read_items(step_dir, {"model": {key[len("model."):]: torch.empty(shape) for key, shape in
                                                       checkpoint.tensor_shapes(step_dir).items()
                                                       if key.startswith("model.")}})["model"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dtensor").state_dict()
    assert loaded.keys() == saved.keys()
    assert [name for name in saved if not torch.equal(loaded[name], saved[name])] == []
