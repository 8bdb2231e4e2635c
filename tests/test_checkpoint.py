"""Checkpoints and resume on XLA's CPU backend: a resumed run is bitwise the uninterrupted one,
whatever stopped it (kill -9, SIGTERM, the kill switch, a kill during a save), locally and on a
real GCS server; a checkpoint reshards onto another mesh; bad input is one line."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from clm import checkpoint, runtime
from clm.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from clm.train import exit_code, train
from runs import GROUP, TINY_RUN
from runs import tiny_run_config as config
from test_data_gcs import gcs_server  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.xdist_group(GROUP), pytest.mark.xla]

REPO = Path(__file__).resolve().parent.parent
LAST = 10  # the shared run's last step (tests/runs.py)


def rows(run_dir) -> list[tuple]:
    """(step, train/loss, eval/loss) of every metrics.jsonl row: what must match bitwise (none
    before the first row: the file is made then)."""
    if not (Path(run_dir) / "metrics.jsonl").exists():
        return []
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [(r["step"], r.get("train/loss"), r.get("eval/loss")) for r in map(json.loads, f)]


def mlperf_keys(run_dir) -> list[str]:
    """The MLPerf log's event keys, in order."""
    lines = (Path(run_dir) / "mlperf_compliance.log").read_text().splitlines()
    return [json.loads(line.split(" ", 1)[1])["key"] for line in lines]


def model_tensors(step_dir) -> dict[str, torch.Tensor]:
    """The model's tensors of a checkpoint, read back on the CPU by torch.distributed.checkpoint."""
    shapes = checkpoint.tensor_shapes(str(step_dir))
    state = {"model": {key[6:]: torch.empty(shape) for key, shape in shapes.items() if key.startswith("model.")}}
    return checkpoint.read_items(str(step_dir), state)["model"]


def assert_same_weights(a, b):
    a, b = model_tensors(a), model_tensors(b)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------ in this process


@pytest.fixture(scope="module")
def uninterrupted(tiny_run):
    """The reference: the shared run (tests/runs.py), never stopped."""
    cfg, summary = tiny_run
    assert summary.steps == LAST and exit_code(summary) == 0
    return cfg


@pytest.mark.slow
def test_kill_switch_cuts_the_first_eval_short_saves_and_resumes_bitwise(tmp_path, uninterrupted):
    """The switch is polled before every eval batch too: present from the start, it stops the
    run in its step-0 eval, which is not reported and which the resumed run redoes."""
    switch = tmp_path / "STOP"
    switch.touch()
    cfg = config(tmp_path, f"kill_switch_path={switch}")
    summary = train(cfg)
    assert summary.stop_reason == "kill_switch" and exit_code(summary) == EXIT_PREEMPTED
    assert summary.steps == 0 and summary.eval_loss is None
    assert checkpoint.step_directories(cfg.checkpoint_dir) == {0: True}
    assert not rows(cfg.run_dir)  # no eval row
    assert "eval_start" not in mlperf_keys(cfg.run_dir) and "run_start" in mlperf_keys(cfg.run_dir)

    switch.unlink()
    summary = train(cfg)  # the same command again
    assert summary.stop_reason == "max_steps" and summary.steps == LAST and exit_code(summary) == 0
    assert rows(cfg.run_dir) == rows(uninterrupted.run_dir)
    assert mlperf_keys(cfg.run_dir) == mlperf_keys(uninterrupted.run_dir)
    assert_same_weights(Path(cfg.checkpoint_dir) / str(LAST), Path(uninterrupted.checkpoint_dir) / str(LAST))
    # Retention: the newest checkpoints_to_keep=2 complete ones.
    assert checkpoint.step_directories(cfg.checkpoint_dir) == {LAST - 2: True, LAST: True}


@pytest.mark.slow
def test_a_finished_run_resumes_to_nothing_and_says_so(tmp_path, uninterrupted, capsys):
    cfg = config(uninterrupted.output_dir)
    before = rows(cfg.run_dir)
    summary = train(cfg)
    assert summary.steps == LAST and summary.eval_loss == before[-1][2]
    assert "that run is complete" in capsys.readouterr().out
    assert rows(cfg.run_dir) == before


# The host-side state of a checkpoint, "host_<process>": a pickle of {name: state_dict()}. These
# names and the reporting objects' keys are what checkpoints written before the run log gathered
# those objects hold (the run log contributes them under the same names), so those still restore.
HOST_STATE = {"loop", "scheduler", "data", "rng", "metrics", "mlperf", "wandb", "recompiles"}
REPORTING_STATE = {"metrics": {"rows", "last_step"}, "mlperf": {"lines", "block_open", "stopped"},
                   "wandb": {"run_id"}, "recompiles": {"after_warmup"},
                   "loop": {"step", "target_reached", "eval_step", "eval_loss", "best_eval_loss"}}


@pytest.mark.slow
def test_host_state_keeps_the_names_and_format_that_earlier_checkpoints_have(tmp_path, uninterrupted):
    from clm.model.plan import ModelPlan
    from clm.parallel import mesh_shape
    from clm.engine.xla import XlaEngine
    from clm.train import Trainer

    step_dir = Path(uninterrupted.checkpoint_dir) / str(LAST)
    host = pickle.loads(checkpoint.read_items(str(step_dir), {"host_0": b""})["host_0"])
    assert set(host) == HOST_STATE
    for name, keys in REPORTING_STATE.items():
        assert set(host[name]) == keys, name
    cfg = config(tmp_path)
    trainer = Trainer(ModelPlan.from_config(cfg, mesh_shape(runtime.device_count(), 1, 1, 1)), XlaEngine(), str(step_dir))
    try:
        trainer.restore()
    finally:
        trainer.close()
    assert trainer.loop.state_dict() == host["loop"] and trainer.loop.step == LAST
    log = trainer.log.host_state()
    for name in ("metrics", "wandb", "recompiles"):
        assert log[name].state_dict() == host[name], name
    # The MLPerf log counts its lines again once it reopens the file; what it restores is where the run stood.
    assert (log["mlperf"].block_open, log["mlperf"].stopped) == (host["mlperf"]["block_open"], host["mlperf"]["stopped"])


@pytest.mark.slow
def test_checkpoint_saved_on_one_mesh_resumes_on_another(tmp_path, uninterrupted):
    """Saved on fsdp=8, resumed on fsdp=4 x tensor=2: distributed checkpointing reshards."""
    switch = tmp_path / "STOP"
    switch.touch()
    cfg = config(tmp_path, f"kill_switch_path={switch}", "do_first_eval=false")  # stopped after step 1
    assert train(cfg).steps == 1
    switch.unlink()
    resumed = train(config(tmp_path, f"kill_switch_path={switch}", "tensor_parallelism=2"))
    assert resumed.steps == LAST
    ours = [r for r in rows(cfg.run_dir) if r[1] is not None]
    reference = [r for r in rows(uninterrupted.run_dir) if r[1] is not None]
    assert [r[0] for r in ours] == [r[0] for r in reference]
    assert [r[1] for r in ours] == pytest.approx([r[1] for r in reference], rel=1e-5)


@pytest.mark.slow
def test_async_checkpoint_gives_the_same_checkpoints(tmp_path, uninterrupted):
    cfg = config(tmp_path, "async_checkpoint=true", "checkpoints_to_keep=0")
    train(cfg)
    assert checkpoint.step_directories(cfg.checkpoint_dir) == {2: True, 4: True, 6: True, 8: True, 10: True}
    assert rows(cfg.run_dir) == rows(uninterrupted.run_dir)
    assert_same_weights(Path(cfg.checkpoint_dir) / str(LAST), Path(uninterrupted.checkpoint_dir) / str(LAST))


@pytest.mark.slow
def test_incomplete_checkpoint_is_ignored_with_a_warning_and_kept(tmp_path, uninterrupted, caplog):
    """A save killed part-way (here: its commit marker never written) is not resumed from."""
    cfg = config(tmp_path, "max_steps=4", f"sched.max_steps={LAST}")  # the shared run's schedule
    train(cfg)
    (Path(cfg.checkpoint_dir) / "4" / checkpoint.COMMIT_MARKER).unlink()
    assert checkpoint.resume_directory(cfg).endswith("/2")
    assert "4 is incomplete" in caplog.text
    train(config(tmp_path))
    assert rows(cfg.run_dir) == rows(uninterrupted.run_dir)


@pytest.mark.slow
def test_save_and_resume_through_gcs(tmp_path, gcs_server, uninterrupted):  # noqa: F811
    switch = tmp_path / "STOP"
    ckpt = f"{gcs_server}/run1/checkpoints"
    switch.touch()
    # Two saves, the kill switch's and the last (the emulator takes seconds per checkpoint).
    cfg = config(tmp_path, f"checkpoint_dir={ckpt}", f"kill_switch_path={switch}", "checkpoint_every=0")
    assert train(cfg).stop_reason == "kill_switch"
    assert checkpoint.step_directories(ckpt) == {0: True}  # in the step-0 eval
    switch.unlink()
    train(config(tmp_path, f"checkpoint_dir={ckpt}", "checkpoint_every=0"))
    assert rows(cfg.run_dir) == rows(uninterrupted.run_dir)
    assert_same_weights(f"{ckpt}/{LAST}", Path(uninterrupted.checkpoint_dir) / str(LAST))

    listing = subprocess.run([sys.executable, "-m", "clm.checkpoint", "ls", ckpt], capture_output=True, text=True,
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["step=0", f"step={LAST}"]
    assert all("complete" in line and "max_length=64" in line and "size_mb=" in line for line in lines)


# ------------------------------------------------------ partially replicated tensors


def built(cfg):
    """The model of cfg on its mesh with AdamW's state primed, as a run's start has them."""
    from clm import parallel
    from clm.model.build import build_sharded_model
    from clm.model.plan import ModelPlan
    from clm.engine.xla import XlaEngine
    from clm.optim import build_optimizer

    shape = parallel.mesh_shape(runtime.device_count(), cfg.tensor_parallelism, cfg.expert_parallelism, 1)
    model = build_sharded_model(ModelPlan.from_config(cfg, shape)).module
    engine = XlaEngine()
    optimizer = build_optimizer(cfg, model, engine.optimizer_class(cfg.optimizer))
    engine.prime_optimizer(optimizer)
    return model, optimizer


def host_values(model, optimizer) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds, keyed as in it, on the CPU: a sharded tensor assembled
    from its devices' shards (no XLA program), and each of its replicas checked to agree."""
    import torch_xla.distributed.spmd as xs

    tensors = {f"model.{name}": t for name, t in checkpoint.model_state(model).items()}
    tensors.update((f"optimizer.state.{name}.{key}", value)
                   for name, state in checkpoint.optimizer_state(model, optimizer)["state"].items()
                   for key, value in state.items() if isinstance(value, torch.Tensor))
    values = {}
    for key, tensor in tensors.items():
        sharded = xs.wrap_if_sharded(tensor) if tensor.device.type == "xla" else tensor
        if not isinstance(sharded, xs.XLAShardedTensor):
            values[key] = tensor.detach().cpu().clone()
            continue
        value, seen = torch.empty(tensor.shape, dtype=tensor.dtype), {}
        for shard in sharded.local_shards:
            where = (...,) if shard.indices is Ellipsis else tuple(shard.indices)  # Ellipsis: replicated
            data = shard.unpadded_data
            offsets = tuple(getattr(s, "start", 0) for s in where)
            assert offsets not in seen or torch.equal(seen[offsets], data), f"{key}: replicas differ"
            seen[offsets] = value[where] = data
        values[key] = value
    return values


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [("tensor_parallelism=2", "expert_parallelism=2", "async_checkpoint=false"),
                                  ("tensor_parallelism=2", "async_checkpoint=true")],
                         ids=["tensor2-expert2-fsdp2-sync", "tensor2-fsdp4-async"])
def test_partially_replicated_tensors_are_saved_once_and_restore_bitwise(tmp_path, mesh):
    """The routers ([E, H], split over fsdp x expert, replicated over tensor) and their AdamW
    moments are partially replicated here, each shard held by two devices of this host:
    torch_xla 2.9's planner dropped both copies (the checkpoint lacked them). Every shard is
    written exactly once, and a model built with another seed gets back every parameter and
    optimizer tensor bitwise."""
    import torch_xla

    cfg = config(tmp_path, *mesh)
    model, optimizer = built(cfg)
    router = model.get_submodule("model.layers.0.mlp.gate").weight
    assert "last_tile_dim_replicate" in torch_xla._XLAC._get_xla_sharding_spec(router)
    with torch.no_grad():  # optimizer state other than priming's zeros, sharded as the parameters
        for parameter, state in optimizer.state.items():
            state["exp_avg"].copy_(parameter * 0.5 + 1)
            state["exp_avg_sq"].copy_(parameter * parameter + 2)
    torch_xla.sync()
    saved = host_values(model, optimizer)
    saver = checkpoint.XlaCheckpointer(cfg, model, optimizer, host_state={})
    saver.save(1)
    saver.close()

    step_dir = Path(cfg.checkpoint_dir) / "1"
    metadata = checkpoint.storage_reader(str(step_dir)).read_metadata().state_dict_metadata
    written = checkpoint.tensor_shapes(str(step_dir)).keys()
    assert sorted(saved.keys() - written) == []  # missing from the checkpoint
    assert written == saved.keys()
    for key in saved:  # each element in exactly one written chunk
        chunks = metadata[key].chunks
        assert len({tuple(c.offsets) for c in chunks}) == len(chunks), key
        assert sum(torch.Size(c.sizes).numel() for c in chunks) == saved[key].numel(), key

    fresh_model, fresh_optimizer = built(config(tmp_path, *mesh, "seed=1"))
    before = host_values(fresh_model, fresh_optimizer)
    assert not torch.equal(before["model.model.layers.0.mlp.gate.weight"], saved["model.model.layers.0.mlp.gate.weight"])
    checkpoint.XlaCheckpointer(cfg, fresh_model, fresh_optimizer, host_state={}).restore(str(step_dir))
    restored = host_values(fresh_model, fresh_optimizer)
    assert restored.keys() == saved.keys()
    assert [key for key in saved if not torch.equal(restored[key], saved[key])] == []


@pytest.mark.slow
def test_a_checkpoint_with_the_optimizer_keyed_by_position_still_restores(tmp_path):
    """clm before 2026-12-08 saved the XLA optimizer's state_dict() as it is (state keyed by
    position, param groups one list); such a checkpoint restores bitwise."""
    import torch_xla

    cfg = config(tmp_path)
    model, optimizer = built(cfg)
    with torch.no_grad():
        for parameter, state in optimizer.state.items():
            state["exp_avg"].copy_(parameter * 0.5 + 1)
    torch_xla.sync()
    saved = host_values(model, optimizer)
    runtime.init_process_group()
    checkpoint.write_step(cfg.checkpoint_dir, 1, {"model": checkpoint.model_state(model), "optimizer": optimizer.state_dict(),
                                                  "host_0": pickle.dumps({})}, planner=checkpoint.save_planner())
    assert "optimizer.state.0.exp_avg" in checkpoint.tensor_shapes(str(Path(cfg.checkpoint_dir) / "1"))

    fresh_model, fresh_optimizer = built(config(tmp_path, "seed=1"))
    checkpoint.XlaCheckpointer(cfg, fresh_model, fresh_optimizer, host_state={}).restore(str(Path(cfg.checkpoint_dir) / "1"))
    restored = host_values(fresh_model, fresh_optimizer)
    assert [key for key in saved if not torch.equal(restored[key], saved[key])] == []


def test_one_writer_per_shard_across_processes():
    """Two hosts each holding two replicas of both shards of a [8, 16] tensor (columns split in
    two): each shard is written once, by the host with less to write; the rest passes through."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import (SavePlan, TensorProperties, TensorWriteData, WriteItem,
                                                      WriteItemType)

    def shard(column, hint, fqn="w"):
        offsets = torch.Size([0, column])
        return WriteItem(index=MetadataIndex(fqn, offsets, hint), type=WriteItemType.SHARD,
                         tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets, torch.Size([8, 8])),
                                                     properties=TensorProperties(dtype=torch.float32),
                                                     size=torch.Size([8, 16])))

    config_item = WriteItem(index=MetadataIndex("config"), type=WriteItemType.BYTE_IO)
    host = [shard(0, 0), shard(0, 1), shard(8, 2), shard(8, 3)]
    plans = checkpoint.one_writer_per_shard([SavePlan([config_item, *host]), SavePlan(list(host))])
    written = [(i, item.index.fqn, item.index.offset and tuple(item.index.offset), item.index.index)
               for i, plan in enumerate(plans) for item in plan.items]
    # Host 0 already writes the config, so the first shard goes to host 1 and the second to host 0.
    assert written == [(0, "config", None, None), (0, "w", (0, 8), 2), (1, "w", (0, 0), 0)]


# ---------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_bad_inputs_are_one_line_before_anything_is_written(tmp_path, uninterrupted):
    cases = {
        "output_dir=/proc/clm": r"output_dir: cannot write to /proc/clm/moe_trial",
        f"checkpoint_dir=/proc/clm": r"checkpoint_dir: cannot write to /proc/clm",
        f"resume={tmp_path / 'nothing'}": r"resume=.*nothing: no complete checkpoint there",
    }
    for override, message in cases.items():
        with pytest.raises(UserError, match=message):
            train(config(tmp_path / "bad", override))
    with pytest.raises(UserError, match=r"checkpoint_every=-1: must be >= 0"):
        config(tmp_path, "checkpoint_every=-1")


def test_unreachable_bucket_is_one_line(tmp_path, gcs_server):  # noqa: F811
    with pytest.raises(UserError, match=r"checkpoint_dir: .*no-such-bucket"):
        train(config(tmp_path, "checkpoint_dir=gs://no-such-bucket/ckpt"))


@pytest.mark.slow
def test_resume_with_changed_semantics_names_the_knobs(tmp_path, uninterrupted):
    saved = Path(uninterrupted.checkpoint_dir) / str(LAST)
    with pytest.raises(UserError, match=r"different knobs: lr \(0.002 -> 0.001\), seed \(0 -> 3\)"):
        train(config(tmp_path, f"resume={saved}", "lr=1e-3", "seed=3"))
    # Knobs that only change how long or how often are fine; consent allows the rest.
    checkpoint.check_config_matches(config(tmp_path, "eval_frequency=3", "log_frequency=2"), str(saved))
    # max_steps moves the schedule (warmup is a fraction of sched.max_steps) unless it is pinned.
    with pytest.raises(UserError, match=r"sched.max_steps \(10 -> 20\)"):
        checkpoint.check_config_matches(config(tmp_path, "max_steps=20"), str(saved))
    checkpoint.check_config_matches(config(tmp_path, "max_steps=20", f"sched.max_steps={LAST}"), str(saved))
    checkpoint.check_config_matches(config(tmp_path, f"resume={saved}", "lr=1e-3", "allow_config_change=true"),
                                    str(saved))


@pytest.mark.slow
def test_checkpoint_of_another_architecture_names_the_tensors(tmp_path, uninterrupted):
    model_json = json.loads((REPO / "clm/model/configs/mixtral_tiny.json").read_text())
    model_json["intermediate_size"] = 224
    (tmp_path / "narrow.json").write_text(json.dumps(model_json))
    saved = Path(uninterrupted.checkpoint_dir) / str(LAST)
    with pytest.raises(UserError, match=r"different model architecture .*gate_up_proj \[8, 896, 128\] vs \[8, 448, 128\]"):
        train(config(tmp_path, f"resume={saved}", "allow_config_change=true",
                     f"model.config_path={tmp_path / 'narrow.json'}"))


def test_a_checkpoint_with_missing_shards_is_one_line(tmp_path):
    """A tensor some of whose shards were never written (clm before its own save planner, on
    several hosts) would restore without a word and keep its old values: refused instead."""
    import pickle

    import torch.distributed.checkpoint as dist_cp

    model = torch.nn.Linear(4, 2)
    dist_cp.save({f"model.{name}": tensor for name, tensor in model.state_dict().items()},
                 storage_writer=dist_cp.FileSystemWriter(tmp_path), no_dist=True)
    checkpoint.check_model_matches(model, str(tmp_path))  # complete: passes
    metadata_file = tmp_path / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())
    metadata.state_dict_metadata["model.weight"].chunks.pop()
    metadata_file.write_bytes(pickle.dumps(metadata))
    assert checkpoint.incomplete_tensors(str(tmp_path)) == ["model.weight"]
    with pytest.raises(UserError, match=r"shards of 1 tensors are missing \(model.weight\)"):
        checkpoint.check_model_matches(model, str(tmp_path))


# -------------------------------------------------------------- real processes


def launch(output_dir, *overrides, model_json=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    args = [f"output_dir={output_dir}", *TINY_RUN, "xla_profile_step=-1", *overrides]  # (no profiler: not the point)
    return subprocess.Popen([sys.executable, str(REPO / "run_clm.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, process, timeout=600.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended before {what}: {process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def complete(run_dir, step) -> bool:
    return (Path(run_dir) / "checkpoints" / str(step) / checkpoint.COMMIT_MARKER).exists()


def finish(process) -> tuple[int, str]:
    output, _ = process.communicate(timeout=900)
    return process.returncode, output


def freeze_during_a_save(process, checkpoints: Path, after: int) -> int:
    """Stop the run (SIGSTOP) as soon as the directory of a save past step `after` appears; if
    that save is still being written (no commit marker), kill -9 the run right there and return
    its step; a save that had already finished lets the run go on (SIGCONT) to the next one."""
    seen = after
    while True:
        wait_for(lambda: max(checkpoint.step_directories(str(checkpoints)), default=0) > seen, process,
                 what=f"a save after step {seen} (every save finished before the run could be stopped)")
        process.send_signal(signal.SIGSTOP)
        step = max(checkpoint.step_directories(str(checkpoints)))
        if not (checkpoints / str(step) / checkpoint.COMMIT_MARKER).exists():
            process.send_signal(signal.SIGKILL)
            return step
        process.send_signal(signal.SIGCONT)
        seen = step


@dataclass
class Launch:
    code: int
    output: str
    steps: dict[int, bool]  # the checkpoints once it ended
    rows: list[tuple]  # metrics.jsonl's, once it ended
    mlperf: list[str]  # the MLPerf log's keys, once it ended


def ended(process, run_dir) -> Launch:
    code, output = finish(process)
    return Launch(code, output, checkpoint.step_directories(str(run_dir / "checkpoints")), rows(run_dir),
                  mlperf_keys(run_dir))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The shared run as real processes, stopped twice by real signals, each time resumed by the
    same command: SIGTERM in the step-0 eval (sent as soon as the MLPerf log shows it started:
    the process then compiles its eval graph, seconds, before its 27 batches; sent twice: the
    second, as if during the save, is only noted), then kill -9 in the middle of a save, then
    to the end. The tiny run's configuration, so each process compiles the smallest model
    again (XLA's CPU client cannot load programs)."""
    output_dir = tmp_path_factory.mktemp("interrupted")
    run_dir = output_dir / "moe_trial"
    checkpoints = run_dir / "checkpoints"
    mlperf_log = run_dir / "mlperf_compliance.log"
    launches = {}

    # Only the checkpoint SIGTERM saves (checkpoint_every may change on resume).
    process = launch(output_dir, "checkpoint_every=0")
    wait_for(lambda: mlperf_log.exists() and '"eval_start"' in mlperf_log.read_text(), process,
             what="the first eval's start")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    launches["sigterm"] = ended(process, run_dir)

    # Every checkpoint kept, to see which were complete.
    process = launch(output_dir, "checkpoints_to_keep=0")
    killed_at = freeze_during_a_save(process, checkpoints, after=max(launches["sigterm"].steps, default=0))
    launches["kill_9"] = ended(process, run_dir)

    launches["last"] = ended(launch(output_dir, "checkpoints_to_keep=0"), run_dir)
    return run_dir, killed_at, launches


@pytest.mark.slow
def test_sigterm_in_an_eval_cuts_it_short_saves_and_exits_75_even_when_sent_twice(interrupted):
    """Polled before every eval batch: the step is saved, the eval neither logged nor in the MLPerf log."""
    _, _, launches = interrupted
    sigterm = launches["sigterm"]
    assert sigterm.code == EXIT_PREEMPTED, sigterm.output[-3000:]
    assert sigterm.steps == {0: True}
    assert "step 0: preempted: eval cut short" in sigterm.output, sigterm.output[-3000:]
    assert sigterm.rows == []
    assert "run_start" in sigterm.mlperf and "eval_start" not in sigterm.mlperf


@pytest.mark.slow
def test_a_process_killed_during_a_save_resumes_from_the_previous_checkpoint(interrupted):
    _, killed_at, launches = interrupted
    kill_9, last = launches["kill_9"], launches["last"]
    assert kill_9.code == -signal.SIGKILL
    assert kill_9.steps[killed_at] is False
    previous = max(step for step, complete in kill_9.steps.items() if complete and step < killed_at)
    assert "resumed from" in kill_9.output and "(step 0)" in kill_9.output  # the SIGTERM's checkpoint
    assert kill_9.rows[0][0] == 0 and kill_9.rows[0][2] is not None  # it redid the eval it owed first
    assert last.code == 0, last.output[-3000:]
    assert f"checkpoints/{killed_at} is incomplete" in last.output, last.output[-3000:]
    assert "resumed from" in last.output and f"(step {previous})" in last.output
    assert all(last.steps.values()) and killed_at in last.steps and LAST in last.steps


@pytest.mark.slow
def test_after_sigterm_and_kill_9_the_same_command_continues_bitwise(interrupted, uninterrupted):
    """The evals included (the one SIGTERM cut short redone), and the MLPerf log is the
    uninterrupted run's, event for event, and passes the checker."""
    from clm.compliance import check

    run_dir, _, _ = interrupted
    assert rows(run_dir) == rows(uninterrupted.run_dir)
    assert_same_weights(run_dir / f"checkpoints/{LAST}", Path(uninterrupted.checkpoint_dir) / str(LAST))
    assert mlperf_keys(run_dir) == mlperf_keys(uninterrupted.run_dir)
    assert check(str(run_dir / "mlperf_compliance.log"), "dryrun").passed


@pytest.mark.slow
def test_bad_checkpoint_input_is_one_line_and_exit_2(tmp_path):
    code, output = finish(launch(tmp_path, "checkpoint_dir=/proc/clm-checkpoints"))
    assert code == EXIT_USER_ERROR
    assert output.strip().splitlines()[-1].startswith("error: checkpoint_dir: cannot write to /proc/clm-checkpoints")
    assert "Traceback" not in output
