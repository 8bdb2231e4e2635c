"""The training stream: read, tokenize, pack into max_length blocks, shuffle, batch.

Per process (host), in this order:
1. Shard. The process reads only its units: files p, p+P, ... of the sorted file list
   (P processes). With fewer files than processes each file is split into line-interleaved
   parts first, so every process has work. A `datasets` split counts as one file (its rows
   are its lines). Which blocks exist depends only on the unit, never on the reading order
   or the host count.
2. Pack. A unit's documents are tokenized (no BOS/EOS), concatenated and cut into
   max_length blocks. The last partial block of a unit is dropped: at most max_length - 1
   tokens per file, about 0.02% of a C4 file at 32768 (the reference pads it with -100
   input ids instead).
3. Shuffle (cfg.shuffle). Each epoch visits the units in a seeded order, and a seeded
   shuffle buffer of dataset.shuffle_buffer_size blocks draws blocks at random, as the
   reference's streaming `datasets` shuffle does.
4. Batch. micro batch = global_train_batch_size / gradient_accumulation_steps blocks, of
   which this process yields its 1/P share; the processes' batches concatenated in process
   order form the global micro batch. Labels are the targets, already shifted: position t of
   a block is scored on the block's token t + 1, its last position on nothing.

The stream never ends: after the last unit, the next epoch starts (with a new unit order
when shuffling); training stops at max_steps long before 256 C4 files run out.

A background thread produces batches ahead of the trainer. Every batch comes with the
stream's position after it (unit, line, unconsumed tokens, shuffle buffer, RNG state,
counters), and state_dict() returns the position of the last batch handed out, so a run
resumed from it receives exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import queue
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from clm.data.encode import tokenize_chunks
from clm.data.sources import ShardUnit, is_file_source, list_split
from clm.errors import UserError

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
EMPTY_TOKENS = np.zeros(0, dtype=np.int32)


def shard_units(files: list[str], process_index: int, process_count: int) -> list[ShardUnit]:
    """This process's units. Together the processes' units cover every line exactly once."""
    parts = math.ceil(process_count / len(files))
    units = [ShardUnit(path, part, parts) for path in files for part in range(parts)]
    return units[process_index::process_count]


@dataclasses.dataclass
class _Position:
    """Where a stream stands after the last block it produced."""

    epoch: int = 0
    unit: int = 0  # index into this epoch's unit order
    line: int | dict = 0  # where that unit's reading resumes (DocumentChunk.end_line); 0 = its start
    pending: np.ndarray = dataclasses.field(default_factory=lambda: EMPTY_TOKENS)  # read, not yet in a block
    buffer: list = dataclasses.field(default_factory=list)  # the shuffle buffer's blocks
    rng_state: dict | None = None
    stats: Counter = dataclasses.field(default_factory=Counter)

    def copy(self) -> _Position:
        # Blocks and token arrays are never written after creation, so sharing them is safe.
        return dataclasses.replace(self, buffer=list(self.buffer), stats=Counter(self.stats))


class TrainStream:
    """An endless iterator of {"input_ids", "labels"}: int32 [local_batch_size, max_length];
    labels[:, t] is the target of position t (see shifted_labels)."""

    def __init__(
        self,
        units: list,  # ShardUnit, or clm.data.hf_datasets.DatasetUnit: anything with read_chunks and key
        tokenizer,
        *,
        max_length: int,
        local_batch_size: int,
        seed: int,
        shuffle: bool,
        shuffle_buffer_size: int,
        num_workers: int = 1,
        process_index: int = 0,
        process_count: int = 1,
        prefetch_batches: int = 2,
        ignore_id: int = -100,  # the label of unscored positions (pad_token_id)
        source: str = "dataset.train_dataset_path",  # the knob that names the data, for error messages
    ):
        self.units = units
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.local_batch_size = local_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer_size = shuffle_buffer_size if shuffle else 0
        self.num_workers = max(1, num_workers)
        self.process_index = process_index
        self.process_count = process_count
        self.prefetch_batches = prefetch_batches
        self.ignore_id = ignore_id
        self.source = source
        self._delivered = _Position()
        self._producer: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()

    # ------------------------------------------------------------------ consumer side

    def __iter__(self) -> TrainStream:
        return self

    def start(self) -> None:
        """Start producing in the background now, e.g. before compiling, so the shuffle
        buffer fills meanwhile (256 blocks of 32768 tokens take a while); iterating starts
        it otherwise. Call it after load_state_dict, which would discard the work."""
        if self._producer is not None:
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch_batches)
        self._producer = threading.Thread(
            target=self._produce,
            args=(self._delivered.copy(), self._stop, self._queue),
            name="clm-train-data",
            daemon=True,  # never keeps the interpreter alive
        )
        self._producer.start()

    def __next__(self) -> dict[str, np.ndarray]:
        self.start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._producer.is_alive():
                    raise RuntimeError("the training data thread ended without a batch or an error") from None
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._delivered = item
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """Counters up to the last batch handed out: documents, tokens, skipped_lines
        (corrupt JSON), replaced_utf8_lines, and the current epoch."""
        counts = {key: 0 for key in ("documents", "tokens", "skipped_lines", "replaced_utf8_lines")}
        return {**counts, **self._delivered.stats, "epoch": self._delivered.epoch}

    def state_dict(self) -> dict:
        """The position after the last batch handed out; plain Python and numpy, picklable."""
        position = self._delivered
        buffer = np.stack(position.buffer) if position.buffer else np.zeros((0, self.max_length), np.int32)
        return {
            "format": STATE_FORMAT,
            "layout": self._layout(),
            "epoch": position.epoch,
            "unit": position.unit,
            "line": position.line,
            "pending": position.pending.copy(),
            "shuffle_buffer": buffer,
            "rng_state": position.rng_state,
            "stats": dict(position.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(); batches already prefetched are discarded."""
        saved_layout, layout = state.get("layout", {}), self._layout()
        changed = sorted(key for key in layout if saved_layout.get(key) != layout[key])
        if state.get("format") != STATE_FORMAT or changed:
            raise UserError(
                f"the checkpoint's data position does not fit this run (changed: {', '.join(changed) or 'format'}); "
                "resume with the same dataset files, seed, shuffle, max_length and number of processes"
            )
        self.close()
        self._delivered = _Position(
            epoch=state["epoch"],
            unit=state["unit"],
            line=state["line"],
            pending=np.asarray(state["pending"], dtype=np.int32),
            buffer=list(np.asarray(state["shuffle_buffer"], dtype=np.int32)),
            rng_state=state["rng_state"],
            stats=Counter(state["stats"]),
        )

    def close(self) -> None:
        """Stop and join the background thread; iterating again restarts it where the
        last handed-out batch left off."""
        if self._producer is None:
            return
        self._stop.set()  # a producer waiting for room in the queue sees it within 0.1 s
        self._producer.join()
        self._producer = None

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ producer side

    def _produce(self, position: _Position, stop: threading.Event, out: queue.Queue) -> None:
        batches = self._batches(position)
        try:
            for item in batches:
                if not _put_unless_stopped(out, item, stop):
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            _put_unless_stopped(out, error, stop)
        finally:
            batches.close()

    def _batches(self, position: _Position) -> Iterator[tuple[dict, _Position]]:
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="clm-tokenize") as executor:
            rng = np.random.default_rng([self.seed, self.process_index])
            if position.rng_state is not None:
                rng.bit_generator.state = position.rng_state
            blocks = self._blocks(position, executor)
            if self.shuffle_buffer_size > 1:
                blocks = self._shuffled(blocks, position, rng)
            while True:
                input_ids = np.stack(list(itertools.islice(blocks, self.local_batch_size)))
                position.rng_state = rng.bit_generator.state
                yield {"input_ids": input_ids, "labels": shifted_labels(input_ids, self.ignore_id)}, position.copy()

    def _blocks(self, position: _Position, executor) -> Iterator[np.ndarray]:
        """Packed blocks in reading order, keeping `position` current after each one."""
        L = self.max_length
        while True:
            from_epoch_start = position.unit == 0 and position.line == 0
            blocks_this_epoch = 0
            order = self._unit_order(position.epoch)
            while position.unit < len(order):
                unit = self.units[order[position.unit]]
                chunks = unit.read_chunks(start_line=position.line)
                for chunk, tokens in tokenize_chunks(self.tokenizer, chunks, executor, self.num_workers):
                    position.stats.update(chunk.stats)
                    position.stats["tokens"] += len(tokens)
                    tokens = np.concatenate([position.pending, tokens])
                    position.line = chunk.end_line
                    for start in range(0, len(tokens) - L + 1, L):
                        position.pending = tokens[start + L :]
                        blocks_this_epoch += 1
                        yield tokens[start : start + L]
                    position.pending = tokens[len(tokens) // L * L :]
                    if chunk.at_end:
                        position.unit, position.line, position.pending = position.unit + 1, 0, EMPTY_TOKENS
            if from_epoch_start and blocks_this_epoch == 0:
                raise UserError(
                    f"{self.source}: process {self.process_index}'s share of the training data "
                    f"holds no block of max_length={L} tokens; use a smaller max_length or more data"
                )
            position.epoch, position.unit = position.epoch + 1, 0
            logger.info("training data: process %d starts epoch %d", self.process_index, position.epoch)

    def _shuffled(self, blocks: Iterator[np.ndarray], position: _Position, rng) -> Iterator[np.ndarray]:
        """The streaming shuffle buffer: once full, each new block takes the place of a
        randomly drawn one, which is yielded."""
        for block in blocks:
            if len(position.buffer) < self.shuffle_buffer_size:
                position.buffer.append(block)
                continue
            i = rng.integers(len(position.buffer))
            block, position.buffer[i] = position.buffer[i], block
            yield block

    def _unit_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.units))
        return np.random.default_rng([self.seed, self.process_index, epoch]).permutation(len(self.units))

    def _layout(self) -> dict:
        return {
            "units": [u.key for u in self.units],
            "process_index": self.process_index,
            "process_count": self.process_count,
            "max_length": self.max_length,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer_size": self.shuffle_buffer_size,
        }


def _put_unless_stopped(out: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def shifted_labels(blocks: np.ndarray, ignore_id: int) -> np.ndarray:
    """A packed block's labels: position t is scored on token t + 1 of the block; its last
    position has no target in the block and is ignored."""
    labels = np.full_like(blocks, ignore_id)
    labels[:, :-1] = blocks[:, 1:]
    return labels


def micro_batch_size(cfg, process_count: int) -> int:
    """Rows of one global micro-batch (all processes together)."""
    micro_batch_size, remainder = divmod(cfg.global_train_batch_size, cfg.gradient_accumulation_steps)
    if remainder or micro_batch_size % process_count:
        raise UserError(
            f"global_train_batch_size={cfg.global_train_batch_size} must be a multiple of "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} x {process_count} processes"
        )
    return micro_batch_size


def build_train_stream(cfg, tokenizer, process_index: int = 0, process_count: int = 1) -> TrainStream:
    """This process's share of the training micro-batches (see the module docstring)."""
    micro_batch_size_ = micro_batch_size(cfg, process_count)
    if is_file_source(cfg.dataset):
        units = shard_units(list_split(cfg.dataset, "train").check(), process_index, process_count)
        source = "dataset.train_dataset_path"
    else:
        from clm.data import hf_datasets

        units = hf_datasets.train_units(cfg, process_index, process_count)
        source = f"dataset.train_split={cfg.dataset.train_split} of dataset.dataset_name={cfg.dataset.dataset_name}"
    return TrainStream(
        units,
        tokenizer,
        max_length=cfg.max_length,
        local_batch_size=micro_batch_size_ // process_count,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        shuffle_buffer_size=cfg.dataset.shuffle_buffer_size,
        num_workers=cfg.dataset.num_proc or 1,
        process_index=process_index,
        process_count=process_count,
        ignore_id=cfg.pad_token_id,
        source=source,
    )
