"""Data pipeline throughput against the bare tokenizer, on the same texts, in one run.

Writes a deterministic synthetic C4-format shard (gzipped JSON lines, >= 50 MB of
English-like text: words drawn with the word frequencies of clm's bundled sample, in
sentences and documents of C4-like lengths) as 4 files, then measures on each file in turn:
  tokenizer_tokens_per_s     the tokenizer's own encode of those texts, one thread
  tokens_per_s               the whole training pipeline (read, gunzip, JSON, tokenize,
                             pack, shuffle, batch) with dataset.num_proc=1
  multi_worker_tokens_per_s  the same with dataset.num_proc=--workers
  multi_worker_cores_used    its CPU seconds per second; well below --workers means other
                             programs held the cores, and the multi-worker rate says little
  data_pipeline[datasets]    the same texts as parquet files read through Hugging Face
                             `datasets` (dataset.dataset_name=DIR, streaming), num_proc=1;
                             printed on its own line before the summary
The pipeline runs use the real config (clm.config.load_config) at max_length 32768 and
stop once the file has been packed whole; the rates are totals over the 4 rounds.

    python benchmarks/data_pipeline.py [--megabytes 50] [--workers N]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: nothing may try the network
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clm.config import load_config  # noqa: E402
from clm.data import build_train_stream, load_tokenizer  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "clm" / "data" / "sample" / "c4-sample-train.json.gz"
SEED = 1234
ROUNDS = 4  # the shard is written as this many files, measured one after the other
MAX_LENGTH = 32768  # the benchmark's sequence length
# Smaller than c4_mlperf's 256 so the first batch comes before a 12.5 MB file is read
# twice; the buffer's size does not change the work per token.
SHUFFLE_BUFFER_BLOCKS = 16


def english_vocabulary() -> tuple[np.ndarray, np.ndarray]:
    """Words of the bundled sample and their frequencies."""
    counts = collections.Counter()
    with gzip.open(SAMPLE, "rb") as f:
        for line in f:
            counts.update(re.findall(r"[A-Za-z]+(?:'[a-z]+)?", orjson.loads(line)["text"]))
    words, freqs = zip(*counts.most_common())
    return np.array(words, dtype=object), np.array(freqs, dtype=np.float64) / sum(freqs)


def synthetic_documents(megabytes: float) -> list[str]:
    """Deterministic English-like documents, about 2 KB each like C4's, totalling `megabytes`."""
    rng = np.random.default_rng(SEED)
    words, probabilities = english_vocabulary()
    # All words at once (inverse-CDF sampling), then cut into sentences and documents.
    num_words = int(megabytes * 1e6 / 5)
    text_words = words[np.searchsorted(np.cumsum(probabilities), rng.random(num_words) * (1 - 1e-12))]
    sentence_ends = np.cumsum(rng.integers(6, 28, size=num_words // 6))
    sentences = [" ".join(s).capitalize() + "." for s in np.split(text_words, sentence_ends[sentence_ends < num_words])]
    documents, total, start = [], 0, 0
    while total < megabytes * 1e6 and start < len(sentences):
        count = max(1, int(rng.lognormal(2.7, 0.8)))
        paragraphs = [" ".join(sentences[i : i + 5]) for i in range(start, start + count, 5)]
        documents.append("\n\n".join(paragraphs))
        total += len(documents[-1])
        start += count
    return documents


def write_shard(path: Path, documents: list[str]) -> None:
    with gzip.open(path, "wb", compresslevel=1) as f:
        for i, text in enumerate(documents):
            record = {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}
            f.write(orjson.dumps(record) + b"\n")


class Clock:
    """Wall time, and CPU time of all this process's threads: their ratio is the cores it
    got, which on a shared machine tells a slow pipeline from a busy machine."""

    def __init__(self):
        self.wall, self.cpu = -time.perf_counter(), -time.process_time()

    def stop(self) -> Clock:
        self.wall += time.perf_counter()
        self.cpu += time.process_time()
        return self


def time_tokenizer(tokenizer, documents: list[str], chunk_chars: int = 1 << 18) -> tuple[int, Clock]:
    """Tokens from the tokenizer's own batch encode, one thread, in the pipeline's chunk
    size, and the time of the encode calls alone."""
    chunks, chunk, chars = [], [], 0
    for text in documents:
        chunk.append(text)
        chars += len(text)
        if chars >= chunk_chars:
            chunks.append(chunk)
            chunk, chars = [], 0
    chunks.append(chunk)
    clock = Clock()
    tokens = sum(len(ids) for chunk in chunks for ids in tokenizer.encode_batch(chunk))
    return tokens, clock.stop()


def write_parquet(directory: Path, documents: list[str]) -> None:
    import datasets

    datasets.disable_progress_bars()
    directory.mkdir()
    datasets.Dataset.from_dict({"text": documents}).to_parquet(directory / "train-00000-of-00001.parquet")


def time_pipeline(path: Path, tokenizer, num_proc: int, streaming: bool | None = None) -> Clock:
    """The time build_train_stream takes to pack every token of the file.

    Its rate counts the file's tokens (the tokenizer's count of the same texts): by the time
    the stream reports the second epoch its reader has already run ahead into that epoch,
    so the stream's own token counter would credit it with tokens of the next pass.
    """
    source = (
        ["dataset.dataset_name=json"] if streaming is None
        else [f"dataset.dataset_name={path}", f"dataset.streaming={str(streaming).lower()}", f"cache_local_dir={path}.cache"]
    )
    cfg = load_config(
        [
            *source,
            f"dataset.train_dataset_path={path}",
            f"dataset.num_proc={num_proc}",
            f"dataset.shuffle_buffer_size={SHUFFLE_BUFFER_BLOCKS}",
            f"max_length={MAX_LENGTH}",
            "global_train_batch_size=1",
            "shuffle=true",
        ],
        num_devices=1,
    )
    clock = Clock()
    with build_train_stream(cfg, tokenizer) as stream:
        for _ in stream:
            if stream.stats["epoch"] >= 1:  # every token of the file is in a block by now
                return clock.stop()
    raise AssertionError("unreachable: the stream is endless")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=50.0, help="text in the synthetic shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="dataset.num_proc of the multi-worker run")
    args = parser.parse_args()

    tokenizer = load_tokenizer(None)
    documents = synthetic_documents(args.megabytes)
    text_mb = sum(len(d.encode()) for d in documents) / 1e6
    names = ("tokenizer", "pipeline", "multi_worker", "datasets")
    totals = {name: [0, 0.0, 0.0] for name in names}  # tokens, wall, cpu
    with tempfile.TemporaryDirectory() as tmp:
        parts = [documents[i::ROUNDS] for i in range(ROUNDS)]
        paths = [Path(tmp) / f"c4-train.{768 + i:05d}-of-01024.json.gz" for i in range(ROUNDS)]
        for path, part in zip(paths, parts):
            write_shard(path, part)
            write_parquet(path.with_suffix(".parquet.d"), part)
        gzipped_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"shard: {len(documents)} documents, {text_mb:.1f} MB of text, "
              f"{gzipped_mb:.1f} MB gzipped in {ROUNDS} files")
        # Round-robin over the files, so a change in machine load hits all runs alike.
        for path, part in zip(paths, parts):
            tokens, tokenizer_clock = time_tokenizer(tokenizer, part)
            for name, clock in (
                ("tokenizer", tokenizer_clock),
                ("pipeline", time_pipeline(path, tokenizer, num_proc=1)),
                ("multi_worker", time_pipeline(path, tokenizer, num_proc=args.workers)),
                ("datasets", time_pipeline(path.with_suffix(".parquet.d"), tokenizer, num_proc=1, streaming=True)),
            ):
                totals[name][0] += tokens
                totals[name][1] += clock.wall
                totals[name][2] += clock.cpu
            so_far = (f"{name}: {tokens:,} tokens in {wall:.1f} s on {cpu / wall:.2f} cores"
                      for name, (tokens, wall, cpu) in totals.items())
            print("  " + "  ".join(so_far))

    tokenizer_rate, rate, multi_rate, datasets_rate = (tokens / wall for tokens, wall, _ in totals.values())
    multi_worker_cores = totals["multi_worker"][2] / totals["multi_worker"][1]
    print(f"data_pipeline[datasets]: tokens_per_s={datasets_rate:.0f} ratio_to_tokenizer={datasets_rate / tokenizer_rate:.3f}")
    print(
        f"data_pipeline: tokens_per_s={rate:.0f} tokenizer_tokens_per_s={tokenizer_rate:.0f} "
        f"ratio_to_tokenizer={rate / tokenizer_rate:.3f} workers={args.workers} "
        f"multi_worker_tokens_per_s={multi_rate:.0f} multi_worker_ratio_to_tokenizer={multi_rate / tokenizer_rate:.3f} "
        f"multi_worker_cores_used={multi_worker_cores:.2f}"
    )


if __name__ == "__main__":
    main()
