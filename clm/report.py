"""python -m clm.report RUN_DIR [RUN_DIR2] [--out PNG]: a run's summary table and its curves.

One run: the table is printed and run_dir/report.png holds train/eval loss, learning rate,
throughput and MoE drop fraction against the optimizer step. Two runs: side by side in
the table and overlaid in the plots (RUN_DIR/compare_<name of RUN_DIR2>.png), to compare
runs. Everything comes from what the run wrote: metrics.jsonl and mlperf_compliance.log.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
from dataclasses import dataclass, field

from clm.cli import run_command
from clm.errors import UserError

WARMUP_STEPS = 2  # the trainer's: their timing includes compilation


@dataclass
class Run:
    run_dir: str
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    mlperf: dict[str, list[dict]] = field(default_factory=dict)  # key -> its log events

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.run_dir))


def load_run(run_dir: str) -> Run:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no metrics.jsonl here; pass a run directory (output_dir/exp_name)")
    run = Run(run_dir)
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            (run.evals if "eval/loss" in row else run.train).append(row)
    log = os.path.join(run_dir, "mlperf_compliance.log")
    if os.path.isfile(log):
        with open(log) as f:
            for line in f:
                if line.startswith(":::MLLOG "):
                    event = json.loads(line[len(":::MLLOG "):])
                    run.mlperf.setdefault(event["key"], []).append(event)
    return run


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return values[-1] if values else None


def _steady(rows: list[dict]) -> list[tuple[dict, int]]:
    """Train rows after warm-up, each with the number of steps it covers. A resumed run's process
    compiles again: its clock (perf/elapsed_seconds, from the process's start) goes back, and its
    first WARMUP_STEPS steps are warm-up too."""
    covered, last, started, clock = [], 0, 0, 0.0
    for row in rows:
        elapsed = row.get("perf/elapsed_seconds")
        if elapsed is not None:
            if elapsed < clock:
                started = last  # a new process, resumed at the previous row's step
            clock = elapsed
        if last - started >= WARMUP_STEPS and row.get("perf/step_time_seconds") is not None:
            covered.append((row, row["step"] - last))
        last = row["step"]
    return covered


def _mean(rows: list[dict], key: str):
    """Mean per step after warm-up. Row times end when the logging thread sees the values, so
    a busy host can bunch rows; weighting by the steps each covers makes the shifts cancel."""
    pairs = [(r[key], n) for r, n in _steady(rows) if r.get(key) is not None]
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else None


def _throughput(rows: list[dict], per_device: bool = False):
    pairs = _steady(rows)
    seconds = sum(r["perf/step_time_seconds"] * n for r, n in pairs)
    if not seconds:
        return None
    tokens = sum(r["train/num_tokens"] * n for r, n in pairs)
    if per_device:
        devices = [r["perf/tokens_per_sec"] / r["perf/tokens_per_sec_per_device"] for r, _ in pairs
                   if r.get("perf/tokens_per_sec_per_device")]
        return tokens / seconds / devices[0] if devices else None
    return tokens / seconds


def summarize(run: Run) -> dict:
    stop = (run.mlperf.get("run_stop") or [None])[-1]
    start = (run.mlperf.get("run_start") or [None])[0]
    status = stop["metadata"].get("status") if stop else None
    eval_losses = [r["eval/loss"] for r in run.evals]
    drops = [r["moe/drop_fraction"] for r in run.train if r.get("moe/drop_fraction") is not None]
    skipped = (_last(run.train, "data/skipped_lines") or 0) + (_last(run.evals, "data/eval_skipped_lines") or 0)
    return {
        "steps": max([r["step"] for r in run.train + run.evals], default=0),
        "status": status or "unfinished",
        "final eval loss": eval_losses[-1] if eval_losses else None,
        "best eval loss": min(eval_losses) if eval_losses else None,
        "time to target s": (stop["time_ms"] - start["time_ms"]) / 1e3 if status == "success" and start else None,
        "tokens/s": _throughput(run.train),
        "tokens/s per device": _throughput(run.train, per_device=True),
        "step time s": _mean(run.train, "perf/step_time_seconds"),
        "MFU": _mean(run.train, "perf/mfu"),
        "reference MFU": _mean(run.train, "perf/reference_mfu"),
        "drop fraction": statistics.mean(drops) if drops else None,
        "compiles after warm-up": _last(run.train, "xla/compiles_after_warmup") or 0,
        "skipped lines": skipped,
    }


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(runs: list[Run]) -> str:
    summaries = [summarize(run) for run in runs]
    header = ["", *[run.name for run in runs]]
    rows = [[key, *[_fmt(s[key]) for s in summaries]] for key in summaries[0]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def throughput_curve(run: Run) -> tuple[list[int], list[float]]:
    """Tokens/s over each window between evals, at the window's last train step.

    A row's time can be late (the closure thread runs behind on a busy host: the last rows
    before an eval come stamped together), so a window of a few rows can spike or dip. The
    run log waits for every queued row before each eval, so a window that ends at an eval
    ends at a device sync; the rows after the last eval (a run stopped before it) are one more.
    """
    syncs = sorted({r["step"] for r in run.evals})
    windows: dict[int, list[tuple[dict, int]]] = {}
    for row, n in _steady(run.train):
        windows.setdefault(bisect.bisect_left(syncs, row["step"]), []).append((row, n))
    steps, values = [], []
    for window in windows.values():
        seconds = sum(r["perf/step_time_seconds"] * n for r, n in window)
        if seconds > 0:
            steps.append(window[-1][0]["step"])
            values.append(sum(r["train/num_tokens"] * n for r, n in window) / seconds)
    return steps, values


def plot(runs: list[Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [("loss", None), ("learning rate", "train/lr"), ("tokens/s (between evals)", "tokens/s"),
              ("MoE drop fraction", "moe/drop_fraction")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (title, key) in zip(axes.flat, panels):
        for i, run in enumerate(runs):
            color = f"C{i}"
            label = run.name if len(runs) > 1 else None
            if key is None:
                steps = [r["step"] for r in run.train]
                ax.plot(steps, [r["train/loss"] for r in run.train], color=color, alpha=0.6,
                        label=f"{run.name} train" if label else "train")
                ax.plot([r["step"] for r in run.evals], [r["eval/loss"] for r in run.evals], "o-", color=color,
                        markeredgecolor="black", label=f"{run.name} eval" if label else "eval")
                continue
            if key == "tokens/s":
                steps, values = throughput_curve(run)
                ax.plot(steps, values, "o-", color=color, label=label)
                continue
            rows = [r for r in run.train if r.get(key) is not None]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], color=color, label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if key is None or len(runs) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(" vs ".join(run.name for run in runs))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m clm.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one run directory, or two to compare")
    parser.add_argument("--out", help="where to write the PNG (default: in the first RUN_DIR)")
    args = parser.parse_args(argv)
    if len(args.run_dirs) > 2:
        raise UserError(f"{len(args.run_dirs)} run directories given: pass one, or two to compare")
    runs = [load_run(d) for d in args.run_dirs]
    out = args.out or os.path.join(runs[0].run_dir, "report.png" if len(runs) == 1 else f"compare_{runs[1].name}.png")
    print(table(runs))
    plot(runs, out)
    print(f"report: {out}")


if __name__ == "__main__":
    sys.exit(run_command(lambda: main(sys.argv[1:])))
