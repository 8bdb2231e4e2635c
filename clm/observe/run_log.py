"""The run's reporting in one object: the trainer calls it at a few named points and it feeds
every writer from there.

It owns the MLPerf compliance log, metrics.jsonl with its TensorBoard and W&B mirrors, the
recompilation watch, the step clock, the FLOPs per token behind MFU, and the run's Summary.
The points, in the order a run reaches them:

    RunLog(cfg, ...)          init starts (MLPerf init_start); nothing is written yet
    run_config(...)           once the run is built: MLPerf's hyperparameter keys, FLOPs per token
    host_state()              what a checkpoint saves of it (resumed() after a restore)
    run_start()               the timed run begins
    train_block(samples)      before each train step (MLPerf block_start when none is open)
    after_train_step(...)     right after a step is cut: the step's row (on log steps) and its compiles
    eval_start / after_eval   around each evaluation (eval_abandoned instead when a stop request
                              cuts it short: nothing of it is reported)
    run_stop(samples, ok)     MLPerf run_stop
    summarize(...)            the Summary (print_summary prints its one line)
    close()                   the writers closed; runs from the trainer's `finally`

A step's row is written on the engine's thread (torch_xla's closure thread on XLA; clm.engine):
the step's values are one stacked tensor, read there in one device-to-host transfer that waits
for the device, and the row is stamped after that read (`perf/elapsed_seconds`): never before the step's values reached the
host, so never the time the host took to enqueue steps (it runs ahead of the device). What
that thread shares with the main thread (the step clock, the metrics writer, the Summary) is
behind one lock; the recompile count is the main thread's and goes to the row as of its step.
A busy host can run that thread late and bunch rows; each eval first waits for every queued
row, so the windows between evals end at a device sync, and the Summary's step time covers them.
To add a metric: compute it inside the step's graph, add it to the values the trainer passes
to `after_train_step` (one transfer for all), name it `area/name`; rows go to metrics.jsonl,
TensorBoard and W&B alike.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import torch

from clm.engine import Engine
from clm.metrics import MetricsWriter, mfu
from clm.model.plan import ModelPlan
from clm.observe import console
from clm.observe.mlperf import MLPerfLogger
from clm.observe.recompiles import RecompileWatch
from clm.observe.wandb_run import WandbRun

# Steps of a process whose timing includes compilation: the first compiles the step, and
# without optimizer priming the second is the first with optimizer state. Later steps are
# steady state.
WARMUP_STEPS = 2


@dataclass
class Summary:
    steps: int = 0
    stop_reason: str = "max_steps"
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    train_loss: float | None = None
    step_times: list[tuple[float, int]] = field(default_factory=list)  # (seconds per step, steps covered) per row
    tokens_per_step: int = 0
    mfu: float | None = None
    compiles: int = 0
    compiles_after_warmup: int = 0  # XLA compilations of a step kind past its warm-up (each one warned about)
    skipped_lines: int = 0  # corrupt JSON lines in this host's data files
    wall_seconds: float = 0.0

    @property
    def mean_step_time(self) -> float | None:
        """Seconds per step after warm-up, over all the steps the train rows cover.

        A row's step time ends when its step's values reach the host, which the closure thread
        can see late when it is busy, bunching a few rows; over many rows those shifts cancel
        out, hence a mean weighted by the steps each row covers rather than a median of rows.
        """
        if not self.step_times:
            return None
        return sum(t * n for t, n in self.step_times) / sum(n for _, n in self.step_times)


def print_summary(summary: Summary, run_dir: str) -> None:
    """The run's one summary line, `clm: key=value ...` (tools parse it; keys are never renamed)."""
    step_time = summary.mean_step_time
    tokens_per_sec = summary.tokens_per_step / step_time if step_time else None
    fields = {
        "steps": summary.steps,
        "stop": summary.stop_reason,
        "eval_loss": summary.eval_loss,
        "train_loss": summary.train_loss,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_sec,
        "mfu": summary.mfu,
        "compiles": summary.compiles,
        "compiles_after_warmup": summary.compiles_after_warmup,
        "skipped_lines": summary.skipped_lines,
        "wall_s": summary.wall_seconds,
        "run_dir": run_dir,
    }

    def fmt(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    if console.reports():
        console.say("clm: " + " ".join(f"{key}={fmt(value)}" for key, value in fields.items()))


class RunLog:
    def __init__(self, cfg, resolved_config: dict, engine: Engine, *, enabled: bool = True):
        """`enabled`: this process writes (process 0); the others only keep time and state.
        `engine` runs the rows' closures (Engine.run_async) and counts compilations."""
        self.cfg = cfg
        self.engine = engine
        self.origin = time.perf_counter()  # perf/elapsed_seconds counts from here (init start)
        self.mlperf = MLPerfLogger(os.path.join(cfg.run_dir, "mlperf_compliance.log"), enabled=enabled)
        self.mlperf.init_start()
        self.wandb = WandbRun(cfg.wandb, cfg.run_dir, resolved_config, enabled=enabled)
        self.metrics = MetricsWriter(cfg.run_dir, enabled=enabled, wandb_run=self.wandb)
        self.recompiles = RecompileWatch(engine.compile_count, engine.compile_analysis_file(),
                                         warmup={"train": WARMUP_STEPS, "eval": 1}, enabled=enabled)
        self.summary = Summary(tokens_per_step=cfg.global_train_batch_size * cfg.max_length)
        self._last_row = (0, self.origin)  # (step, time its values reached the host) of the last train row
        # Train rows are written on the engine's thread while the main thread goes on:
        # the step clock (_last_row), the metrics writer and the Summary change only under this lock.
        self._rows = threading.Lock()
        self._first_step = 0  # of this process: its first steps compile
        self._started = self.origin
        self._flops = (0.0, 0.0)  # (MaxText's, the reference's) training FLOPs per token
        self._devices, self._device_kind = 1, "CPU"

    def elapsed(self) -> float:
        """Seconds since this log was built, on the clock of `perf/elapsed_seconds`."""
        return time.perf_counter() - self.origin

    # ------------------------------------------------------------------ run start

    def run_config(self, *, optimizer_defaults: dict, warmup_steps: int, eval_samples: int, model_plan: ModelPlan,
                   num_devices: int) -> None:
        """The built run: MLPerf's submission and hyperparameter keys, and MFU's inputs (the model
        plan's FLOPs per token)."""
        self._devices, self._device_kind = num_devices, self.engine.device_kind()
        self.mlperf.run_config(
            self.cfg, optimizer_defaults=optimizer_defaults, warmup_steps=warmup_steps, eval_samples=eval_samples,
            aux_loss_coef=getattr(model_plan.hf_config, "router_aux_loss_coef", 0.0),
            platform=f"{self._device_kind}-{num_devices}")
        self._flops = (model_plan.flops_per_token, model_plan.reference_flops_per_token)

    def host_state(self) -> dict:
        """What checkpoints hold of the run's reporting, under the keys checkpoints have always used."""
        return {"metrics": self.metrics, "mlperf": self.mlperf, "wandb": self.wandb, "recompiles": self.recompiles}

    def resumed(self, step: int) -> None:
        """After a restore: this process's warm-up and step clock start at `step`."""
        self._first_step = step
        with self._rows:
            self._last_row = (step, time.perf_counter())

    def run_start(self) -> None:
        self._started = time.perf_counter()
        self.mlperf.run_start()

    def train_block(self, samples: int) -> None:
        self.mlperf.train_block(samples)

    # ------------------------------------------------------------------ steps

    def after_train_step(self, step: int, lr: float, keys: list[str], values: torch.Tensor, *,
                         skipped_lines: int) -> None:
        """Right after train step `step` was cut (torch_xla.sync): its compilations are counted
        and, on log steps, its row is queued for the closure thread. `values` is the step's
        stacked logged values (one per key), computed in every step's graph."""
        self.recompiles.observe("train", step)
        if step % self.cfg.log_frequency == 0 or step == self.cfg.max_steps:
            # The recompile watch is the main thread's: the row gets its count as of this step,
            # not of whatever step the main thread has reached when the closure runs.
            self.engine.run_async(self._train_row, step, lr, keys, values, skipped_lines, self.recompiles.after_warmup)

    def _train_row(self, step: int, lr: float, keys: list[str], device_values: torch.Tensor,
                   skipped_lines: int, compiles_after_warmup: int) -> None:
        """On the engine's thread: one transfer, which waits for the device to finish the step."""
        values = dict(zip(keys, device_values.cpu().tolist()))
        arrived = time.perf_counter()  # the step's values are on the host: the row's time, after the read
        values["train/num_tokens"] = int(values["train/num_tokens"])
        with self._rows:
            last_step, last_time = self._last_row
            self._last_row = (step, arrived)
            step_time = (arrived - last_time) / (step - last_step)
            tokens_per_sec = values["train/num_tokens"] / step_time
            flops, reference_flops = self._flops
            values.update({
                "train/lr": lr,
                "perf/step_time_seconds": step_time,
                "perf/tokens_per_sec": tokens_per_sec,
                "perf/tokens_per_sec_per_device": tokens_per_sec / self._devices,
                "perf/mfu": mfu(flops, tokens_per_sec, self._devices, self._device_kind),
                "perf/reference_mfu": mfu(reference_flops, tokens_per_sec, self._devices, self._device_kind),
                "perf/elapsed_seconds": arrived - self.origin,
                "data/skipped_lines": skipped_lines,
                "xla/compiles_after_warmup": compiles_after_warmup,
            })
            self.metrics.write(step, values)
            self.summary.train_loss = values["train/loss"]
            if last_step - self._first_step >= WARMUP_STEPS:
                self.summary.step_times.append((step_time, step - last_step))
                self.summary.mfu = values["perf/mfu"]

    def flush(self) -> None:
        """Block until every queued train row has been written (before a checkpoint saves the writers)."""
        self.engine.wait_for_async()

    def eval_start(self, samples: int) -> None:
        # The queued train rows first, so that every training window ends here, once the host
        # has the values of every step before the eval (a device sync), and excludes eval time.
        # A row is never stamped before its values arrived, but on a busy host the closure thread
        # runs late: in the default job on 2 shared cores the last 3-4 rows before each eval were
        # stamped within 10 ms of each other. Single rows can be bunched; windows between evals
        # (the summary's step time) are honest.
        self.flush()
        self.mlperf.eval_start(samples)

    def after_eval(self, step: int, samples: int, eval_loss: float, *, num_tokens: int, skipped_lines: int) -> None:
        """An evaluation ended (its loss is on the host): its row, MLPerf's eval keys, the console line."""
        self.recompiles.observe("eval", step)
        self.mlperf.eval_stop(samples, eval_loss)
        self.flush()  # rows in step order: this step's train row first
        with self._rows:
            self.metrics.write(step, {"eval/loss": eval_loss, "eval/num_tokens": num_tokens,
                                      "data/eval_skipped_lines": skipped_lines})
            console.say(f"step {step}: eval/loss={eval_loss:.4f}")
            # Eval time is not training time: the next row's step time starts here, when the
            # device is idle (the eval loss has reached the host).
            self._last_row = (step, time.perf_counter())

    def eval_abandoned(self, step: int, stop_request: str) -> None:
        """A stop request cut the eval short: no row, no eval_accuracy, and its MLPerf lines taken
        back, so the checkpoint of this step holds the logs as they were before it; the run that
        resumes from it redoes the eval."""
        self.mlperf.eval_abandoned()
        console.say(f"step {step}: {stop_request}: eval cut short, not reported (the resumed run redoes it)")

    # ------------------------------------------------------------------ run end

    def run_stop(self, samples: int, success: bool) -> None:
        self.mlperf.run_stop(samples, success=success)

    def summarize(self, loop, stop_reason: str, *, skipped_lines: int) -> Summary:
        """The run's Summary, once every row has been written."""
        self.flush()
        with self._rows:
            s = self.summary
            s.stop_reason, s.steps = stop_reason, loop.step
            s.eval_loss, s.best_eval_loss = loop.eval_loss, loop.best_eval_loss
            s.wall_seconds = time.perf_counter() - self._started
            s.compiles, s.compiles_after_warmup = self.engine.compile_count(), self.recompiles.after_warmup
            s.skipped_lines = skipped_lines
        return s

    def close(self) -> None:
        """Close every writer, after the rows still queued (also when the run failed: a row
        written after its file closed would reopen, and truncate, metrics.jsonl)."""
        try:
            self.flush()
        finally:
            with self._rows:  # when the wait was cut short, after the row being written
                self.metrics.close()
            self.mlperf.close()
            self.wandb.finish()
