"""Weights & Biases: offline by default (files under run_dir/wandb, `wandb sync` uploads them),
online when configured (`wandb.mode=online` with WANDB_API_KEY in the environment).

The run's config is the resolved config with secrets redacted; its history gets the rows
of metrics.jsonl (MetricsWriter calls `log`). W&B is started at the first row, so building
this object writes nothing. Resume: `state_dict()` holds the run id and a resumed process
continues that run (resume="allow"); rows the dead run logged past the checkpoint stay in
W&B, which keeps a step's first values.
"""

from __future__ import annotations

import os
import uuid


class WandbRun:
    def __init__(self, wandb_cfg, run_dir: str, config: dict, enabled: bool = True):
        self.enabled = enabled and wandb_cfg.mode != "disabled"
        self._cfg = wandb_cfg
        self._dir = run_dir
        self._config = config
        self.run_id = uuid.uuid4().hex[:8]
        self._resume = False
        self._run = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state["run_id"]
        self._resume = True

    def _start(self) -> None:
        import wandb

        os.makedirs(self._dir, exist_ok=True)
        settings = wandb.Settings(
            silent=True,  # clm's console stays quiet; `wandb sync run_dir/wandb/offline-run-*` uploads
            console="off",  # do not wrap stdout/stderr
            x_disable_meta=True,  # the metadata file records argv, where an override could hold a secret
            save_code=False, disable_git=True, x_save_requirements=False,
        )
        self._run = wandb.init(
            project=self._cfg.project, entity=self._cfg.entity, mode=self._cfg.mode,
            tags=list(self._cfg.tags), dir=self._dir, id=self.run_id,
            resume="allow" if self._resume else None, config=self._config, settings=settings,
        )

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self._run is None:
            self._start()
        self._run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def finish(self) -> None:
        if self._run is not None:
            import wandb

            self._run.finish()
            wandb.teardown()  # an offline run's file is complete only once W&B's service has stopped
            self._run = None
