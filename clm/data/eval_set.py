"""The evaluation set, exactly as the reference builds it, minus its -100 input ids.

The whole validation set (its first n_eval_examples documents when set; for a `datasets`
source, the rows of dataset.eval_split) is tokenized without BOS/EOS, concatenated in file
order and cut into max_length blocks; the last block is padded. Then fully ignored blocks
pad the count to a multiple of global_eval_batch_size. Padded positions get the tokenizer's
EOS id as input (a valid id; the reference fed -100, which works only by accident on TPU)
and cfg.pad_token_id as label, so they weigh nothing in the token-weighted eval loss. Labels
are shifted as in training: position t is scored on its block's token t + 1, a block's last
position on nothing.

Every process tokenizes the whole set: the block boundaries depend on every document
before them, and the 24,567 validation documents take seconds. Each process keeps only
its rows of every global batch: rows [p * G/P, (p+1) * G/P) of batch j, in order.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from clm.data.encode import tokenize_chunks
from clm.data.sources import ShardUnit, is_file_source, list_split
from clm.data.train_stream import shifted_labels
from clm.errors import UserError


class EvalSet:
    """This process's rows of the padded eval set, and the global counts."""

    def __init__(
        self,
        input_ids: np.ndarray,
        labels: np.ndarray,
        local_batch_size: int,
        *,
        num_blocks: int,
        num_padding_blocks: int,
        num_tokens: int,
        num_target_tokens: int,
        stats: dict[str, int],
    ):
        self.input_ids = input_ids
        self.labels = labels
        self.local_batch_size = local_batch_size
        self.num_blocks = num_blocks  # blocks holding real tokens, the last one maybe partial
        self.num_padding_blocks = num_padding_blocks  # fully ignored blocks added
        self.num_tokens = num_tokens  # tokens of the eval set, all processes together
        self.num_target_tokens = num_target_tokens  # of those, the ones scored (labels not ignored)
        self.stats = stats  # skipped_lines; documents, replaced_utf8_lines (text sources)

    @property
    def num_batches(self) -> int:
        return len(self.input_ids) // self.local_batch_size

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.input_ids), self.local_batch_size):
            rows = slice(start, start + self.local_batch_size)
            yield {"input_ids": self.input_ids[rows], "labels": self.labels[rows]}


def build_eval_set(cfg, tokenizer, process_index: int = 0, process_count: int = 1) -> EvalSet:
    if is_file_source(cfg.dataset):
        units = [ShardUnit(path) for path in list_split(cfg.dataset, "eval").check()]
        source = f"dataset.eval_dataset_path={cfg.dataset.eval_dataset_path}"
    else:
        from clm.data import hf_datasets

        units = hf_datasets.eval_units(cfg)
        source = f"dataset.eval_split={cfg.dataset.eval_split} of dataset.dataset_name={cfg.dataset.dataset_name}"
    tokens, stats = _tokenize_documents(units, tokenizer, cfg.n_eval_examples, cfg.dataset.num_proc or 1)
    if len(tokens) == 0:
        raise UserError(f"{source}: no documents with text found")

    L = cfg.max_length
    num_blocks = -(-len(tokens) // L)
    input_ids = np.full(num_blocks * L, tokenizer.pad_id, dtype=np.int32)
    blocks = np.full(num_blocks * L, cfg.pad_token_id, dtype=np.int32)
    input_ids[: len(tokens)] = tokens
    blocks[: len(tokens)] = tokens
    # Blocks are whole rows, so only a block's first token goes unpredicted.
    labels = shifted_labels(blocks.reshape(num_blocks, L), cfg.pad_token_id)
    return padded_eval_set(cfg, input_ids.reshape(num_blocks, L), labels, tokenizer.pad_id, len(tokens), stats,
                           process_index, process_count)


def padded_eval_set(cfg, input_ids: np.ndarray, labels: np.ndarray, pad_input_id: int, num_tokens: int,
                    stats: dict, process_index: int, process_count: int) -> EvalSet:
    """Rows of inputs and (shifted) labels, padded with fully ignored rows to whole global
    batches, of which this process keeps its rows."""
    global_batch_size = cfg.global_eval_batch_size
    if global_batch_size % process_count:
        raise UserError(
            f"global_eval_batch_size={global_batch_size} must be a multiple of the {process_count} processes"
        )
    num_blocks, L = input_ids.shape
    num_batches = -(-num_blocks // global_batch_size)
    padding = num_batches * global_batch_size - num_blocks

    def local_rows(array: np.ndarray, fill: int) -> np.ndarray:
        array = np.concatenate([array, np.full((padding, L), fill, dtype=np.int32)])
        per_batch = array.reshape(num_batches, process_count, global_batch_size // process_count, L)
        return np.ascontiguousarray(per_batch[:, process_index].reshape(-1, L))

    return EvalSet(
        local_rows(input_ids, pad_input_id),
        local_rows(labels, cfg.pad_token_id),
        global_batch_size // process_count,
        num_blocks=num_blocks,
        num_padding_blocks=padding,
        num_tokens=num_tokens,
        num_target_tokens=int((labels != cfg.pad_token_id).sum()),
        stats=stats,
    )


def _tokenize_documents(units: list, tokenizer, max_documents: int | None, num_workers: int):
    """All documents' tokens concatenated in unit (file) order, and the reading counters."""
    pieces, stats = [], Counter(documents=0, skipped_lines=0, replaced_utf8_lines=0)
    with ThreadPoolExecutor(num_workers, thread_name_prefix="clm-tokenize") as executor:
        for unit in units:
            remaining = None if max_documents is None else max_documents - stats["documents"]
            if remaining == 0:
                break
            chunks = unit.read_chunks(max_documents=remaining)
            for chunk, tokens in tokenize_chunks(tokenizer, chunks, executor, num_workers):
                stats.update(chunk.stats)
                pieces.append(tokens)
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32), dict(stats)
