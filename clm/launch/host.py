"""The per-host wrapper: python -m clm.launch.host [--error-dir DIR] -- python run_clm.py ...

Every host of a multi-host job (each pod of the JobSet, each TPU VM) runs the same command
through it: run_clm.py on TPU hosts, torchrun (which starts one run_clm.py per GPU) on GPU
nodes. It
- fills in Kubernetes Secrets named by CLM_SECRET_REFS (clm.launch.secrets), never logging them;
- runs the command, passing its output through and forwarding SIGTERM/SIGINT (preemption:
  the trainer checkpoints and exits 75; torchrun passes the signal on to its workers);
- exits with the trainer's exit code: the command's own, or, when the command failed, the one
  its clm processes left in CLM_EXIT_CODE_DIR (clm.cli), because torchrun exits 1 whatever its
  workers exited with. A worker's failure wins over another's preemption (75), so a restart
  never hides a bug or a config error;
- when the command fails, prints this host's error (the exit code and the last lines of
  stderr, i.e. the traceback) and exits with the same code, so the JobSet's failure policy
  fails or restarts the whole job at once instead of the other hosts hanging in a collective;
- with --error-dir on storage all hosts share (a GCS FUSE mount on GKE), also writes that
  error there; every other host, process 0 included, watches the directory, prints the
  failing host's error in its own log, stops its command and exits with the same code.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from clm.cli import EXIT_CODE_DIR_ENV, EXIT_CODE_SUFFIX, run_command
from clm.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from clm.launch import job, secrets

TAIL_LINES = 40  # of the failing command's stderr, in its error report
POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 10  # a host stuck in a collective with a dead peer never exits on SIGTERM


def host_index(env: dict[str, str]) -> tuple[int, int | None]:
    """(this host's process index, number of hosts or None if unknown), from the variables
    GKE sets (on a TPU VM pass TPU_WORKER_ID to the container; README).

    TPU_WORKER_ID is the host's index in its slice, TPU_WORKER_HOSTNAMES lists the slice's
    hosts, MEGASCALE_SLICE_ID/NUM_SLICES number the slices: the order torch_xla's
    process_index() follows. Read here because this wrapper must not start the TPU runtime:
    only one process per host may open the chips, and that is the trainer. A GPU node's index
    is torchrun's node rank (clm.launch.job.NODE_RANK_ENV).
    """
    if job.NODE_RANK_ENV in env:
        return int(env[job.NODE_RANK_ENV]), None
    hostnames = env.get("TPU_WORKER_HOSTNAMES")
    hosts = len(hostnames.split(",")) if hostnames else None
    worker = int(env.get("TPU_WORKER_ID", "0"))
    slice_id, num_slices = int(env.get("MEGASCALE_SLICE_ID", "0")), int(env.get("MEGASCALE_NUM_SLICES", "1"))
    if hosts is None:
        return worker, None
    return slice_id * hosts + worker, num_slices * hosts


def exit_code(returncode: int) -> int:
    """A signal death as the shell reports it (SIGKILL -> 137), which the restart policies match."""
    return 128 - returncode if returncode < 0 else returncode


def left_exit_codes(directory: Path) -> list[int]:
    """The exit codes clm processes left in `directory` (clm.cli), first to exit first. A file a
    killed process left half-written is skipped."""
    codes = []
    for path in sorted(directory.glob(f"*{EXIT_CODE_SUFFIX}"), key=lambda p: p.stat().st_mtime):
        try:
            codes.append(int(path.read_text()))
        except ValueError:
            continue
    return codes


def job_exit_code(code: int, left: list[int]) -> int:
    """This host's exit code from its command's `code` and the codes its clm processes `left`:
    the command's own when it succeeded or none were left (a worker killed by a signal leaves
    none); else the first failure (neither 0 nor 75) of any of them, else 75 if one was
    preempted (torchrun exits 1 after its workers exit 75), else the command's own."""
    if code == EXIT_OK:
        return code
    failures = [c for c in left if c not in (EXIT_OK, EXIT_PREEMPTED)]
    if failures:
        return failures[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in left else code


def error_file_name(index: int) -> str:
    # The hostname too: on TPU VMs without TPU_WORKER_ID every host would be index 0.
    return f"host-{index}-{socket.gethostname()}.err"


def peer_error(error_dir: Path, index: int, since: float) -> tuple[int, str] | None:
    """(exit code, report) of another host that failed during this attempt, if any."""
    for path in sorted(error_dir.glob("host-*.err")):
        if path.name == error_file_name(index):
            continue
        try:
            if path.stat().st_mtime < since:  # left by an earlier attempt of the job
                continue
            text = path.read_text()
        except FileNotFoundError:
            continue
        first, _, report = text.partition("\n")
        return int(first.removeprefix("exit_code=")), report
    return None


def report_failure(error_dir: Path | None, index: int, code: int, report: str) -> None:
    print(f"clm: {report}", file=sys.stderr, flush=True)
    if error_dir is not None:
        error_dir.mkdir(parents=True, exist_ok=True)
        tmp = error_dir / f".{error_file_name(index)}.tmp"
        tmp.write_text(f"exit_code={code}\n{report}")
        tmp.replace(error_dir / error_file_name(index))  # peers never read half a report


def stop(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def supervise(command: list[str], error_dir: Path | None) -> int:
    with tempfile.TemporaryDirectory(prefix="clm-exit-codes-") as exit_codes:
        return run_supervised(command, error_dir, Path(exit_codes))


def run_supervised(command: list[str], error_dir: Path | None, exit_codes: Path) -> int:
    index, count = host_index(dict(os.environ))
    name = f"host {index}/{count}" if count else f"host {index}"
    started = time.time()
    env = {**secrets.resolve_env(dict(os.environ)), EXIT_CODE_DIR_ENV: str(exit_codes)}
    try:
        child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise UserError(f"command {command[0]!r} not found (give it after --, e.g. -- python run_clm.py)") from None
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: child.send_signal(signum))

    tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)

    def pass_stderr_through():
        for line in child.stderr:
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
            tail.append(line)

    reader = threading.Thread(target=pass_stderr_through, daemon=True)
    reader.start()
    while child.poll() is None:
        peer = peer_error(error_dir, index, started) if error_dir is not None else None
        if peer is not None:
            code, report = peer
            print(f"clm: stopping {name}: {report}", file=sys.stderr, flush=True)
            stop(child)
            return code
        time.sleep(POLL_SECONDS)
    reader.join()
    code = job_exit_code(exit_code(child.returncode), left_exit_codes(exit_codes))
    if code not in (EXIT_OK, EXIT_PREEMPTED):
        lines = b"".join(tail).decode(errors="replace").rstrip()
        report_failure(error_dir, index, code,
                       f"{name} ({socket.gethostname()}) failed with exit code {code}:\n{lines}\n")
    return code


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clm.launch.host", description=__doc__.split("\n")[0])
    parser.add_argument("--error-dir", type=Path, default=None,
                        help="directory shared by all hosts where a failing host leaves its error")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python run_clm.py")
    return supervise(command, args.error_dir)


if __name__ == "__main__":
    sys.exit(run_command(lambda: main(sys.argv[1:])))
