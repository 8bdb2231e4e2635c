"""Training end to end on XLA's CPU backend (8 virtual devices, SPMD): the loss falls, metrics
are written as documented, eval cadence and early stop hold, and after warm-up a step
neither recompiles nor talks to the host outside log steps."""

import json
import math
import threading
from pathlib import Path

import pytest
import torch
import torch_xla.debug.metrics as met
from omegaconf import OmegaConf

import clm.model.config
from clm import runtime
from clm.engine.xla import XlaEngine
from clm.train import Trainer, train
from runs import GROUP, config

pytestmark = pytest.mark.xdist_group(GROUP)

TRAIN_KEYS = {"step", "train/loss", "train/lr", "train/grad_norm", "train/num_tokens",
              "perf/step_time_seconds", "perf/tokens_per_sec", "perf/mfu", "moe/drop_fraction"}


def rows(cfg):
    with open(f"{cfg.run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_default_job_loss_falls_and_metrics_are_documented(tiny_run):
    """The shared run (tests/runs.py): 10 steps of 8 x 64 tokens, evals at 0, 4, 8 and 10, step 3 profiled."""
    cfg, summary = tiny_run
    run_dir = Path(cfg.run_dir)

    metrics = rows(cfg)
    evals = [r for r in metrics if "eval/loss" in r]
    trains = [r for r in metrics if "train/loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 10]
    assert [r["step"] for r in trains] == list(range(1, 11))
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 1.0  # starts near ln(32000) = 10.37
    assert trains[-1]["train/loss"] < trains[0]["train/loss"] - 1.0
    assert abs(evals[0]["eval/loss"] - math.log(32000)) < 0.3
    for row in trains:
        assert TRAIN_KEYS <= row.keys()
        assert row["train/num_tokens"] == 8 * 64
        assert 0.0 <= row["moe/drop_fraction"] < 1.0
        assert row["perf/mfu"] is None  # no peak FLOP/s is known for a CPU: no made-up MFU
    assert summary.steps == 10 and summary.stop_reason == "max_steps"
    assert summary.eval_loss == evals[-1]["eval/loss"]

    assert list((run_dir / "profile").rglob("*.xplane.pb")), "no profile of step 3"
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.global_train_batch_size == 8 and saved.run_dir == cfg.run_dir
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_stops_with_success_at_the_first_eval_at_or_below_target(tmp_path):
    cfg = config(tmp_path, "max_steps=40", "eval_frequency=4", "target_eval_loss=9.6", "lr=3e-3")
    summary = train(cfg)
    evals = [r for r in rows(cfg) if "eval/loss" in r]
    assert summary.stop_reason == "target_reached"
    assert summary.steps < 40 and summary.steps % 4 == 0
    assert evals[-1]["eval/loss"] <= 9.6 < min(r["eval/loss"] for r in evals[:-1]) if len(evals) > 1 else True
    assert summary.steps == evals[-1]["step"]


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches of 8 then an optimizer step = one batch of 16 (same blocks, same order).

    The load-balancing loss is a product of batch-pooled fractions, so per micro-batch it
    differs from the whole batch's (in the reference too); it is switched off here so that
    the comparison is of the additive part, which must agree to float precision.
    """
    model_json = json.loads((Path(clm.model.config.CONFIGS_DIR) / "mixtral_tiny.json").read_text())
    model_json["router_aux_loss_coef"] = 0.0
    (tmp_path / "tiny_no_aux.json").write_text(json.dumps(model_json))
    losses = {}
    for accum in (1, 2):
        cfg = config(tmp_path / f"accum{accum}", "global_train_batch_size=16", f"gradient_accumulation_steps={accum}",
                     "max_steps=3", "eval_frequency=100", "do_first_eval=false",
                     f"model.config_path={tmp_path / 'tiny_no_aux.json'}")
        train(cfg)
        losses[accum] = [value for r in rows(cfg) if "train/loss" in r for value in (r["train/loss"], r["train/grad_norm"])]
    assert len(losses[1]) == 6
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)


def count(name):
    data = met.metric_data(name)
    return data[0] if data else 0


@pytest.mark.slow
def test_after_warmup_no_recompilation_and_no_host_transfer_outside_log_steps(tmp_path):
    """log_frequency=3: log steps and the others run one and the same train-step graph, and a
    log step's values leave the device in one transfer, inside its asynchronous closure."""
    cfg = config(tmp_path, "max_steps=20", "log_frequency=3", "eval_frequency=100", "do_first_eval=false",
                 "gradient_accumulation_steps=2", "global_train_batch_size=16", "wandb.mode=disabled")
    from clm.model.plan import ModelPlan
    from clm.parallel import mesh_shape

    trainer = Trainer(ModelPlan.from_config(cfg, mesh_shape(runtime.device_count(), 1, 1, 1)), XlaEngine())
    for _ in range(2):  # warm-up: a step without, then with optimizer state
        trainer.train_step()
    trainer.engine.wait_for_async()
    for step in range(3, 13):  # log steps 3, 6, 9, 12 and the steps between
        compiles, transfers = count("CompileTime"), count("TransferFromDeviceTime")
        trainer.train_step()
        trainer.engine.wait_for_async()  # the closure's transfer, if any, has happened
        assert count("CompileTime") == compiles, f"step {step} compiled a graph of its own"
        expected = 0 if step % cfg.log_frequency else 1
        assert count("TransferFromDeviceTime") - transfers == expected, f"step {step}: device-to-host transfers"
    trainer.close()
    assert [r["step"] for r in rows(cfg)] == [3, 6, 9, 12]


@pytest.mark.slow
def test_a_rows_time_is_when_its_steps_values_reached_the_host(tmp_path):
    """The host queues steps ahead of the device, so a row timed on the host when its step was
    queued would report the enqueue rate. A row is stamped on the closure thread, after its
    step's values were read there: hold that thread back until after the step has been queued
    and the device has finished it, and the row's time still comes after the release. Step
    times (and tokens/s) are the differences of those stamps. Order of events only, no speeds."""
    import torch_xla.core.xla_model as xm

    from clm.model.plan import ModelPlan
    from clm.parallel import mesh_shape

    cfg = config(tmp_path, "max_steps=10", "eval_frequency=100", "do_first_eval=false", "wandb.mode=disabled")
    trainer = Trainer(ModelPlan.from_config(cfg, mesh_shape(runtime.device_count(), 1, 1, 1)), XlaEngine())
    try:
        for _ in range(2):
            trainer.train_step()
        trainer.engine.wait_for_async()
        gate = threading.Event()
        trainer.engine.run_async(gate.wait)  # the closure thread waits here; step 3's row queues behind it
        trainer.train_step()
        queued = trainer.log.elapsed()
        xm.wait_device_ops()  # the device is done with step 3: its values could be read from now on
        released = trainer.log.elapsed()
        gate.set()
        trainer.engine.wait_for_async()
    finally:
        trainer.close()
    trains = [r for r in rows(cfg) if "train/loss" in r]
    assert [r["step"] for r in trains] == [1, 2, 3]
    assert trains[2]["perf/elapsed_seconds"] >= released > queued
    for before, row in zip(trains, trains[1:]):
        assert row["perf/step_time_seconds"] == pytest.approx(
            row["perf/elapsed_seconds"] - before["perf/elapsed_seconds"], rel=1e-6, abs=1e-6)
        assert row["perf/tokens_per_sec"] == pytest.approx(row["train/num_tokens"] / row["perf/step_time_seconds"])


@pytest.mark.slow
def test_checkpoint_manager_path_starts_from_the_saved_weights(tmp_path):
    """The reference's initial-weights checkpoint: CheckpointManager.save(0, {"model": ...})."""
    import torch.distributed as dist
    from torch_xla.experimental.distributed_checkpoint import CheckpointManager

    from clm.model.plan import ModelPlan
    from clm.parallel import mesh_shape

    def build(output_dir, *overrides):
        # Without priming, whose weight decay would move the weights after the load.
        cfg = config(output_dir, *overrides, "prime_optimizer=false")
        trainer = Trainer(ModelPlan.from_config(cfg, mesh_shape(runtime.device_count(), 1, 1, 1)), XlaEngine())
        trainer.train_batches.close()
        return {name: p.detach().cpu() for name, p in trainer.model.named_parameters()}, trainer

    saved, trainer = build(tmp_path / "source", "seed=7")
    runtime.init_process_group()
    manager = CheckpointManager(str(tmp_path / "weights"), save_interval=1, process_group=dist.group.WORLD,
                                chkpt_on_preemption=False)  # the reference's own tool
    manager.save(0, {"model": trainer.model.state_dict()}, force=True)

    fresh, _ = build(tmp_path / "fresh", "seed=0")
    restored, _ = build(tmp_path / "restored", "seed=0", f"checkpoint_manager_path={tmp_path / 'weights'}")
    assert not torch.equal(fresh["lm_head.weight"], saved["lm_head.weight"])
    for name, value in saved.items():
        assert torch.equal(restored[name], value), name


def test_missing_checkpoint_manager_path_is_one_line_before_anything_runs(tmp_path):
    from clm.errors import UserError

    with pytest.raises(UserError, match=r"checkpoint_manager_path=.*no_such_dir: no such directory"):
        train(config(tmp_path, f"checkpoint_manager_path={tmp_path / 'no_such_dir'}"))
    assert not (tmp_path / "moe_trial").exists()
