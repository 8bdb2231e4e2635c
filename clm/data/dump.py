"""The first training samples a config's run would consume, as one array, to compare sample
order and content with another implementation (e.g. megatron-core's GPTDataset).

    python -m clm.data.dump [hydra overrides ...] --samples N --out FILE.npy [--processes P]

FILE.npy holds int64 [N, max_length + 1] in global order (micro-batch after micro-batch, each
the processes' rows in process order): row[:max_length] are a sample's inputs and
row[1:] its labels, as token ids before any loss masking (for megatron, the sample as
GPTDataset returns it; with eod_mask_loss the trainer ignores the labels of EOD inputs). A
label with no token (the last position of a packed text block) is pad_token_id.
--processes simulates the number of hosts (text sources split their files by host; megatron's
order is the same for any number). Bad input: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from clm import data
from clm.config import load_config
from clm.cli import run_command
from clm.errors import UserError


def first_samples(cfg, count: int, process_count: int = 1) -> np.ndarray:
    """int64 [count, max_length + 1]: the run's first `count` training samples, in global order."""
    if data.is_pretokenized(cfg.dataset):
        stream = data.build_train_stream(cfg, None)  # one order for any number of hosts
        return np.stack([stream.samples[stream.dataset_index(position)] for position in range(count)])
    tokenizer = data.tokenizer_for(cfg)
    streams = [data.build_train_stream(cfg, tokenizer, p, process_count) for p in range(process_count)]
    rows = []
    try:
        while len(rows) < count:
            for stream in streams:
                batch = next(stream)
                rows.extend(np.concatenate([batch["input_ids"], batch["labels"][:, -1:]], axis=1))
    finally:
        for stream in streams:
            stream.close()
    return np.stack(rows[:count]).astype(np.int64)


def dump(overrides: list[str], count: int, out: str, process_count: int, num_devices: int) -> None:
    if count < 1:
        raise UserError(f"--samples {count}: give a positive number of samples")
    if not out.endswith(".npy"):
        raise UserError(f"--out {out}: give a .npy file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"--out {out}: the directory {os.path.dirname(os.path.abspath(out))} does not exist")
    cfg = load_config(overrides, num_devices=num_devices)
    data.validate_dataset(cfg)
    samples = first_samples(cfg, count, process_count)
    np.save(out, samples)
    print(f"dump: {len(samples)} samples of {samples.shape[1]} tokens -> {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clm.data.dump", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, required=True, help="how many training samples")
    parser.add_argument("--out", required=True, help="the .npy file to write")
    parser.add_argument("--processes", type=int, default=1, help="hosts the run would have (text sources)")
    parser.add_argument("--num-devices", type=int, default=1, help="devices the global batch sizes are computed for")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, as for run_clm.py")
    args = parser.parse_intermixed_args(argv)
    return run_command(lambda: dump(args.overrides, args.samples, args.out, args.processes, args.num_devices))


if __name__ == "__main__":
    sys.exit(main())
