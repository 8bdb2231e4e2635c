"""Tokenizing chunks of documents on worker threads, in order.

Both SentencePiece and Hugging Face tokenizers release the GIL while they encode, so
threads give real parallelism without the cost and fork hazards of worker processes
(forking a process that runs the XLA runtime can deadlock). While the workers encode,
the calling thread reads and parses the next chunks.
"""

from __future__ import annotations

import collections
import itertools
from concurrent.futures import Executor
from typing import Iterable, Iterator

import numpy as np

from clm.data.documents import DocumentChunk


def encode_concatenated(tokenizer, texts: list[str]) -> np.ndarray:
    """The token ids of all texts, one after the other, no BOS/EOS between them."""
    ids = tokenizer.encode_batch(texts)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=sum(map(len, ids)))


def tokenize_chunks(
    tokenizer, chunks: Iterable[DocumentChunk], executor: Executor, num_workers: int
) -> Iterator[tuple[DocumentChunk, np.ndarray]]:
    """(chunk, its concatenated token ids) in the order of `chunks`, num_workers at a time."""
    in_flight = collections.deque()
    for chunk in chunks:
        in_flight.append((chunk, executor.submit(encode_concatenated, tokenizer, chunk.texts)))
        # One more than the workers, so a finished worker finds its next chunk waiting.
        if len(in_flight) > num_workers:
            done, future = in_flight.popleft()
            yield done, future.result()
    for done, future in in_flight:
        yield done, future.result()
