"""Look at the data a config points to, before spending a pod on it.

    python -m clm.data.check [--num-devices N] [hydra overrides ...]

Lists expected vs found files (or the `datasets` splits), runs the real training stream
for one micro-batch and counts the documents and tokens it read, decodes a few of its
packed blocks, and builds the eval set to report its blocks and padding. Bad input: one line, exit status 2 (as run_clm.py).
"""

from __future__ import annotations

import argparse
import sys

from clm.config import load_config
from clm.data import build_eval_set, build_train_stream, hf_datasets, is_pretokenized, megatron, tokenizer_for
from clm.data.sources import FileListing, is_file_source, list_split, validate_dataset
from clm.cli import run_command
from clm.model.config import load_model_config

SHOWN_PATHS = 5
SHOWN_CHARS = 300


def print_listing(split: str, listing: FileListing) -> None:
    print(f"{split} files: {len(listing.expected)} expected, {len(listing.found)} found "
          f"({listing.knob}={listing.location})")
    for label, paths in (("found", listing.found), ("missing", listing.missing), ("empty", listing.empty)):
        shown = paths if len(paths) <= SHOWN_PATHS else [*paths[:2], "...", *paths[-2:]]
        for path in shown:
            print(f"  {label}: {path}")


def check_megatron(cfg) -> None:
    megatron.validate(cfg)
    with build_train_stream(cfg, None) as stream:
        samples = stream.samples
        batch = next(stream)
    print(f"train: {samples.data.prefix} ({len(samples.data.sequence_lengths):,} sequences, "
          f"{int(samples.data.sequence_lengths.sum()):,} {samples.data.dtype.__name__} tokens) -> {len(samples):,} "
          f"samples of {cfg.max_length + 1} tokens in {samples.num_epochs} epoch(s), seed {cfg.seed}")
    print(f"  first micro-batch: {len(batch['input_ids'])} samples, {int((batch['labels'] != cfg.pad_token_id).sum()):,} "
          f"scored labels (eod_mask_loss={cfg.dataset.eod_mask_loss}, eod_id={cfg.dataset.eod_id})")
    eval_set = build_eval_set(cfg, None)
    print(f"eval set: {eval_set.num_blocks} samples of {cfg.max_length + 1} tokens + {eval_set.num_padding_blocks} "
          f"padding rows = {eval_set.num_batches} batches of {cfg.global_eval_batch_size} "
          f"({eval_set.num_target_tokens:,} scored labels)")


def check(cfg, num_blocks_shown: int) -> None:
    if is_pretokenized(cfg.dataset):
        check_megatron(cfg)
        return
    if is_file_source(cfg.dataset):
        for split in ("train", "eval"):
            listing = list_split(cfg.dataset, split)
            print_listing(split, listing)
            listing.check()
    else:
        validate_dataset(cfg)
        for which in ("train", "eval"):
            print(f"{which} split: {hf_datasets.describe(hf_datasets.split_of(cfg, which))}")

    # The run's tokenizer: the pretrained directory's own, if it has one (clm.data.tokenizer).
    vocab_size = load_model_config(cfg).vocab_size
    tokenizer = tokenizer_for(cfg, vocab_size)
    print(f"tokenizer: {tokenizer.name} (vocab {tokenizer.vocab_size}, bos {tokenizer.bos_id}, eos {tokenizer.eos_id}, "
          f"pad {tokenizer.pad_id}; the model's vocab_size is {vocab_size})")

    with build_train_stream(cfg, tokenizer) as stream:
        batch = next(stream)
        stats = stream.stats
    print(f"train sample (read for the first micro-batch of {len(batch['input_ids'])} blocks): "
          f"{stats['documents']:,} documents, {stats['tokens']:,} tokens "
          f"({stats['tokens'] / max(stats['documents'], 1):,.0f} per document), "
          f"{stats['skipped_lines']} corrupt lines skipped, {stats['replaced_utf8_lines']} with invalid UTF-8 replaced")
    for i, block in enumerate(batch["input_ids"][:num_blocks_shown]):
        print(f"  block {i} ({len(block)} tokens): {tokenizer.decode(block)[:SHOWN_CHARS]!r}")

    eval_set = build_eval_set(cfg, tokenizer)
    print(f"eval set: {eval_set.stats['documents']:,} documents, {eval_set.num_tokens:,} tokens -> "
          f"{eval_set.num_blocks} blocks of {cfg.max_length} + {eval_set.num_padding_blocks} padding blocks = "
          f"{eval_set.num_batches} batches of {cfg.global_eval_batch_size} "
          f"({eval_set.num_target_tokens:,} predicted tokens); {eval_set.stats['skipped_lines']} corrupt lines "
          f"skipped, {eval_set.stats['replaced_utf8_lines']} with invalid UTF-8 replaced")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the data a clm config points to.")
    parser.add_argument("--num-devices", type=int, default=1, help="devices the global batch sizes are computed for")
    parser.add_argument("--blocks", type=int, default=2, help="packed training blocks to decode")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, as for run_clm.py")
    args = parser.parse_args(argv)
    return run_command(lambda: check(load_config(args.overrides, num_devices=args.num_devices), args.blocks))


if __name__ == "__main__":
    sys.exit(main())
