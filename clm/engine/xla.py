"""The PyTorch/XLA SPMD engine (torch_xla 2.9): what the trainer does with torch_xla.

One process per host drives every device of it. A step is traced lazily and cut with
torch_xla.sync(), which compiles it once (one graph per step kind) and launches it over the
whole mesh; inputs become one global array sharded on the batch; a log step's values are one
stacked tensor, read on torch_xla's closure thread (one device-to-host transfer), so the host
never waits for the device inside a step. The runtime (device choice, SPMD mode, compile cache:
clm.runtime), the mesh and placements (clm.parallel), the sharded model (clm.model.build) and
checkpoints (clm.checkpoint) are the torch_xla modules this engine puts together.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.distributed.spmd as xs

from clm import checkpoint, parallel, runtime
from clm.config import XLA_ADAMW
from clm.engine.backend import XLA
from clm.errors import UserError
from clm.model.build import ShardedModel, build_sharded_model


class XlaEngine:
    name = XLA

    def __init__(self):
        self.input_sharding = None  # the batch's sharding on the model's mesh, set by build_model

    # ---- the devices
    def device_count(self) -> int:
        return runtime.device_count()

    def num_slices(self) -> int:
        return parallel.runtime_num_slices()

    def device_type(self) -> str:
        return runtime.device_type()

    def device_kind(self) -> str:
        return runtime.device_kind()

    def check(self, model_plan) -> None:
        parallel.check_multihost_input(model_plan.mesh_shape)
        compute = model_plan.cfg.model.compute_dtype
        if compute is not None:
            raise UserError(f"model.compute_dtype={compute}: not built yet on backend=xla (parameters compute in "
                            "model.dtype); use backend=dtensor or model.compute_dtype=null")
        if model_plan.cfg.compile:
            raise UserError("compile=true: backend=xla always compiles (each step is traced and compiled as XLA "
                            "graphs); use compile=false, or backend=dtensor for torch.compile")

    # ---- build
    def setup(self, cfg) -> None:
        runtime.setup(cfg.local_compile_cache_dir, cfg.full_precision, cfg.xla_compile_analysis)

    def process_index(self) -> int:
        return runtime.process_index()

    def process_count(self) -> int:
        return runtime.process_count()

    def data_shard(self) -> tuple[int, int]:
        return self.process_index(), self.process_count()  # one process per host; check refuses tensor on several

    def build_model(self, model_plan) -> ShardedModel:
        model = build_sharded_model(model_plan)
        # Several hosts each pass their own rows (minibatch); one host passes the whole batch.
        self.input_sharding = xs.ShardingSpec(model.mesh, parallel.batch_spec(), minibatch=self.process_count() > 1)
        return model

    def load_weights(self, model: ShardedModel, path: str) -> None:
        checkpoint.restore_model_weights(model.module, path)

    def optimizer_class(self, name: str) -> type:
        if name == XLA_ADAMW:
            from torch_xla.amp.syncfree import AdamW

            return AdamW
        return getattr(torch.optim, name)

    def prime_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """torch_xla's own prime_optimizer (the reference's): it syncs around the step and gives
        each zero gradient its parameter's sharding."""
        from torch_xla.experimental.distributed_checkpoint.util import prime_optimizer

        prime_optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)  # the zero gradients must not linger into step 1

    def rng_state(self) -> checkpoint.RNGState:
        return checkpoint.RNGState()

    def checkpointer(self, cfg, model: ShardedModel, optimizer, host_state: dict, before_save) -> checkpoint.XlaCheckpointer:
        return checkpoint.XlaCheckpointer(cfg, model.module, optimizer, host_state, process_index=self.process_index(),
                                       before_save=before_save)

    # ---- steps
    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Host arrays of this process's rows -> one global array sharded on batch."""
        tensors = [torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["labels"]).long()]
        input_ids, labels = xm.send_cpu_data_to_device(tensors, torch_xla.device(), self.input_sharding)
        return input_ids, labels

    def cut(self) -> None:
        torch_xla.sync()

    def run_async(self, fn, *args) -> None:
        """Run fn(*args) on torch_xla's asynchronous closure thread, after every closure queued there before.

        Call it after torch_xla.sync(): tensors in `args` are then the device data of the step just
        cut, and reading them in `fn` waits for the device on that thread, never on the caller's.
        (torch_xla's add_step_closure would hold `fn` until the next sync.)
        """
        import torch_xla.utils.closures as xc

        context = xm._get_device_context()
        handler = getattr(context, "async_closure_handler", None)
        if handler is None:  # as torch_xla creates it for its step closures, which then share the thread
            handler = context.async_closure_handler = xc.AsyncClosureHandler()
        handler.run_all([functools.partial(fn, *args)])

    def wait_for_async(self) -> None:
        """Block until every closure queued with run_async has run; re-raise its error.

        torch_xla runs those closures on a thread of its own and offers no public wait.
        """
        handler = getattr(xm._get_device_context(), "async_closure_handler", None)
        if handler is None:
            return
        # Not Queue.join(): a closure that raises stops the thread without marking its task done.
        while True:
            if not handler._closure_exception.empty():
                raise RuntimeError("a logging step closure failed") from handler._closure_exception.get()
            if not handler._closure_queue.unfinished_tasks:
                return
            time.sleep(0.005)

    def compile_count(self) -> int:
        return runtime.compile_count()

    def compile_analysis_file(self) -> str | None:
        return runtime.compile_analysis_file()

    @contextlib.contextmanager
    def profile(self, run_dir: str):
        """torch_xla's profiler, into run_dir/profile (view with TensorBoard)."""
        import torch_xla.debug.profiler as xp

        xp.start_trace(os.path.join(run_dir, "profile"))
        yield
        xm.wait_device_ops()  # the trace must cover the device's execution, not just its launch
        xp.stop_trace()
