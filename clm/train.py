"""The trainer: build everything from the config, restore a checkpoint when resuming, start,
then train, evaluate, checkpoint and report.

Written once for every engine (clm.engine: XLA SPMD, DTensor), which it calls at the points
where they differ: set up processes and devices, build the sharded model, move a batch to the
devices, cut a step (`engine.cut()`: on XLA the lazily traced step is compiled and launched),
hand a log step's values to the run log's thread, profile a step. A step's logged values are
one stacked tensor computed in every step, read on log steps by the run log on the engine's
thread (one device-to-host transfer), and the eval loss once per eval for the stop check, so
a step never waits on the host (and on XLA never recompiles after warm-up). Checkpoints and
stop requests are handled between steps (`end_step`); stop requests also before each eval batch,
so an eval never holds up a preemption: it is cut short, unreported, and the step saved, and the
resumed run redoes it (`eval_due`). Everything the run reports goes through `self.log`
(clm.observe.run_log.RunLog).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from clm import checkpoint, data, parallel, plan, storage
from clm.engine import Engine, build_engine
from clm.errors import EXIT_OK, EXIT_PREEMPTED
from clm.model.plan import ModelPlan
from clm.observe import console
from clm.observe.run_log import RunLog, Summary, print_summary
from clm.optim import build_optimizer, build_scheduler, warmup_steps
from clm.preemption import StopRequests
from clm.secrets import redact


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

    def record_eval(self, eval_loss: float, target: float) -> None:
        """An evaluation at this step; the target (0 = none) is reached at or below it."""
        self.eval_step, self.eval_loss = self.step, eval_loss
        self.best_eval_loss = eval_loss if self.best_eval_loss is None else min(eval_loss, self.best_eval_loss)
        self.target_reached = self.target_reached or (target > 0 and eval_loss <= target)


class Trainer:
    """Build (everything from the config; nothing written) -> restore (a checkpoint, when
    resuming) -> start (files, data thread, SIGTERM handler) -> train -> close (always)."""

    def __init__(self, model_plan: ModelPlan, engine: Engine, resume_from: str | None = None):
        """`model_plan`: the run's model, checked (clm.model.plan); its cfg is the run's config.
        `engine`: the one of cfg.backend (clm.engine.build_engine), checked against the plan."""
        cfg = model_plan.cfg
        self.model_plan, self.engine = model_plan, engine
        engine.setup(cfg)
        self.cfg, self.resume_from = cfg, resume_from
        self.is_main = engine.process_index() == 0
        self.resolved_config = redact(OmegaConf.to_container(cfg, resolve=True))  # no secret reaches a file or W&B
        self.log = RunLog(cfg, self.resolved_config, engine, enabled=self.is_main)  # init starts (MLPerf's clock)

        self.tokenizer = data.tokenizer_for(cfg, model_plan.hf_config.vocab_size)  # None for pre-tokenized data
        self.model = engine.build_model(model_plan)
        if cfg.checkpoint_manager_path and not resume_from:
            engine.load_weights(self.model, cfg.checkpoint_manager_path)
        self.optimizer = build_optimizer(cfg, self.model.module, engine.optimizer_class(cfg.optimizer))
        # A checkpoint loads into existing optimizer state, so a resumed run primes too;
        # the restore then overwrites what priming did.
        if cfg.prime_optimizer or resume_from:
            engine.prime_optimizer(self.optimizer)
        self.scheduler = build_scheduler(cfg, self.optimizer)

        process = dict(process_index=engine.process_index(), process_count=engine.process_count())
        rows = dict(zip(("process_index", "process_count"), engine.data_shard()))  # tensor ranks share rows
        self.train_batches = data.build_train_stream(cfg, self.tokenizer, **rows)
        self.eval_set = data.build_eval_set(cfg, self.tokenizer, **rows)
        self.log.run_config(optimizer_defaults=self.optimizer.defaults, warmup_steps=warmup_steps(cfg.sched),
                            eval_samples=self.eval_set.num_blocks, model_plan=model_plan,
                            num_devices=model_plan.mesh_shape.num_devices)
        self.loop = LoopState()
        self.checkpointer = engine.checkpointer(cfg, self.model, self.optimizer,
                                                host_state={"loop": self.loop, "scheduler": self.scheduler,
                                                            "data": self.train_batches, "rng": engine.rng_state(),
                                                            **self.log.host_state()},
                                                before_save=self.log.flush)
        self.stop_requests = StopRequests(cfg.kill_switch_path, **process)

    def restore(self) -> None:
        """Continue from `resume_from`: weights, optimizer, schedule, data position, RNGs, logs."""
        if self.resume_from:
            step = self.checkpointer.restore(self.resume_from)
            self.log.resumed(step)
            finished = step >= self.cfg.max_steps or self.loop.target_reached
            console.say(f"resumed from {self.resume_from} (step {step})" + (
                "; that run is complete: raise max_steps (with sched.max_steps pinned), or set resume=never "
                "or a new exp_name to train anew" if finished else ""))

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
        progress = tqdm(initial=loop.step, total=cfg.max_steps, desc="train", unit="step", disable=not self.is_main,
                        file=sys.stdout)
        self.log.run_start()
        # Step 0's first eval, or the eval a stop request cut short before this run's checkpoint.
        stop_request = self.evaluate() if self.eval_due() else None
        while loop.step < cfg.max_steps and not loop.target_reached and stop_request is None:
            self.log.train_block(self.samples_seen)
            if loop.step + 1 == cfg.xla_profile_step:
                self.profile_step()
            else:
                self.train_step()
            progress.update(1)
            stop_request = (self.evaluate() if self.eval_due() else None) or self.end_step()
        progress.close()
        if stop_request is None and loop.eval_step != loop.step:
            # The final one: the summary, the report and the MLPerf log end on this step.
            stop_request = self.evaluate()
        if stop_request is None:
            self.log.run_stop(self.samples_seen, success=loop.target_reached)
            self.checkpointer.save(loop.step, blocking=True)  # the final state, always
        self.checkpointer.close()
        stop_reason = stop_request or ("target_reached" if loop.target_reached else "max_steps")
        skipped = self.train_batches.stats["skipped_lines"] + self.eval_set.stats["skipped_lines"]
        return self.log.summarize(loop, stop_reason, skipped_lines=skipped)

    def eval_due(self) -> bool:
        """This step's eval is owed: step 0 with do_first_eval, or every eval_frequency steps,
        unless done already. A run resumed from a checkpoint saved when a stop request cut that
        eval short owes it."""
        step = self.loop.step
        on_cadence = step % self.cfg.eval_frequency == 0 if step else self.cfg.do_first_eval
        return on_cadence and self.loop.eval_step != step

    def end_step(self) -> str | None:
        """The one point between steps where the run checkpoints and may stop: a stop request
        (SIGTERM, the kill switch) saves at once and ends the loop with its reason."""
        stop_request = self.stop_requests.poll()
        if stop_request:
            self.stop(stop_request)
        else:
            self.checkpointer.maybe_save(self.loop.step)
        return stop_request

    def stop(self, stop_request: str) -> None:
        """Save this step (blocking) before the run ends with EXIT_PREEMPTED."""
        self.checkpointer.save(self.loop.step, blocking=True)
        console.say(f"step {self.loop.step}: {stop_request}: checkpoint saved, exiting with code "
                    f"{EXIT_PREEMPTED} (run the same command to resume)")

    def close(self) -> None:
        """Stop the data thread, close the writers, give SIGTERM back; runs from `finally`."""
        try:
            self.train_batches.close()
            self.log.close()
        finally:
            self.stop_requests.uninstall()

    @property
    def samples_seen(self) -> int:
        """Training sequences so far (MLPerf's samples_count)."""
        return self.loop.step * self.cfg.global_train_batch_size

    def train_step(self) -> None:
        cfg = self.cfg
        self.model.train()
        accum = cfg.gradient_accumulation_steps
        lm_losses, aux_losses, tokens = [], [], []
        for micro_step in range(accum):
            input_ids, labels = self.engine.to_device(next(self.train_batches))
            terms = self.model.loss_terms(input_ids, labels, cfg.pad_token_id)
            (terms.loss / accum).backward()
            lm_losses.append(terms.lm_loss.detach())
            aux_losses.append(terms.aux_loss.detach())
            tokens.append(terms.num_inputs)
            if micro_step < accum - 1:
                # One graph per micro-batch keeps one micro-batch of activations alive.
                self.engine.cut()

        grad_norm = self.model.clip_grad_norm(cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.model.update_router_bias()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loop.step += 1

        # Every step's graph computes and keeps the logged values (a few tiny ops), so log
        # steps and the others run one and the same compiled graph.
        lm_loss = torch.stack(lm_losses).mean()
        aux_loss = torch.stack(aux_losses).mean()
        logged = {
            "train/loss": lm_loss + terms.aux_loss_coef * aux_loss,
            "train/lm_loss": lm_loss,
            "train/aux_loss": aux_loss,
            "train/grad_norm": grad_norm,
            "train/num_tokens": torch.stack(tokens).sum(),  # float32 below: exact up to 2^24 tokens a step
            **terms.router_metrics,  # of the last micro-batch
        }
        values = torch.stack([value.float() for value in logged.values()])
        self.engine.cut()
        self.log.after_train_step(self.loop.step, lr, list(logged), values,
                                  skipped_lines=self.train_batches.stats["skipped_lines"])

    def profile_step(self) -> None:
        """One train step under the engine's profiler, into run_dir/profile (view with TensorBoard)."""
        with self.engine.profile(self.cfg.run_dir):
            self.train_step()
        console.say(f"step {self.loop.step}: profile written to {self.cfg.run_dir}/profile")

    def evaluate(self) -> str | None:
        """Token-weighted mean loss over every scored label of the validation set.

        Stop requests are polled before each batch (every process at the same batches, as the
        agreement's all-reduce needs; a flag and a file, no device sync). One cuts the eval short:
        nothing of it is reported, the step is saved (its eval owed, `eval_due`) and the request
        returned, as `end_step` returns it."""
        self.log.eval_start(self.samples_seen)
        self.model.eval()
        loss_sums, counts = [], []
        with torch.no_grad():
            for batch in self.eval_set.batches():
                stop_request = self.stop_requests.poll()
                if stop_request:
                    self.model.train()
                    self.log.eval_abandoned(self.loop.step, stop_request)
                    self.stop(stop_request)
                    return stop_request
                input_ids, labels = self.engine.to_device(batch)
                terms = self.model.loss_terms(input_ids, labels, self.cfg.pad_token_id)
                loss_sums.append(terms.loss_sum)
                counts.append(terms.num_scored)
                self.engine.cut()
        eval_loss = (torch.stack(loss_sums).sum() / torch.stack(counts).sum()).item()  # the one host read per eval
        self.model.train()
        self.loop.record_eval(eval_loss, self.cfg.target_eval_loss)
        self.log.after_eval(self.loop.step, self.samples_seen, eval_loss, num_tokens=self.eval_set.num_tokens,
                            skipped_lines=self.eval_set.stats["skipped_lines"])
        return None


def train(cfg: DictConfig) -> Summary:
    """Check every input, then build, restore, start and train. Nothing is written over and
    nothing is compiled before the checks pass."""
    trainer = build_trainer(cfg)
    try:
        trainer.restore()
        trainer.start()
        summary = trainer.train()
    finally:
        trainer.close()
    print_summary(summary, cfg.run_dir)
    return summary


def build_trainer(cfg: DictConfig) -> Trainer:
    """Check every input, then build the run's trainer (benchmarks/step.py drives its steps)."""
    engine = build_engine(cfg.backend)
    num_devices = engine.device_count()
    data.validate_dataset(cfg)
    if cfg.checkpoint_manager_path:
        checkpoint.check_path(cfg.checkpoint_manager_path)
    resume_from = checkpoint.resume_directory(cfg)
    if resume_from:
        checkpoint.check_config_matches(cfg, resume_from)
    slices = engine.num_slices() if cfg.num_slices == -1 else cfg.num_slices
    mesh_shape = parallel.mesh_shape(num_devices, cfg.tensor_parallelism, cfg.expert_parallelism, slices)
    model_plan = ModelPlan.from_config(cfg, mesh_shape)  # the model, built on meta and checked once for the run
    engine.check(model_plan)
    plan.preflight(model_plan, engine.device_type(), engine.device_kind())
    # Last, since they create the directories when they can.
    storage.check_writable(cfg.run_dir, "output_dir")
    storage.check_writable(cfg.checkpoint_dir, "checkpoint_dir")
    return Trainer(model_plan, engine, resume_from)


def exit_code(summary: Summary) -> int:
    """EXIT_PREEMPTED when a stop request ended the run (a checkpoint was saved), else EXIT_OK."""
    return EXIT_PREEMPTED if summary.stop_reason in ("preempted", "kill_switch") else EXIT_OK
