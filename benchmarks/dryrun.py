"""The v4-8 dry run on this machine's CPU: mixtral80.json, AdamW, the bundled sample, the default
4 virtual devices, as a user runs it.

    python benchmarks/dryrun.py [extra overrides]

Runs `python run_clm.py +experiment=dryrun_v4-8 dataset=sample <extra overrides>` as a child
process (on the default 4 virtual CPU devices unless CPU_NUM_DEVICES is set) and watches its memory: init_peak_gb is the peak RSS until training starts (model
built, optimizer made), peak_rss_gb the peak of the whole run. Last line:
`dryrun: steps=... peak_rss_gb=... init_peak_gb=... step_time_s=... fits=yes|no`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return 0


def main(extra: list[str]) -> None:
    out = Path(tempfile.mkdtemp(prefix="clm-dryrun-"))
    command = [sys.executable, str(REPO / "run_clm.py"), "+experiment=dryrun_v4-8", "dataset=sample",
               f"output_dir={out}", *extra]
    env = {**os.environ, "PJRT_DEVICE": os.environ.get("PJRT_DEVICE", "CPU"), "PYTHONPATH": str(REPO)}
    print("running: " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    init_peak, peak, last = 0, 0, []

    def watch():
        nonlocal peak
        while child.poll() is None:
            peak = max(peak, _peak_rss(child.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # tqdm redraws with \r: split on it too, so the progress bar's first draw (training starts)
    # is seen when it happens, not at the next newline.
    pending = ""
    while chunk := os.read(child.stdout.fileno(), 65536):
        sys.stdout.write(chunk.decode(errors="replace"))
        pending += chunk.decode(errors="replace")
        *lines, pending = re.split(r"[\r\n]", pending)
        last.extend(lines)
        if not init_peak and any(re.search(r"\btrain:", line) for line in lines + [pending]):
            init_peak = _peak_rss(child.pid)
    last.append(pending)
    child.wait()
    watcher.join()
    wall = time.perf_counter() - started
    summary_line = next((l for l in reversed(last) if l.startswith("clm: ")), "")
    fields = dict(kv.split("=", 1) for kv in summary_line.split()[1:]) if summary_line else {}
    metrics = list(out.rglob("metrics.jsonl"))
    steps = sum(1 for row in map(json.loads, metrics[0].open()) if "train/loss" in row) if metrics else 0
    print(f"dryrun: steps={steps} peak_rss_gb={peak / 1e9:.2f} init_peak_gb={init_peak / 1e9:.2f} "
          f"step_time_s={fields.get('step_time_s', 'n/a')} eval_loss={fields.get('eval_loss', 'n/a')} "
          f"exit={child.returncode} wall_s={wall:.0f} fits={'yes' if child.returncode == 0 else 'no'}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
