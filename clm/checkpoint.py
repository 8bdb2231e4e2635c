"""Checkpoints, one format for both engines: torch.distributed.checkpoint, every process
writing and reading only its own shards (XLA: torch_xla's SPMD planners; DTensor: the default
ones), local or gs://.

Layout: `checkpoint_dir/<step>/`, one directory per optimizer step. A checkpoint is
complete once process 0 has written its `.manager_metadata` file, which it does last,
after torch.distributed.checkpoint has written every shard and its `.metadata`; only
complete checkpoints are resumed from or counted for retention. A directory without it
(a save that was killed) is skipped with a warning and left alone.

What one holds (`Checkpointer.save`): "model" (keyed as model.state_dict()) and "optimizer"
(keyed by parameter name, as torch.distributed.checkpoint.state_dict does) as sharded tensors,
"config" (the resolved config as YAML) and, per process, "host_<i>": a pickle of every
host-side state (the loop's step, the scheduler, the data stream's position, RNGs, the metrics
writers). That is enough to continue bitwise. Tensors are resharded on load, so a checkpoint
saved on one mesh, or by the other engine, resumes on another.

    python -m clm.checkpoint ls CHECKPOINT_DIR    # step, time, size, completeness, config
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from clm import runtime, storage
from clm.cli import run_command
from clm.errors import UserError
from clm.storage import filesystem

logger = logging.getLogger(__name__)

# What torch.distributed.checkpoint and torch_xla's planners warn about on every save, from
# their own code: nothing a user can act on (README "A quiet console").
for _message in ("The function definition for SavePlanner.set_up_planner", "TypedStorage is deprecated",
                 "Using a non-tuple sequence for multidimensional indexing"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)

COMMIT_MARKER = ".manager_metadata"  # written last (CheckpointManager's name, so its checkpoints count as complete)
DCP_METADATA = ".metadata"

# Knobs that may differ between a checkpoint's run and the run that resumes it: they change
# how long, how often or where, not what is computed. Any other difference is refused.
MAY_CHANGE_ON_RESUME = (
    "max_steps", "eval_frequency", "eval_samples_interval", "log_frequency", "do_first_eval", "target_eval_loss",
    "checkpoint_every", "checkpoint_dir", "checkpoints_to_keep", "async_checkpoint", "resume",
    "allow_config_change", "kill_switch_path", "backend", "xla_profile_step",
    "xla_compile_analysis", "output_dir", "run_dir", "exp_name",
    "local_compile_cache_dir", "cache_local_dir", "tensor_parallelism", "expert_parallelism", "compile",
    "compile_backend",
    "num_slices", "sharding", "per_device_train_batch_size", "per_device_eval_batch_size",
    "dataset.num_proc", "model.flash_attention", "wandb", "mlperf",
)


# ------------------------------------------------------------------------ locating


def step_directories(directory: str) -> dict[int, bool]:
    """{step: complete} for every numbered directory under `directory` (none if it is missing)."""
    fs, root = filesystem(directory)
    if not fs.exists(root):
        return {}
    steps = {}
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.isdigit():
            steps[int(name)] = fs.exists(f"{entry.rstrip('/')}/{COMMIT_MARKER}")
    return dict(sorted(steps.items()))


def newest_complete(directory: str, knob: str) -> str | None:
    """The newest complete step directory under `directory`, warning about newer incomplete ones."""
    steps = step_directories(directory)
    complete = [step for step, done in steps.items() if done]
    newest = complete[-1] if complete else None
    for step, done in steps.items():
        if not done and (newest is None or step > newest):
            logger.warning("%s: %s/%d is incomplete (a save that did not finish); ignored", knob, directory, step)
    return storage.join(directory, str(newest)) if newest is not None else None


def resume_directory(cfg: DictConfig) -> str | None:
    """The step directory this run resumes from (`resume`: auto, never, or a path), or None."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return newest_complete(cfg.checkpoint_dir, "checkpoint_dir")
    path = cfg.resume.rstrip("/")
    fs, root = filesystem(path)
    if os.path.basename(path).isdigit() and fs.exists(f"{root}/{COMMIT_MARKER}"):
        return path
    if os.path.basename(path).isdigit() and fs.exists(f"{root}/{DCP_METADATA}"):
        raise UserError(f"resume={path}: that checkpoint is incomplete (no {COMMIT_MARKER}); resume from an older step")
    found = newest_complete(path, "resume")
    if found is None:
        raise UserError(
            f"resume={path}: no complete checkpoint there; give a step directory (checkpoint_dir/STEP), "
            "a checkpoint_dir, auto or never"
        )
    return found


def _split_step(step_directory: str) -> tuple[str, int]:
    parent, _, step = step_directory.rstrip("/").rpartition("/")
    return parent, int(step)


# --------------------------------------------------------------------- reading


def storage_reader(step_directory: str):
    """torch.distributed.checkpoint's reader for a local or gs:// step directory."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    if not storage.is_gcs(step_directory):
        return FileSystemReader(step_directory)
    filesystem(step_directory)  # gcsfs set up by clm.storage before torch reaches it through fsspec
    return FsspecReader(step_directory)


def read_items(step_directory: str, items: dict) -> dict:
    """Non-tensor items of a checkpoint (e.g. {"config": ""}) without a process group or XLA."""
    import torch.distributed.checkpoint as dcp

    reader = storage_reader(step_directory)
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(items, storage_reader=reader, no_dist=True)
    return items


def saved_config(step_directory: str) -> DictConfig:
    return OmegaConf.create(read_items(step_directory, {"config": ""})["config"])


def tensor_shapes(step_directory: str) -> dict[str, tuple[int, ...]]:
    """{flattened key: shape} of every tensor in a checkpoint, from its metadata alone."""
    return {key: tuple(item.size) for key, item in _tensor_metadata(step_directory).items()}


def incomplete_tensors(step_directory: str) -> list[str]:
    """Keys of the tensors whose saved shards do not add up to the whole tensor, from the
    metadata alone. torch.distributed.checkpoint restores such a tensor without a word and
    leaves it as it was; clm before its own save planner wrote them on several hosts."""
    return sorted(key for key, item in _tensor_metadata(step_directory).items()
                  if sum(math.prod(chunk.sizes) for chunk in item.chunks) != math.prod(item.size))


def _metadata(step_directory: str):
    return storage_reader(step_directory).read_metadata()


def _tensor_metadata(step_directory: str) -> dict:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {key: item for key, item in _metadata(step_directory).state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}


def check_config_matches(cfg: DictConfig, step_directory: str) -> None:
    """Refuse, in one line, a resume whose config differs in a knob that changes what is computed."""
    saved = OmegaConf.to_container(saved_config(step_directory), resolve=True)
    current = OmegaConf.to_container(cfg, resolve=True)
    saved, current = _flatten(saved), _flatten(current)
    changed = [key for key in sorted(set(saved) | set(current))
               if not _may_change(key) and saved.get(key) != current.get(key)]
    if not changed:
        return
    shown = ", ".join(f"{key} ({saved.get(key)} -> {current.get(key)})" for key in changed[:4])
    more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    if cfg.allow_config_change and cfg.resume not in ("auto", "never"):
        logger.warning("resuming %s with changed knobs: %s%s (allow_config_change=true)", step_directory, shown, more)
        return
    raise UserError(
        f"resume: the checkpoint {step_directory} was saved with different knobs: {shown}{more}; rerun with the "
        "checkpoint's values, resume=never (or another checkpoint_dir) to start over, or resume=PATH "
        "allow_config_change=true to continue anyway"
    )


def _may_change(key: str) -> bool:
    return any(key == knob or key.startswith(knob + ".") for knob in MAY_CHANGE_ON_RESUME)


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def check_model_matches(model: torch.nn.Module, step_directory: str) -> None:
    """A checkpoint of another architecture fails in one line naming keys and shapes."""
    saved = {key[len("model."):]: shape for key, shape in tensor_shapes(step_directory).items()
             if key.startswith("model.")}
    expected = {name: tuple(t.shape) for name, t in model_state(model).items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = [f"{name} {list(saved[name])} vs {list(expected[name])}" for name in sorted(set(saved) & set(expected))
                if saved[name] != expected[name]]
    problems = []
    if reshaped:
        problems.append(f"shapes differ (checkpoint vs model): {', '.join(reshaped[:3])}")
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected[:3])}")
    if problems:
        raise UserError(
            f"{step_directory}: a checkpoint of a different model architecture ({'; '.join(problems)}); "
            "use the model.config_path it was trained with (a checkpoint that lacks only routers or norms on a "
            "tensor/expert mesh was written by a clm before its own save planner: resume from another one)"
        )
    incomplete = incomplete_tensors(step_directory)
    if incomplete:
        raise UserError(
            f"{step_directory}: shards of {len(incomplete)} tensors are missing ({', '.join(incomplete[:3])}), as a "
            "clm before its own save planner wrote partially replicated tensors on several hosts; resume from a "
            "checkpoint written by this clm"
        )


# ------------------------------------------------------------------------ saving


def one_writer_per_shard(all_plans: list) -> list:
    """Keep exactly one write of each distinct shard (tensor and offsets) across every
    process's save plan: in the plan with the fewest bytes planned so far (lowest rank on a
    tie), its first replica there. Everything else passes through unchanged.

    torch_xla 2.9's `dedup_tensors` keeps a shard's first occurrence only across plans: a
    shard that one process holds several replicas of (a tensor sharded over some mesh axes
    and replicated over others, such as the router on a tensor x fsdp mesh, when this host
    has devices that differ only in the replicated axes) it removes from "every plan but the
    first", which includes that same plan: every copy is dropped. The save succeeds without
    the tensor (one host) or without some of its shards (several hosts); a restore of a
    tensor with a shard missing raises nothing and leaves the whole tensor as it was.
    """
    import dataclasses

    occurrences: dict = {}  # MetadataIndex (fqn, offsets; its index hint is not compared) -> [(plan, position)]
    for plan_index, plan in enumerate(all_plans):
        for position, item in enumerate(plan.items):
            occurrences.setdefault(item.index, []).append((plan_index, position))
    planned = [0] * len(all_plans)
    kept = [set() for _ in all_plans]
    for places in occurrences.values():
        plan_index = min({p for p, _ in places}, key=lambda p: (planned[p], p))
        position = next(pos for p, pos in places if p == plan_index)
        kept[plan_index].add(position)
        planned[plan_index] += all_plans[plan_index].items[position].tensor_storage_size() or 1
    return [dataclasses.replace(plan, items=[item for position, item in enumerate(plan.items) if position in keep])
            for plan, keep in zip(all_plans, kept)]


def save_planner():
    """torch_xla's SPMD save planner, writing each distinct shard once (one_writer_per_shard)."""
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    class SavePlanner(SPMDSavePlanner):
        """torch_xla's SPMD save planner whose global plan writes each distinct shard exactly
        once (one_writer_per_shard); the format and the restore are torch_xla's, unchanged."""

        def create_global_plan(self, all_plans):
            # torch_xla's own dedup then finds nothing left to remove.
            return super().create_global_plan(one_writer_per_shard(all_plans))

    return SavePlanner()


def write_step(checkpoint_dir: str, step: int, state: dict, planner=None, process_group=None) -> None:
    """Write `state` as `checkpoint_dir/<step>` and commit it, on every process of the group:
    process 0 first removes what an unfinished save of this step left, every process writes its
    own shards (torch.distributed.checkpoint; process 0 writes `.metadata` once all have), then
    process 0 writes the commit marker. The same on both engines; `planner` is the engine's."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    path = storage.join(checkpoint_dir, str(step))
    fs, root = filesystem(path)
    is_main = dist.get_rank(process_group) == 0
    if is_main and fs.exists(root):
        fs.rm(root, recursive=True)
    dist.barrier(process_group)  # the writers create the directory: not before it is gone
    dcp.save(state, storage_writer=FsspecWriter(path, per_thread_copy_ahead=0), planner=planner,
             process_group=process_group)
    if is_main:
        with fs.open(f"{root}/{COMMIT_MARKER}", "wb") as f:
            pickle.dump({"step": step, "ts": datetime.now(timezone.utc)}, f)


def release_oldest(checkpoint_dir: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0: all); incomplete ones are left alone."""
    complete = [step for step, done in step_directories(checkpoint_dir).items() if done]
    if keep > 0:
        for step in complete[:-keep]:
            fs, root = filesystem(storage.join(checkpoint_dir, str(step)))
            fs.rm(root, recursive=True)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as they live on the devices, keyed as `model.state_dict()`.

    The parameters themselves, not `state_dict()`'s detached copies: a detached XLA tensor
    loses its sharding annotation, and torch_xla would then gather the whole tensor onto the
    host (compiling a program per tensor) instead of reading this host's shards.
    """
    state = dict(model.named_parameters())
    state.update((name, buffer) for name, buffer in model.named_buffers() if name in model.state_dict())
    return state


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model's name of each parameter, in the optimizer's order (its state's indices)."""
    names = {parameter: name for name, parameter in model.named_parameters()}
    return [names[parameter] for group in optimizer.param_groups for parameter in group["params"]]


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` keyed by parameter name instead of position (as
    torch.distributed.checkpoint.state_dict keys it), its param_groups pickled: one object under
    "optimizer.param_groups" whichever planner writes it (torch_xla's keeps a list of dicts
    whole, torch's default one would split it into a key per option)."""
    names = _parameter_names(model, optimizer)
    state = optimizer.state_dict()
    groups = [{**group, "params": [names[index] for index in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[index]: value for index, value in state["state"].items()},
            "param_groups": pickle.dumps(groups)}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, named: dict) -> None:
    """The inverse of optimizer_state. A group option the checkpoint lacks (an optimizer flag of
    another torch release) keeps this optimizer's value."""
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    groups = named["param_groups"]
    groups = pickle.loads(groups) if isinstance(groups, bytes) else groups  # a list: split by option (below)
    current = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({
        "state": {index[name]: value for name, value in named["state"].items()},
        "param_groups": [{**now, **group, "params": [index[name] for name in group["params"]]}
                         for now, group in zip(current, groups)],
    })


class Checkpointer:
    """Saves and restores a run: `maybe_save(step)` at every step's end, `save(step)` on demand.

    What is shared by both engines lives here: the layout (`checkpoint_dir/<step>/`, complete
    once process 0 has written the commit marker after every process's shards), the names
    ("model.<parameter>", "optimizer.state.<parameter>.<key>", "optimizer.param_groups",
    "config", "host_<process>"), the host state, retention and the restore's checks. An engine's
    subclass holds the tensors as that engine has them and does the I/O (XlaCheckpointer,
    DTensorCheckpointer); what one engine writes, the other restores, resharded to its own mesh.

    `host_state` maps names to objects with state_dict()/load_state_dict() whose state is
    plain Python or NumPy, pickled per process. `before_save` runs first in every save: the
    trainer's waits for the run log's queued rows, whose writers' state the checkpoint holds.
    """

    def __init__(self, cfg: DictConfig, model, optimizer, host_state: dict, process_index: int = 0,
                 before_save: Callable[[], None] = lambda: None):
        self.cfg = cfg
        self.every = cfg.checkpoint_every
        self.model = model
        self.optimizer = optimizer
        self.host_state = host_state
        self.host_key = f"host_{process_index}"
        self.is_main = process_index == 0  # releases old checkpoints
        self.before_save = before_save
        self.last_saved_step: int | None = None

    # ---- an engine's part
    def model_state(self) -> dict:
        """The model's tensors, keyed as model.state_dict(), as torch.distributed.checkpoint reads
        and writes them in place on this engine."""
        raise NotImplementedError

    def write(self, step: int, state: dict, blocking: bool) -> None:
        """Write and commit `state` as step `step` (self.commit), in the background unless blocking."""
        raise NotImplementedError

    def read(self, step_directory: str, state: dict) -> None:
        """Load a step directory into `state` and the model."""
        raise NotImplementedError

    def close(self) -> None:
        """Wait for a background save to finish (and raise its error)."""

    # ---- shared
    def maybe_save(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            self.save(step)

    def save(self, step: int, blocking: bool = False) -> None:
        """Checkpoint `step` (in the background when async_checkpoint and the engine can, unless blocking)."""
        if step == self.last_saved_step:
            return
        self.before_save()  # the logs' state must include every row up to this step
        state = {
            "model": self.model_state(),
            "optimizer": optimizer_state(self.model, self.optimizer),
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            self.host_key: pickle.dumps({name: obj.state_dict() for name, obj in self.host_state.items()}),
        }
        self.write(step, state, blocking=blocking or not self.cfg.async_checkpoint)
        self.last_saved_step = step

    def commit(self, step: int, state: dict, planner=None, process_group=None) -> None:
        write_step(self.cfg.checkpoint_dir, step, state, planner, process_group)
        if self.is_main:
            release_oldest(self.cfg.checkpoint_dir, self.cfg.checkpoints_to_keep)

    def restore(self, step_directory: str) -> int:
        """Load a checkpoint of either engine into the (primed) optimizer, the model and every host state.

        A process reads its own host state, or process 0's where the checkpoint was saved by
        fewer processes (the XLA engine runs one per host, the DTensor engine one per device):
        the loop, schedule and RNGs are the same on every process, and a data position that is
        per process (the text pipeline's) refuses another process count itself."""
        check_model_matches(self.model, step_directory)
        _, step = _split_step(step_directory)
        saved = _metadata(step_directory).state_dict_metadata
        host_key = self.host_key if self.host_key in saved else "host_0"
        if host_key not in saved:
            raise UserError(f"{step_directory}: no run state in it (host_0), only weights; start from it with "
                            "checkpoint_manager_path= instead of resume=")
        # Written by a clm before 2026-12-08: on XLA the optimizer state keyed by position; on
        # DTensor the param groups split into a key per option (torch's default planner).
        indexed = any(key.startswith("optimizer.state.0.") for key in saved)
        state = {"model": self.model_state(),
                 "optimizer": self.optimizer.state_dict() if indexed else optimizer_state(self.model, self.optimizer),
                 host_key: b""}
        if "optimizer.param_groups" not in saved:
            groups = pickle.loads(state["optimizer"]["param_groups"])
            state["optimizer"]["param_groups"] = [
                {option: value for option, value in group.items() if f"optimizer.param_groups.{i}.{option}" in saved}
                for i, group in enumerate(groups)]
        with torch.no_grad():
            self.read(step_directory, state)
        if indexed:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        host = pickle.loads(state[host_key])
        for name, obj in self.host_state.items():
            obj.load_state_dict(host[name])
        self.last_saved_step = step
        return step


class XlaCheckpointer(Checkpointer):
    """The XLA engine's I/O: torch.distributed.checkpoint with torch_xla's SPMD planners (clm's
    save planner, one writer per shard), each host writing and reading only its own shards.
    A save first copies this host's shards to the host in one transfer (torch_xla's helper, as
    its CheckpointManager's asynchronous save does; a synchronous save of device tensors would
    compile a program per tensor), then writes them, on a thread of its own when asynchronous,
    through a process group of its own (the trainer's stop agreement uses the default one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._writer: ThreadPoolExecutor | None = None
        self._group = None
        self._pending: Future | None = None

    def model_state(self) -> dict:
        return model_state(self.model)

    def write(self, step: int, state: dict, blocking: bool) -> None:
        import torch.distributed as dist
        import torch_xla
        import torch_xla.core.xla_model as xm
        from torch_xla.experimental.distributed_checkpoint._helpers import _sharded_cpu_state_dict

        self.close()  # one save at a time
        if self._writer is None:
            runtime.init_process_group()
            with runtime.quiet_native_stdout():  # gloo prints a line per group
                self._group = dist.new_group()
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clm-checkpoint")
        torch_xla.sync()
        xm.wait_device_ops()
        host = _sharded_cpu_state_dict(state)
        self._pending = self._writer.submit(self.commit, step, host, save_planner(), self._group)
        if blocking:
            self.close()

    def read(self, step_directory: str, state: dict) -> None:
        read_sharded(step_directory, state)

    def close(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


class DTensorCheckpointer(Checkpointer):
    """The DTensor engine's I/O: torch.distributed.checkpoint with its default planners on the
    model's DTensors (torch.distributed.checkpoint.state_dict's model state dict), every
    process writing its own shards. Saves block (async_checkpoint is refused on this engine)."""

    def model_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def write(self, step: int, state: dict, blocking: bool) -> None:
        self.commit(step, state)

    def read(self, step_directory: str, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        dcp.load(state, storage_reader=storage_reader(step_directory))
        set_model_state_dict(self.model, state["model"])


def read_sharded(step_directory: str, state: dict) -> None:
    """Load a step directory into XLA tensors in place, each host reading only its shards
    (torch_xla's SPMD load planner), whichever engine wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

    runtime.init_process_group()
    with torch.no_grad(), _loaded_in_place(state):
        dcp.load(state, storage_reader=storage_reader(step_directory), planner=SPMDLoadPlanner())


class RNGState:
    """Every random generator a step could use on XLA: Python, NumPy, torch (CPU) and XLA's.
    A checkpoint of the DTensor engine has no XLA generator: it stays as this run seeded it."""

    def state_dict(self) -> dict:
        import torch_xla.core.xla_model as xm

        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "xla": xm.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        import torch_xla.core.xla_model as xm

        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "xla" in state:
            xm.set_rng_state(state["xla"])


# --------------------------------------------------------------- initial weights


def check_path(path: str) -> None:
    """Fail before anything is written or compiled when the checkpoint directory is missing."""
    if not storage.isdir(path):
        raise UserError(f"checkpoint_manager_path={path}: no such directory (local path or gs://bucket/prefix)")


def restore_model_weights(model: torch.nn.Module, path: str) -> int:
    """Load the model weights of the newest step under `path` into the sharded model, in place.

    This is the reference's `checkpoint_manager_path`: the starting weights (Mixtral-8x22B-v0.1
    converted once with CheckpointManager.save(0, {"model": state_dict})). Returns the step.
    A training checkpoint of this harness works too: only its "model" is read.
    """
    newest = newest_complete(path, "checkpoint_manager_path")
    if newest is None:
        raise UserError(
            f"checkpoint_manager_path={path}: no complete checkpoint in it (expected numbered step "
            f"directories with {DCP_METADATA} and {COMMIT_MARKER}, as CheckpointManager and clm write them)"
        )
    read_sharded(newest, {"model": model_state(model)})  # in place, shard by shard
    return _split_step(newest)[1]


@contextlib.contextmanager
def _loaded_in_place(state: dict):
    """Make tensors that torch.distributed.checkpoint loads in place usable by the next graph.

    Two torch_xla 2.9 quirks, both seen on the CPU backend: a loaded tensor reads back right,
    yet a graph built afterwards still computes with the buffers it had before the load (a
    copy made after the load reads the new ones, so each tensor is replaced by its copy, one
    at a time to bound the memory); and replicated tensors are loaded by a plain copy that
    drops their sharding annotation (put back, since another annotation is another compiled
    graph, with other rounding, than an uninterrupted run's).
    """
    import torch_xla
    from torch.utils._pytree import tree_leaves

    tensors = [t for t in tree_leaves(state) if isinstance(t, torch.Tensor) and t.device.type == "xla"]
    shardings = [torch_xla._XLAC._get_xla_op_sharding(t) for t in tensors]
    yield
    for tensor, sharding in zip(tensors, shardings):
        tensor.data = tensor.data.clone()
        torch_xla.sync()
        if sharding and not torch_xla._XLAC._get_xla_sharding_spec(tensor):
            torch_xla._XLAC._xla_mark_sharding(tensor, sharding)




# ---------------------------------------------------------------------- the tool


def list_checkpoints(directory: str) -> list[dict]:
    """One row per step directory: step, time, size, completeness and the config's key values."""
    fs, root = filesystem(directory)
    rows = []
    for step, complete in step_directories(directory).items():
        files = fs.find(f"{root.rstrip('/')}/{step}", detail=True)
        size = sum(info.get("size") or 0 for info in files.values())
        times = [_modified(info) for info in files.values()]
        row = {"step": step, "time": max((t for t in times if t), default=None), "size_mb": round(size / 1e6, 1)}
        if complete:
            config = saved_config(storage.join(directory, str(step)))
            row.update({key: OmegaConf.select(config, key) for key in
                        ("model.config_path", "max_length", "global_train_batch_size", "lr", "seed", "max_steps")})
        row["complete"] = complete
        rows.append(row)
    return rows


def _modified(info: dict) -> str | None:
    value = info.get("mtime") or info.get("updated") or info.get("created")
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value) if value is not None else None


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "ls":
        raise UserError("usage: python -m clm.checkpoint ls CHECKPOINT_DIR (a local directory or gs://bucket/prefix)")
    rows = list_checkpoints(argv[1])
    if not rows:
        raise UserError(f"{argv[1]}: no checkpoints there (expected numbered step directories)")
    for row in rows:
        state = "complete" if row.pop("complete") else "INCOMPLETE (ignored on resume)"
        print(" ".join(f"{key}={value}" for key, value in row.items()), state)


if __name__ == "__main__":
    sys.exit(run_command(lambda: main(sys.argv[1:])))
