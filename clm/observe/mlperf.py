"""The MLPerf compliance log, run_dir/mlperf_compliance.log, written through mlperf-logging's
mllog (process 0 only). `python -m clm.compliance RUN_DIR` checks it with the official checker.

Events, in order: cache_clear, init_start, the submission_* and hyperparameter keys,
init_stop, run_start; then per training block block_start ... block_stop, and per
evaluation eval_start, eval_accuracy (the eval loss), eval_stop; last run_stop with status
success (the target was reached) or aborted. `samples_count` counts training sequences
(optimizer steps x global batch), each `max_sequence_length` tokens.

An evaluation that a stop request cuts short (SIGTERM, the kill switch) leaves no line:
`eval_abandoned()` takes back its eval_start (and the block_stop before it), so the log stands
where it stood before that eval, which the resumed run redoes; the checker allows no eval
without its accuracy, and no eval_accuracy is made up for an eval that did not finish.

Resume: the log continues the same run. `state_dict()` holds the number of lines written
and whether a block is open; a logger given `load_state_dict(state)` truncates the file to
those lines at its first write (lines the dead run wrote after the checkpoint are dropped),
writes no second init or run_start, and goes on, so the file has one run_start and one run_stop.
Nothing touches the file before the first write: events logged before run_start are held
in memory, and dropped after load_state_dict because the log already has them.
"""

from __future__ import annotations

import logging
import os

from mlperf_logging.mllog import constants as C
from mlperf_logging.mllog import mllog

from clm.optim import decay_steps

# opt_learning_rate_decay_schedule per scheduler (and Megatron's lr_decay_style): the
# references' own values (gpt-oss-20b: primus_mllog's mapping of lr_decay_style)
SCHEDULE_NAMES = {"WarmupHoldPolicy": "linear warmup then hold", "CosineAnnealing": "cosine with linear warmup",
                  "OptimizerParamScheduler": {"cosine": "cosine with linear warmup", "linear": "linear",
                                              "constant": "constant"}}
ADAMW_NAMES = {"ADAMW_TORCH_XLA", "AdamW"}
TARGET_KEY = "target_eval_loss"  # not an mllog constant; the shipped rulesets read it


def schedule_name(sched) -> str:
    name = SCHEDULE_NAMES.get(sched.name, sched.name)
    return name.get(sched.lr_decay_style, sched.lr_decay_style) if isinstance(name, dict) else name


class _Lines(logging.Handler):
    """Receives mllog's formatted lines; holds them until the file is opened."""

    def __init__(self, owner: "MLPerfLogger"):
        super().__init__(logging.INFO)
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        self.owner._write_line(record.getMessage().lstrip("\n"))


class MLPerfLogger:
    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        logger = logging.Logger(f"clm.mlperf:{path}")  # private: never reaches the console
        logger.propagate = False
        logger.addHandler(_Lines(self))
        # stack offset 3: metadata file/lineno name the trainer's call, not this module
        self._mllog = mllog.MLLogger(logger=logger, default_stack_offset=3)
        self._file = None
        self._pending: list[str] = []
        self._lines = 0
        self._restored: dict | None = None
        self.block_open = False
        self.stopped = False
        self._before_eval: tuple[int, bool] | None = None  # (lines, block_open) before the open eval

    # ------------------------------------------------------------------ resume contract

    def state_dict(self) -> dict:
        return {"lines": self._lines, "block_open": self.block_open, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self._restored = dict(state)
        self.block_open = state["block_open"]
        self.stopped = state["stopped"]

    # ------------------------------------------------------------------------- events

    def init_start(self) -> None:
        self._event(C.CACHE_CLEAR, True)
        self._start(C.INIT_START)

    def run_config(self, cfg, *, optimizer_defaults: dict, warmup_steps: int, eval_samples: int,
                   aux_loss_coef: float, platform: str) -> None:
        """The submission_* keys and the hyperparameters the rulesets check."""
        m = cfg.mlperf
        for key, value in ((C.SUBMISSION_BENCHMARK, m.benchmark), (C.SUBMISSION_DIVISION, m.division),
                           (C.SUBMISSION_ORG, m.org), (C.SUBMISSION_PLATFORM, m.platform or platform),
                           (C.SUBMISSION_STATUS, m.status)):
            self._event(key, value)
        adamw = cfg.optimizer in ADAMW_NAMES
        values = {
            C.GLOBAL_BATCH_SIZE: cfg.global_train_batch_size,
            C.GRADIENT_ACCUMULATION_STEPS: cfg.gradient_accumulation_steps,
            C.SEED: cfg.seed,
            C.MAX_SEQUENCE_LENGTH: cfg.max_length,
            C.OPT_NAME: C.ADAMW if adamw else cfg.optimizer.lower(),
            C.OPT_BASE_LR: cfg.lr,
            C.OPT_LR_WARMUP_STEPS: warmup_steps,
            C.OPT_LR_TRAINING_STEPS: cfg.max_steps,
            C.OPT_LR_DECAY_SCHEDULE: schedule_name(cfg.sched),
            C.OPT_LR_DECAY_STEPS: decay_steps(cfg.sched),
            C.OPT_END_LR: cfg.sched.min_lr,
            C.MAX_STEPS: cfg.max_steps,
            C.OPT_GRADIENT_CLIP_NORM: cfg.max_grad_norm,
            C.MOE_AUX_LOSS_COEFF: aux_loss_coef,
            C.TENSOR_PARALLELISM: cfg.tensor_parallelism,
            C.EXPERT_PARALLELISM: cfg.expert_parallelism,
            C.TRAIN_SAMPLES: cfg.max_steps * cfg.global_train_batch_size,
            C.EVAL_SAMPLES: eval_samples,
            TARGET_KEY: cfg.target_eval_loss,
        }
        if adamw:
            beta_1, beta_2 = optimizer_defaults.get("betas", (0.9, 0.999))
            values.update({C.OPT_ADAMW_BETA_1: beta_1, C.OPT_ADAMW_BETA_2: beta_2,
                           C.OPT_ADAMW_EPSILON: optimizer_defaults.get("eps", 1e-8),
                           C.OPT_ADAMW_WEIGHT_DECAY: cfg.weight_decay})
        else:
            values[C.OPT_WEIGHT_DECAY] = cfg.weight_decay
        for key, value in values.items():
            self._event(key, value)

    def run_start(self) -> None:
        """Init is over and the timed run begins (a resumed run continues the logged one)."""
        self._open()
        if self._restored is None:
            self._end(C.INIT_STOP)
            self._start(C.RUN_START)

    def train_block(self, samples: int) -> None:
        """Before a training step: opens a block unless one is open."""
        self._open()
        if not self.block_open:
            self.block_open = True
            self._start(C.BLOCK_START, metadata={C.SAMPLES_COUNT: samples})

    def eval_start(self, samples: int) -> None:
        self._open()
        self._before_eval = (self._lines, self.block_open)
        if self.block_open:
            self.block_open = False
            self._end(C.BLOCK_STOP, metadata={C.SAMPLES_COUNT: samples})
        self._start(C.EVAL_START, metadata={C.SAMPLES_COUNT: samples})

    def eval_stop(self, samples: int, eval_loss: float) -> None:
        self._event(C.EVAL_ACCURACY, eval_loss, metadata={C.SAMPLES_COUNT: samples})
        self._end(C.EVAL_STOP, metadata={C.SAMPLES_COUNT: samples})
        self._before_eval = None

    def eval_abandoned(self) -> None:
        """The open eval was cut short: its lines are taken back (see the module's docstring)."""
        lines, self.block_open = self._before_eval
        self._before_eval = None
        if self.enabled:
            self._keep_lines(lines)

    def run_stop(self, samples: int, success: bool) -> None:
        if self.stopped:
            return
        self._open()
        if self.block_open:
            self.block_open = False
            self._end(C.BLOCK_STOP, metadata={C.SAMPLES_COUNT: samples})
        self.stopped = True
        status = C.SUCCESS if success else C.ABORTED
        self._end(C.RUN_STOP, metadata={C.SAMPLES_COUNT: samples, C.STATUS: status})
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # ----------------------------------------------------------------------- writing

    def _event(self, key, value=None, metadata=None):
        if self.enabled:
            self._mllog.event(key, value, metadata=metadata)

    def _start(self, key, value=None, metadata=None):
        if self.enabled:
            self._mllog.start(key, value, metadata=metadata)

    def _end(self, key, value=None, metadata=None):
        if self.enabled:
            self._mllog.end(key, value, metadata=metadata)

    def _open(self) -> None:
        if not self.enabled or self._file is not None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if self._restored is None:
            self._file = open(self.path, "w", buffering=1)
            for line in self._pending:
                self._file.write(line + "\n")
            self._lines = len(self._pending)
        else:
            self._keep_lines(self._restored["lines"])
        self._pending = []

    def _keep_lines(self, keep: int) -> None:
        """Cut the file back to its first `keep` lines and open it for appending."""
        self.close()
        lines = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.read().splitlines()[:keep]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(self.path + ".tmp", self.path)  # a crash here leaves the old or the new log whole
        self._file = open(self.path, "a", buffering=1)
        self._lines = len(lines)

    def _write_line(self, line: str) -> None:
        if self._file is None:
            self._pending.append(line)
            return
        self._file.write(line + "\n")
        self._lines += 1
