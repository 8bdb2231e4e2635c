"""The trainer: build everything from the config, restore a checkpoint when resuming, start,
then train, evaluate, checkpoint and report.

XLA discipline: every step is traced lazily and cut with torch_xla.sync(); a step's logged
values are one stacked tensor in every step's graph, read on log steps by one asynchronous
step closure (one device-to-host transfer, on torch_xla's closure thread), and the eval loss
once per eval for the stop check, so a step never waits on the host and never recompiles
after warm-up. Checkpoints and stop requests are handled between steps (`end_step`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from clm import checkpoint, data, parallel, plan, runtime, storage
from clm.checkpoint import Checkpointer, RNGState
from clm.errors import EXIT_OK, EXIT_PREEMPTED
from clm.metrics import MetricsWriter, mfu, reference_flops_per_token, training_flops_per_token
from clm.model.build import build_sharded_model, check_model
from clm.model.config import load_model_config
from clm.observe.mlperf import MLPerfLogger
from clm.observe.recompiles import RecompileWatch
from clm.observe.wandb_run import WandbRun
from clm.optim import build_optimizer, build_scheduler, prime_optimizer, warmup_steps
from clm.preemption import StopRequests
from clm.secrets import redact

# Steps of a process whose timing includes compilation: the first compiles the step, and
# without optimizer priming the second is the first with optimizer state. Later steps are
# steady state.
WARMUP_STEPS = 2


@dataclass
class LoopState:
    """Where the loop stands; saved in every checkpoint, so a resumed run continues from it."""

    step: int = 0  # optimizer steps done
    target_reached: bool = False
    eval_step: int | None = None  # step of the last evaluation
    eval_loss: float | None = None  # of the last evaluation
    best_eval_loss: float | None = None

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)

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

        A row's step time ends when the logging thread sees its values, so a busy host can
        bunch a few rows together; over many rows those shifts cancel out, hence a mean
        weighted by the steps each row covers rather than a median of rows.
        """
        if not self.step_times:
            return None
        return sum(t * n for t, n in self.step_times) / sum(n for _, n in self.step_times)


class Trainer:
    """Build (everything from the config; nothing written) -> restore (a checkpoint, when
    resuming) -> start (files, data thread, SIGTERM handler) -> train."""

    def __init__(self, cfg: DictConfig, hf_config, mesh_shape: parallel.MeshShape, resume_from: str | None = None):
        import torch_xla.distributed.spmd as xs

        runtime.setup(cfg.local_compile_cache_dir, cfg.full_precision)
        self.cfg = cfg
        self.hf_config = hf_config
        self.num_devices = mesh_shape.num_devices
        self.is_main = runtime.is_main_process()
        self.resume_from = resume_from
        self.mlperf = MLPerfLogger(os.path.join(cfg.run_dir, "mlperf_compliance.log"), enabled=self.is_main)
        self.mlperf.init_start()
        self.resolved_config = redact(OmegaConf.to_container(cfg, resolve=True))  # no secret reaches a file or W&B

        self.tokenizer = data.tokenizer_for(cfg, hf_config.vocab_size)  # None for pre-tokenized data

        self.model = build_sharded_model(cfg, mesh_shape, hf_config)
        self.mesh = self.model.mesh
        # Several hosts each pass their own rows (minibatch); one host passes the whole batch.
        self.input_sharding = xs.ShardingSpec(self.mesh, parallel.batch_spec(), minibatch=runtime.process_count() > 1)
        if cfg.checkpoint_manager_path and not resume_from:
            checkpoint.restore_model_weights(self.model.module, cfg.checkpoint_manager_path)
        self.optimizer = build_optimizer(cfg, self.model.module)
        # A checkpoint loads into existing optimizer state, so a resumed run primes too;
        # the restore then overwrites what priming did.
        if cfg.prime_optimizer or resume_from:
            prime_optimizer(self.optimizer)
        self.scheduler = build_scheduler(cfg, self.optimizer)

        process = dict(process_index=runtime.process_index(), process_count=runtime.process_count())
        self.train_batches = data.build_train_stream(cfg, self.tokenizer, **process)
        self.eval_set = data.build_eval_set(cfg, self.tokenizer, **process)

        self.wandb = WandbRun(cfg.wandb, cfg.run_dir, self.resolved_config, enabled=self.is_main)
        self.metrics = MetricsWriter(cfg.run_dir, enabled=self.is_main, wandb_run=self.wandb)
        self.recompiles = RecompileWatch(runtime.compile_count, runtime.enable_compile_analysis(),
                                         warmup={"train": WARMUP_STEPS, "eval": 1}, enabled=self.is_main)
        self.mlperf.run_config(
            cfg, optimizer_defaults=self.optimizer.defaults, warmup_steps=warmup_steps(cfg.sched),
            eval_samples=self.eval_set.num_blocks, aux_loss_coef=getattr(hf_config, "router_aux_loss_coef", 0.0),
            platform=f"{runtime.device_kind()}-{self.num_devices}")
        num_params = sum(p.numel() for p in self.model.parameters())
        self.flops_per_token = training_flops_per_token(self.hf_config, cfg.max_length)
        self.reference_flops_per_token = reference_flops_per_token(self.hf_config, num_params)
        self.device_kind = runtime.device_kind()
        self.summary = Summary(tokens_per_step=cfg.global_train_batch_size * cfg.max_length)
        self.loop = LoopState()
        self.checkpointer = Checkpointer(cfg, self.model.module, self.optimizer, process_index=runtime.process_index(), host_state={
            "loop": self.loop, "scheduler": self.scheduler, "data": self.train_batches, "rng": RNGState(),
            "metrics": self.metrics, "mlperf": self.mlperf, "wandb": self.wandb, "recompiles": self.recompiles,
        })
        self.stop_requests = StopRequests(cfg.kill_switch_path, **process)
        self._last_log = (0, time.perf_counter())  # (step, time) of the last train row
        self._first_step = 0  # of this process: its first steps compile

    def restore(self) -> None:
        """Continue from `resume_from`: weights, optimizer, schedule, data position, RNGs, logs."""
        if self.resume_from:
            step = self.checkpointer.restore(self.resume_from)
            self._last_log = (step, time.perf_counter())
            self._first_step = step
            finished = step >= self.cfg.max_steps or self.loop.target_reached
            tqdm.write(f"resumed from {self.resume_from} (step {step})" + (
                "; that run is complete: raise max_steps (with sched.max_steps pinned), or set resume=never "
                "or a new exp_name to train anew" if finished else ""), file=sys.stdout)

    def start(self) -> None:
        """Write the run's config (secrets redacted), start producing data (the shuffle buffer
        fills while the first step compiles) and catching SIGTERM."""
        if self.is_main:
            os.makedirs(self.cfg.run_dir, exist_ok=True)
            OmegaConf.save(OmegaConf.create(self.resolved_config), os.path.join(self.cfg.run_dir, "config.yaml"))
        self.train_batches.start()
        self.stop_requests.install()

    # ------------------------------------------------------------------ the loop

    def train(self) -> Summary:
        cfg, loop = self.cfg, self.loop
        started = time.perf_counter()
        progress = tqdm(initial=loop.step, total=cfg.max_steps, desc="train", unit="step", disable=not self.is_main,
                        file=sys.stdout)
        self.mlperf.run_start()
        if loop.step == 0 and cfg.do_first_eval:
            self.evaluate()
        stop_request = None
        while loop.step < cfg.max_steps and not loop.target_reached and stop_request is None:
            self.mlperf.train_block(self.samples_seen)
            if loop.step + 1 == cfg.xla_profile_step:
                self.profile_step()
            else:
                self.train_step()
            self.recompiles.observe("train", loop.step)
            progress.update(1)
            if loop.step % cfg.eval_frequency == 0:
                self.evaluate()
            stop_request = self.end_step()
        progress.close()
        if stop_request is None:
            if loop.eval_step != loop.step:
                self.evaluate()  # the final one: the summary, the report and the MLPerf log end on this step
            self.mlperf.run_stop(self.samples_seen, success=loop.target_reached)
            self.checkpointer.save(loop.step, blocking=True)  # the final state, always
        self.checkpointer.close()
        runtime.wait_for_async_closures()
        self.summary.stop_reason = stop_request or ("target_reached" if loop.target_reached else "max_steps")
        self.summary.steps = loop.step
        self.summary.eval_loss, self.summary.best_eval_loss = loop.eval_loss, loop.best_eval_loss
        self.summary.wall_seconds = time.perf_counter() - started
        self.summary.compiles = runtime.compile_count()
        self.summary.compiles_after_warmup = self.recompiles.after_warmup
        self.summary.skipped_lines = self.train_batches.stats["skipped_lines"] + self.eval_set.stats["skipped_lines"]
        self.train_batches.close()
        self.metrics.close()
        self.mlperf.close()
        self.wandb.finish()
        self.stop_requests.uninstall()
        return self.summary

    def end_step(self) -> str | None:
        """The one point between steps where the run checkpoints and may stop: a stop request
        (SIGTERM, the kill switch) saves at once and ends the loop with its reason."""
        stop_request = self.stop_requests.poll()
        if stop_request:
            self.checkpointer.save(self.loop.step, blocking=True)
            tqdm.write(f"step {self.loop.step}: {stop_request}: checkpoint saved, exiting with code "
                       f"{EXIT_PREEMPTED} (run the same command to resume)", file=sys.stdout)
        else:
            self.checkpointer.maybe_save(self.loop.step)
        return stop_request

    @property
    def samples_seen(self) -> int:
        """Training sequences so far (MLPerf's samples_count)."""
        return self.loop.step * self.cfg.global_train_batch_size

    def train_step(self) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        cfg = self.cfg
        self.model.train()
        accum = cfg.gradient_accumulation_steps
        lm_losses, aux_losses, tokens = [], [], []
        for micro_step in range(accum):
            input_ids, labels = self.to_device(next(self.train_batches))
            terms = self.model.loss_terms(input_ids, labels, cfg.pad_token_id)
            (terms.loss / accum).backward()
            lm_losses.append(terms.lm_loss.detach())
            aux_losses.append(terms.aux_loss.detach())
            tokens.append((input_ids != cfg.pad_token_id).sum())  # every input (inputs are never pad_token_id)
            if micro_step < accum - 1:
                # One graph per micro-batch keeps one micro-batch of activations alive.
                torch_xla.sync()

        grad_norm = clip_grad_norm(self.model, cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.model.update_router_bias()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loop.step += 1
        step = self.loop.step

        # Every step's graph computes and keeps the logged values (a few tiny ops), so log
        # steps and the others run one and the same compiled graph.
        lm_loss = torch.stack(lm_losses).mean()
        aux_loss = torch.stack(aux_losses).mean()
        device_values = {
            "train/loss": lm_loss + terms.aux_loss_coef * aux_loss,
            "train/lm_loss": lm_loss,
            "train/aux_loss": aux_loss,
            "train/grad_norm": grad_norm,
            "train/num_tokens": torch.stack(tokens).sum(),  # float32 below: exact up to 2^24 tokens a step
            **terms.router_metrics,  # of the last micro-batch
        }
        step_values = torch.stack([value.float() for value in device_values.values()])
        if step % cfg.log_frequency == 0 or step == cfg.max_steps:
            xm.add_step_closure(self._log_train, args=(step, lr, list(device_values), step_values),
                                run_async=True)
        torch_xla.sync()

    def profile_step(self) -> None:
        """One train step under torch_xla's profiler, into run_dir/profile (view with TensorBoard)."""
        import torch_xla.core.xla_model as xm
        import torch_xla.debug.profiler as xp

        xp.start_trace(os.path.join(self.cfg.run_dir, "profile"))
        self.train_step()
        xm.wait_device_ops()  # the trace must cover the device's execution, not just its launch
        xp.stop_trace()
        tqdm.write(f"step {self.loop.step}: profile written to {self.cfg.run_dir}/profile", file=sys.stdout)

    def evaluate(self) -> None:
        """Token-weighted mean loss over every scored label of the validation set."""
        import torch_xla

        self.mlperf.eval_start(self.samples_seen)
        self.model.eval()
        loss_sums, counts = [], []
        with torch.no_grad():
            for batch in self.eval_set.batches():
                input_ids, labels = self.to_device(batch)
                terms = self.model.loss_terms(input_ids, labels, self.cfg.pad_token_id)
                loss_sums.append(terms.loss_sum)
                counts.append(terms.num_scored)
                torch_xla.sync()
        eval_loss = (torch.stack(loss_sums).sum() / torch.stack(counts).sum()).item()
        self.model.train()
        self.recompiles.observe("eval", self.loop.step)

        self.mlperf.eval_stop(self.samples_seen, eval_loss)
        loop = self.loop
        loop.eval_step, loop.eval_loss = loop.step, eval_loss
        loop.best_eval_loss = min(eval_loss, loop.best_eval_loss or eval_loss)
        runtime.wait_for_async_closures()  # rows in step order: this step's train row first
        self.metrics.write(loop.step, {
            "eval/loss": eval_loss,
            "eval/num_tokens": self.eval_set.num_tokens,
            "data/eval_skipped_lines": self.eval_set.stats["skipped_lines"],
        })
        tqdm.write(f"step {loop.step}: eval/loss={eval_loss:.4f}", file=sys.stdout)
        target = self.cfg.target_eval_loss
        if target > 0 and eval_loss <= target:
            loop.target_reached = True
        # Eval time is not training time: restart the step clock.
        self._last_log = (loop.step, time.perf_counter())

    # --------------------------------------------------------------- helpers

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Host arrays of this process's rows -> one global array sharded on batch."""
        import torch_xla
        import torch_xla.core.xla_model as xm

        tensors = [torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["labels"]).long()]
        input_ids, labels = xm.send_cpu_data_to_device(tensors, torch_xla.device(), self.input_sharding)
        return input_ids, labels

    def _log_train(self, step: int, lr: float, keys: list[str], device_values: torch.Tensor) -> None:
        """Runs as an asynchronous step closure, on torch_xla's closure thread: one transfer for the step's values."""
        values = dict(zip(keys, device_values.cpu().tolist()))
        values["train/num_tokens"] = int(values["train/num_tokens"])
        last_step, last_time = self._last_log
        now = time.perf_counter()
        step_time = (now - last_time) / (step - last_step)
        self._last_log = (step, now)
        tokens_per_sec = values["train/num_tokens"] / step_time
        values.update({
            "train/lr": lr,
            "perf/step_time_seconds": step_time,
            "perf/tokens_per_sec": tokens_per_sec,
            "perf/tokens_per_sec_per_device": tokens_per_sec / self.num_devices,
            "perf/mfu": mfu(self.flops_per_token, tokens_per_sec, self.num_devices, self.device_kind),
            "perf/reference_mfu": mfu(self.reference_flops_per_token, tokens_per_sec, self.num_devices, self.device_kind),
            "data/skipped_lines": self.train_batches.stats["skipped_lines"],
            "xla/compiles_after_warmup": self.recompiles.after_warmup,
        })
        self.metrics.write(step, values)
        self.summary.train_loss = values["train/loss"]
        if last_step - self._first_step >= WARMUP_STEPS:
            self.summary.step_times.append((step_time, step - last_step))
            self.summary.mfu = values["perf/mfu"]


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping; clips only when max_grad_norm > 0 (as the reference)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def print_summary(cfg: DictConfig, summary: Summary) -> None:
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
        "run_dir": cfg.run_dir,
    }

    def fmt(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    print("clm: " + " ".join(f"{key}={fmt(value)}" for key, value in fields.items()), flush=True)


def train(cfg: DictConfig) -> Summary:
    """Check every input, then build, restore, start and train. Nothing is written over and
    nothing is compiled before the checks pass."""
    num_devices = runtime.device_count()
    data.validate_dataset(cfg)
    if cfg.checkpoint_manager_path:
        checkpoint.check_path(cfg.checkpoint_manager_path)
    resume_from = checkpoint.resume_directory(cfg)
    if resume_from:
        checkpoint.check_config_matches(cfg, resume_from)
    hf_config = load_model_config(cfg)
    slices = parallel.runtime_num_slices() if cfg.num_slices == -1 else cfg.num_slices
    mesh_shape = parallel.mesh_shape(num_devices, cfg.tensor_parallelism, cfg.expert_parallelism, slices)
    check_model(cfg, hf_config, mesh_shape)
    parallel.check_multihost_input(mesh_shape)
    plan.preflight(cfg, hf_config, mesh_shape, runtime.device_type(), runtime.device_kind())
    # Last, since they create the directories when they can.
    storage.check_writable(cfg.run_dir, "output_dir")
    storage.check_writable(cfg.checkpoint_dir, "checkpoint_dir")
    trainer = Trainer(cfg, hf_config, mesh_shape, resume_from)
    trainer.restore()
    trainer.start()
    summary = trainer.train()
    print_summary(cfg, summary)
    return summary


def exit_code(summary: Summary) -> int:
    """EXIT_PREEMPTED when a stop request ended the run (a checkpoint was saved), else EXIT_OK."""
    return EXIT_PREEMPTED if summary.stop_reason in ("preempted", "kill_switch") else EXIT_OK
