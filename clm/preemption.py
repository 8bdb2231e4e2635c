"""Stop requests: SIGTERM (what GKE and xpk send before a preemption) and the kill switch.

Neither stops a step half-way. The signal handler only sets a flag, and the trainer asks
`StopRequests.poll()` once per optimizer step, at the step's end, and before each eval batch
(an eval of the whole validation set can outlast a preemption's notice); on a request it saves
a checkpoint of the step and exits with EXIT_PREEMPTED, and an eval cut short is redone by the
resumed run. The kill switch (`kill_switch_path`, as Intel Gaudi's Megatron-LM
`HL_KILL_SWITCH`) is a file whose appearance does the same; process 0 looks for it. With
several hosts, every host's request is combined by one tiny all-reduce on the CPU process
group, so all hosts stop at the same step (or eval batch): every process polls at the same
points. Nothing here touches the device, so a step or an eval batch gains no host sync.
"""

from __future__ import annotations

import os
import signal
import sys

import torch


class StopRequests:
    def __init__(self, kill_switch_path: str | None, process_index: int = 0, process_count: int = 1):
        self.kill_switch_path = kill_switch_path
        self.process_index = process_index
        self.process_count = process_count
        self.signal_received: int | None = None
        self._previous_handler = None

    def install(self) -> None:
        """Catch SIGTERM from now on. A second SIGTERM (e.g. during the save) is only noted."""
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum, frame) -> None:
        if self.signal_received is None:
            print("SIGTERM received: stopping after this step or eval batch with a checkpoint", file=sys.stderr,
                  flush=True)
        self.signal_received = signum

    def poll(self) -> str | None:
        """'preempted' (SIGTERM on any host), 'kill_switch' (the file exists), or None."""
        local = 0
        if self.signal_received is not None:
            local = 2
        elif self.process_index == 0 and self.kill_switch_path and os.path.exists(self.kill_switch_path):
            local = 1
        if self.process_count > 1:
            import torch.distributed as dist

            flag = torch.tensor([local], dtype=torch.int32)  # a CPU tensor: gloo, not the device
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag)
        return {0: None, 1: "kill_switch", 2: "preempted"}[local]
