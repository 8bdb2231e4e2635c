"""The trainer: build everything from the config, then train, evaluate and report.

XLA discipline: every step is traced lazily and cut with torch_xla.sync(); values leave
the device only inside step closures on log steps (and once per eval for the stop check),
so a step never waits on the host and never recompiles after warm-up.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from clm import checkpoint, data, parallel, plan, runtime
from clm.metrics import MetricsWriter, mfu, reference_flops_per_token, training_flops_per_token
from clm.model import attention, moe
from clm.model.build import build_model, load_model_config
from clm.model.weights import tokenizer_source
from clm.optim import build_optimizer, build_scheduler

# Steps whose timing includes compilation: the first step has no optimizer state yet,
# the second is the first with it. Later steps are steady state.
WARMUP_STEPS = 2


@dataclass
class Summary:
    steps: int = 0
    stop_reason: str = "max_steps"
    eval_loss: float | None = None
    train_loss: float | None = None
    step_times: list[float] = field(default_factory=list)
    tokens_per_step: int = 0
    mfu: float | None = None
    compiles: int = 0
    skipped_lines: int = 0  # corrupt JSON lines in this host's data files
    wall_seconds: float = 0.0

    @property
    def median_step_time(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None


class Trainer:
    def __init__(self, cfg: DictConfig, hf_config, mesh_shape: parallel.MeshShape):
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr
        from torch_xla.distributed.spmd.xla_sharding import MarkShardingFunction

        runtime.setup(cfg.local_compile_cache_dir, cfg.full_precision)
        self.cfg = cfg
        self.hf_config = hf_config
        self.num_devices = mesh_shape.num_devices
        self.is_main = xr.process_index() == 0
        os.makedirs(cfg.run_dir, exist_ok=True)
        if self.is_main:
            OmegaConf.save(cfg, os.path.join(cfg.run_dir, "config.yaml"), resolve=True)

        self.tokenizer = data.load_tokenizer(tokenizer_source(cfg.model), cfg.cache_local_dir)

        self.mesh = parallel.build_mesh(mesh_shape)
        # Several hosts each pass their own rows (minibatch); one host passes the whole batch.
        self.input_sharding = xs.ShardingSpec(self.mesh, parallel.batch_spec(), minibatch=xr.process_count() > 1)
        # Constraints inside the model: MoE buffers split by expert (all-to-all under expert
        # parallelism), attention heads by tensor for the flash kernel.
        moe.set_expert_activation_sharding(
            lambda t: MarkShardingFunction.apply(t, self.mesh, parallel.expert_activation_spec()))
        attention.set_partitioning(self.mesh, (parallel.DATA_AXES, "tensor", None, None))
        self.model = build_model(
            cfg, hf_config, lambda m: parallel.shard_parameters(m, self.mesh, cfg.sharding, mesh_shape))
        if cfg.checkpoint_manager_path:
            checkpoint.restore_model_weights(self.model, cfg.checkpoint_manager_path)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)

        process = dict(process_index=xr.process_index(), process_count=xr.process_count())
        self.train_batches = data.build_train_stream(cfg, self.tokenizer, **process)
        self.train_batches.start()  # fills the shuffle buffer while the first step compiles
        self.eval_set = data.build_eval_set(cfg, self.tokenizer, **process)

        self.metrics = MetricsWriter(cfg.run_dir, enabled=self.is_main)
        num_params = sum(p.numel() for p in self.model.parameters())
        self.flops_per_token = training_flops_per_token(self.hf_config, cfg.max_length)
        self.reference_flops_per_token = reference_flops_per_token(self.hf_config, num_params)
        self.device_kind = runtime.device_kind()
        self.summary = Summary(tokens_per_step=cfg.global_train_batch_size * cfg.max_length)
        self._last_log = (0, time.perf_counter())  # (step, time) of the last train row
        self._step = 0

    # ------------------------------------------------------------------ the loop

    def train(self) -> Summary:
        cfg = self.cfg
        started = time.perf_counter()
        progress = tqdm(total=cfg.max_steps, desc="train", unit="step", disable=not self.is_main, file=sys.stdout)
        if cfg.do_first_eval:
            self.evaluate()
        while self._step < cfg.max_steps and self.summary.stop_reason != "target_reached":
            if self._step + 1 == cfg.xla_profile_step:
                self.profile_step()
            else:
                self.train_step()
            progress.update(1)
            if self._step % cfg.eval_frequency == 0:
                self.evaluate()
        progress.close()
        self.summary.steps = self._step
        self.summary.wall_seconds = time.perf_counter() - started
        self.summary.compiles = compile_count()
        self.summary.skipped_lines = self.train_batches.stats["skipped_lines"] + self.eval_set.stats["skipped_lines"]
        self.train_batches.close()
        self.metrics.close()
        return self.summary

    def train_step(self) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        cfg = self.cfg
        self.model.train()
        accum = cfg.gradient_accumulation_steps
        coef = self.hf_config.router_aux_loss_coef
        lm_losses, aux_losses, tokens = [], [], []
        for micro_step in range(accum):
            input_ids, labels = self.to_device(next(self.train_batches))
            loss_sum, num_scored = self.compute_loss(input_ids, labels)
            lm_loss = loss_sum / num_scored
            aux_loss = moe.load_balancing_loss(
                moe.router_logits(self.model), self.hf_config.num_local_experts, self.hf_config.num_experts_per_tok
            )
            ((lm_loss + coef * aux_loss) / accum).backward()
            lm_losses.append(lm_loss.detach())
            aux_losses.append(aux_loss.detach())
            tokens.append((labels != cfg.pad_token_id).sum())
            if micro_step < accum - 1:
                # One graph per micro-batch keeps one micro-batch of activations alive.
                torch_xla.sync()

        grad_norm = clip_grad_norm(self.model, cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step += 1

        if self._step % cfg.log_frequency == 0 or self._step == cfg.max_steps:
            lm_loss = torch.stack(lm_losses).mean()
            aux_loss = torch.stack(aux_losses).mean()
            device_values = {
                "train/loss": lm_loss + coef * aux_loss,
                "train/lm_loss": lm_loss,
                "train/aux_loss": aux_loss,
                "train/grad_norm": grad_norm,
                "train/num_tokens": torch.stack(tokens).sum(),
                **moe.router_metrics(self.model),
            }
            xm.add_step_closure(self._log_train, args=(self._step, lr, device_values))
        torch_xla.sync()

    def profile_step(self) -> None:
        """One train step under torch_xla's profiler, into run_dir/profile (view with TensorBoard)."""
        import torch_xla.core.xla_model as xm
        import torch_xla.debug.profiler as xp

        xp.start_trace(os.path.join(self.cfg.run_dir, "profile"))
        self.train_step()
        xm.wait_device_ops()  # the trace must cover the device's execution, not just its launch
        xp.stop_trace()
        tqdm.write(f"step {self._step}: profile written to {self.cfg.run_dir}/profile", file=sys.stdout)

    def evaluate(self) -> None:
        """Token-weighted mean loss over every scored label of the validation set."""
        import torch_xla

        self.model.eval()
        loss_sums, counts = [], []
        with torch.no_grad():
            for batch in self.eval_set.batches():
                input_ids, labels = self.to_device(batch)
                loss_sum, num_scored = self.compute_loss(input_ids, labels)
                loss_sums.append(loss_sum)
                counts.append(num_scored)
                torch_xla.sync()
        eval_loss = (torch.stack(loss_sums).sum() / torch.stack(counts).sum()).item()
        self.model.train()

        self.summary.eval_loss = eval_loss
        self.metrics.write(self._step, {
            "eval/loss": eval_loss,
            "eval/num_tokens": self.eval_set.num_tokens,
            "data/eval_skipped_lines": self.eval_set.stats["skipped_lines"],
        })
        tqdm.write(f"step {self._step}: eval/loss={eval_loss:.4f}", file=sys.stdout)
        target = self.cfg.target_eval_loss
        if target > 0 and eval_loss <= target:
            self.summary.stop_reason = "target_reached"
        # Eval time is not training time: restart the step clock.
        self._last_log = (self._step, time.perf_counter())

    # --------------------------------------------------------------- helpers

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """Next-token loss terms: (sum of token losses, number of scored tokens).

        Sums rather than a mean, so that eval weights every token of the validation set equally.
        """
        import torch_xla.distributed.spmd as xs

        logits = self.model(input_ids=input_ids).logits
        xs.mark_sharding(logits, self.mesh, parallel.logits_spec())
        ignore = self.cfg.pad_token_id
        shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
        loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore, reduction="sum")
        return loss_sum, (shift_labels != ignore).sum()

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Host arrays of this process's rows -> one global array sharded on batch."""
        import torch_xla
        import torch_xla.core.xla_model as xm

        tensors = [torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["labels"]).long()]
        input_ids, labels = xm.send_cpu_data_to_device(tensors, torch_xla.device(), self.input_sharding)
        return input_ids, labels

    def _log_train(self, step: int, lr: float, device_values: dict) -> None:
        """Runs as a step closure: the step's values have been computed, so reading them costs no stall."""
        values = {key: value.item() for key, value in device_values.items()}
        last_step, last_time = self._last_log
        now = time.perf_counter()
        step_time = (now - last_time) / (step - last_step)
        self._last_log = (step, now)
        tokens_per_sec = values["train/num_tokens"] / step_time
        values.update({
            "train/lr": lr,
            "perf/step_time_seconds": step_time,
            "perf/tokens_per_sec": tokens_per_sec,
            "perf/mfu": mfu(self.flops_per_token, tokens_per_sec, self.num_devices, self.device_kind),
            "perf/reference_mfu": mfu(self.reference_flops_per_token, tokens_per_sec, self.num_devices, self.device_kind),
            "data/skipped_lines": self.train_batches.stats["skipped_lines"],
        })
        self.metrics.write(step, values)
        self.summary.train_loss = values["train/loss"]
        if last_step >= WARMUP_STEPS:
            self.summary.step_times.append(step_time)
            self.summary.mfu = values["perf/mfu"]


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping; clips only when max_grad_norm > 0 (as the reference)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def compile_count() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return data[0] if data else 0


def print_summary(cfg: DictConfig, summary: Summary) -> None:
    step_time = summary.median_step_time
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
    """Check every input, then train. Nothing is written or compiled before the checks pass."""
    num_devices = runtime.device_count()
    data.validate_dataset(cfg)
    if cfg.checkpoint_manager_path:
        checkpoint.check_path(cfg.checkpoint_manager_path)
    hf_config = load_model_config(cfg)
    slices = parallel.runtime_num_slices() if cfg.num_slices == -1 else cfg.num_slices
    mesh_shape = parallel.mesh_shape(num_devices, cfg.tensor_parallelism, cfg.expert_parallelism, slices)
    parallel.check_model_fits_mesh(mesh_shape, hf_config)
    parallel.check_multihost_input(mesh_shape)
    plan.preflight(cfg, hf_config, mesh_shape, runtime.device_type(), runtime.device_kind())
    summary = Trainer(cfg, hf_config, mesh_shape).train()
    print_summary(cfg, summary)
    return summary
