"""Megatron indexed datasets (.bin/.idx, local or gs://), sampled as megatron-core's GPTDataset
samples them: the source of the gpt-oss-20b benchmark (`dataset=c4_llama31`).

The data is already tokenized, so no tokenizer is loaded: the source needs only
`dataset.vocab_size` (to check the ids) and `dataset.eod_id` (for `dataset.eod_mask_loss`).

Samples, as megatron-core 0.16's GPTDataset builds them (megatron/core/datasets/gpt_dataset.py,
helpers.cpp build_sample_idx), reimplemented here with numpy and checked against megatron-core
in tests/test_megatron_data.py:
- A prefix names `PREFIX.idx` and `PREFIX.bin`. The reference's form `WEIGHT PREFIX`
  ("10 /data/c4-train.en_6_text_document") is accepted: with one prefix per split Megatron's
  BlendedMegatronDatasetBuilder builds that one GPTDataset and ignores the weight.
- num_samples: max_steps x global batch for training; validation builds one epoch.
  Epochs = the fewest whole passes over the sequences that hold num_samples x seq_length + 1
  tokens.
- One numpy RandomState(seed) draws, in this order: the document (sequence) index, every
  epoch's sequences shuffled together (the last epoch shuffled on its own when it supplies
  fewer than 80% of an epoch's samples); then the sample shuffle (the last epoch's samples
  shuffled on their own in that case).
- The sequences concatenated in document-index order form one token stream; sample k (before
  the shuffle) is tokens [k*S, k*S + S + 1) of it, S = max_length: consecutive samples share
  one token, and the last partial sample is dropped.
- The order in which training reads the dataset is Megatron-LM's sampler's
  (megatron/training/datasets/data_samplers.py), `dataset.dataloader_type`:
  single   MegatronPretrainingSampler: dataset index i at global position i.
  cyclic   MegatronPretrainingRandomSampler with `dataset.data_sharding`, the reference's
           (Primus's pre_trainer.yaml sets dataloader_type: cyclic; data_sharding is true):
           the dataset's N samples form data_parallel_size buckets of
           K = N // (micro_batch_size x data_parallel_size) x micro_batch_size; every rank reads
           its bucket in the order torch.randperm(K) seeded with the sampler epoch (0 until
           N samples are read), micro_batch_size samples per micro-step. Global position q
           is micro-step q // (mbs x dp), rank (q // mbs) % dp, its sample q % mbs. The
           geometry is the reference run's (dataset.micro_batch_size 2, dataset.data_parallel_size
           8 for gpt-oss-20b on one 8-GPU host), not clm's: it only orders the samples.
  clm's global micro-batch m (B = global batch / gradient_accumulation_steps samples) holds
  global positions m*B .. m*B + B - 1, and process p of P reads its contiguous 1/P of them.
- inputs = sample[:-1], labels = sample[1:]. With eod_mask_loss, a position whose *input* is
  the EOD id is not scored (megatron's `_get_ltor_masks_and_position_ids` masks
  `tokens == eod`, tokens being the inputs): the first token of the next document is never a
  target, the EOD that ends a document is. Position ids and the causal mask are not reset at
  EOD (reset_position_ids and reset_attention_mask are false in the reference).
- Validation: the first n_eval_examples samples of the validation prefix's GPTDataset (the
  reference's patched sampler reads samples 0 .. eval_iters x global batch - 1 from its start
  at every eval), the same ones at every eval; at most the samples one epoch holds.

Megatron pads a sample that runs past the data with its pad id; with the last partial sample
dropped (the default for both splits) no sample runs past, so there is no padding here.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from clm import storage
from clm.data.eval_set import padded_eval_set
from clm.errors import UserError

logger = logging.getLogger(__name__)

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, sequence and document counts
# megatron.core.datasets.indexed_dataset.DType, its integer codes (token ids)
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
# Tokens of each .bin read by validate_dataset for the vocabulary check, before anything
# compiles; every batch and the whole eval set are checked again as they are read.
VOCAB_SCAN_TOKENS = 1 << 22
DATALOADER_TYPES = ("single", "cyclic")
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80  # megatron's: a final epoch giving fewer samples is shuffled apart
STATE_FORMAT = 1


# --------------------------------------------------------------------------- the files


def parse_prefix(value: str | None, knob: str) -> str:
    """The path prefix of a knob: `PREFIX` or the reference's `WEIGHT PREFIX`."""
    parts = str(value or "").split()
    if len(parts) == 2:
        try:
            float(parts[0])
            parts = parts[1:]
        except ValueError:
            pass
    if len(parts) != 1:
        raise UserError(
            f"{knob}={value}: give one path prefix (without .bin/.idx), optionally after a weight as the "
            "reference writes it ('10 /data/c4-train.en_6_text_document'); blends of several prefixes are not supported"
        )
    prefix = parts[0]
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            raise UserError(f"{knob}={value}: give the path prefix without {suffix}, e.g. {prefix[: -len(suffix)]}")
    return prefix


@dataclass
class IndexedData:
    """One .bin/.idx pair: the token sequences (Megatron's "sequences"; one per document here)."""

    prefix: str
    knob: str
    dtype: type
    sequence_lengths: np.ndarray  # int32 tokens per sequence
    sequence_pointers: np.ndarray  # int64 byte offset of each sequence in the .bin

    @property
    def bin_path(self) -> str:
        return self.prefix + ".bin"

    @classmethod
    def open(cls, prefix: str, knob: str) -> IndexedData:
        dtype, count, _ = check_pair(prefix, knob)
        arrays = storage.read_range(prefix + ".idx", HEADER_BYTES, count * (4 + 8))
        lengths = np.frombuffer(arrays, dtype=np.int32, count=count)
        pointers = np.frombuffer(arrays, dtype=np.int64, count=count, offset=count * 4)  # after the lengths
        return cls(prefix, knob, dtype, lengths, pointers)

    def read(self, sequence: int, offset: int, length: int) -> np.ndarray:
        itemsize = np.dtype(self.dtype).itemsize
        start = int(self.sequence_pointers[sequence]) + offset * itemsize
        data = storage.read_range(self.bin_path, start, length * itemsize)
        return np.frombuffer(data, dtype=self.dtype)


def check_pair(prefix: str, knob: str) -> tuple[type, int, int]:
    """Both files there, a Megatron index of version 1, and a .bin of exactly the size the .idx
    describes; reads only the header and two numbers. Returns (dtype, sequences, documents)."""
    where = f"{knob}={prefix}"
    for suffix in (".idx", ".bin"):
        if not storage.exists(prefix + suffix):
            raise UserError(f"{where}: {prefix}{suffix} not found; the prefix must name a Megatron indexed "
                            "dataset's .bin and .idx pair (the path without the suffix)")
    idx_size = storage.size(prefix + ".idx")
    header = storage.read_range(prefix + ".idx", 0, HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise UserError(f"{where}: {prefix}.idx is not a Megatron indexed-dataset index (bad header)")
    version, code, count, documents = struct.unpack("<QBQQ", header[len(INDEX_HEADER):])
    if version != INDEX_VERSION or code not in DTYPE_CODES:
        raise UserError(f"{where}: {prefix}.idx has index version {version} and dtype code {code}; "
                        f"clm reads version {INDEX_VERSION} with integer token ids, as megatron-core writes them")
    expected_idx = HEADER_BYTES + count * (4 + 8) + documents * 8
    if idx_size < expected_idx:
        raise UserError(f"{where}: {prefix}.idx is {idx_size} bytes but its header describes {count} sequences "
                        f"({expected_idx} bytes); the file is truncated, copy it again")
    if count == 0:
        raise UserError(f"{where}: the dataset holds no sequences")
    dtype = DTYPE_CODES[code]
    last_length = np.frombuffer(storage.read_range(prefix + ".idx", HEADER_BYTES + (count - 1) * 4, 4), np.int32)[0]
    last_pointer = np.frombuffer(storage.read_range(prefix + ".idx", HEADER_BYTES + count * 4 + (count - 1) * 8, 8),
                                 np.int64)[0]
    expected_bin = int(last_pointer) + int(last_length) * np.dtype(dtype).itemsize
    bin_size = storage.size(prefix + ".bin")
    if bin_size != expected_bin:
        raise UserError(
            f"{where}: {prefix}.bin is {bin_size} bytes but {prefix}.idx describes {expected_bin}; the two files "
            "are not one pair (written by different preprocessing runs, or one is truncated)"
        )
    return dtype, count, documents


def check_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    """Every id within the vocabulary, in one line naming the largest one."""
    if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise UserError(
            f"dataset.vocab_size={vocab_size}: {where} holds token id {bad}, outside the vocabulary; set "
            "dataset.vocab_size to the tokenizer's vocabulary (128256 for Llama 3.1) or use data tokenized for this one"
        )


def validate(cfg) -> None:
    """Checks that take seconds: the knobs, both pairs of files, and the ids of each .bin's
    first VOCAB_SCAN_TOKENS tokens against dataset.vocab_size."""
    d = cfg.dataset
    if not d.vocab_size or d.vocab_size < 1:
        raise UserError(f"dataset.vocab_size={d.vocab_size}: set the vocabulary size of the tokenizer the data was "
                        "tokenized with (128256 for Llama 3.1)")
    if d.eod_mask_loss and (d.eod_id is None or not 0 <= d.eod_id < d.vocab_size):
        raise UserError(f"dataset.eod_id={d.eod_id}: dataset.eod_mask_loss=true needs the end-of-document id, "
                        f"below dataset.vocab_size={d.vocab_size} (128001, <|end_of_text|>, for Llama 3.1)")
    if d.dataloader_type not in DATALOADER_TYPES:
        raise UserError(f"dataset.dataloader_type={d.dataloader_type}: use one of {', '.join(DATALOADER_TYPES)} "
                        "(Megatron-LM's samplers; the reference's is cyclic)")
    if d.dataloader_type == "cyclic":
        for knob in ("micro_batch_size", "data_parallel_size"):
            if not d[knob] or d[knob] < 1:
                raise UserError(f"dataset.{knob}={d[knob]}: dataloader_type=cyclic orders the samples by the "
                                "reference run's micro batch and data-parallel size (2 and 8 for gpt-oss-20b)")
    for split in ("train", "eval"):
        knob = f"dataset.{split}_dataset_path"
        prefix = parse_prefix(d[f"{split}_dataset_path"], knob)
        dtype, count, _ = check_pair(prefix, knob)
        itemsize = np.dtype(dtype).itemsize
        head = storage.read_range(prefix + ".bin", 0, VOCAB_SCAN_TOKENS * itemsize)
        check_ids(np.frombuffer(head, dtype=dtype), d.vocab_size, f"{prefix}.bin")


# --------------------------------------------------------------------------- the samples


class GPTSamples:
    """megatron-core GPTDataset's samples of one IndexedData: sample i is int64 [seq_length + 1]."""

    def __init__(self, data: IndexedData, seq_length: int, num_samples: int | None, seed: int):
        self.data = data
        self.seq_length = seq_length
        self.requested = num_samples
        lengths = data.sequence_lengths
        tokens_per_epoch = int(lengths.sum(dtype=np.int64))
        num_epochs = 1
        if num_samples is not None:  # the fewest epochs holding num_samples x S + 1 tokens
            num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_final_epoch = False
        if num_epochs > 1:
            sans_final_epoch = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
            from_final_epoch = num_samples - sans_final_epoch
            separate_final_epoch = from_final_epoch < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)

        rng = np.random.RandomState(seed)
        sequences = np.arange(len(lengths), dtype=np.int32)
        if separate_final_epoch:
            self.document_index = np.concatenate([_shuffled(np.tile(sequences, num_epochs - 1), rng),
                                                  _shuffled(sequences.copy(), rng)])
        else:
            self.document_index = _shuffled(np.tile(sequences, num_epochs), rng)
        # End of each document-index entry in the concatenated token stream.
        self.document_ends = np.cumsum(lengths[self.document_index], dtype=np.int64)
        self.num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
        if self.num_samples < 1:
            raise UserError(f"{data.knob}={data.prefix}: {tokens_per_epoch} tokens hold no sample of "
                            f"max_length + 1 = {seq_length + 1} tokens; use a smaller max_length or more data")
        index_dtype = np.int64 if self.num_samples >= np.iinfo(np.uint32).max - 1 else np.uint32
        first = sans_final_epoch if separate_final_epoch else self.num_samples
        self.shuffle_index = _shuffled(np.arange(first, dtype=index_dtype), rng)
        if first < self.num_samples:
            self.shuffle_index = np.concatenate(
                [self.shuffle_index, _shuffled(np.arange(first, self.num_samples, dtype=index_dtype), rng)])
        self.num_epochs = num_epochs

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.shuffle_index[i]) * self.seq_length
        end = start + self.seq_length + 1
        first, last = np.searchsorted(self.document_ends, [start, end - 1], side="right")
        parts = []
        for entry in range(first, last + 1):
            sequence = int(self.document_index[entry])
            doc_end = int(self.document_ends[entry])
            doc_start = doc_end - int(self.data.sequence_lengths[sequence])
            lo, hi = max(start, doc_start), min(end, doc_end)
            parts.append(self.data.read(sequence, lo - doc_start, hi - lo))
        return np.concatenate(parts).astype(np.int64)


def _shuffled(array: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    rng.shuffle(array)
    return array


def to_batch(samples: np.ndarray, *, eod_id: int | None, eod_mask_loss: bool, ignore_id: int) -> dict[str, np.ndarray]:
    """[rows, S + 1] samples -> int32 inputs and labels [rows, S] (labels already shifted)."""
    samples = samples.astype(np.int32)
    input_ids, labels = samples[:, :-1], samples[:, 1:].copy()
    if eod_mask_loss:
        labels[input_ids == eod_id] = ignore_id
    return {"input_ids": np.ascontiguousarray(input_ids), "labels": labels}


# --------------------------------------------------------------------------- training


class MegatronTrainStream:
    """An endless iterator of this process's micro-batches {"input_ids", "labels"}: int32
    [local_batch_size, max_length]; the same interface as clm.data.train_stream.TrainStream.

    The position is the number of samples (all processes together) of the micro-batches
    handed out, so a resumed run reads exactly the samples the uninterrupted one would
    have, on any number of processes that splits the micro-batch. Samples are read ahead by
    `num_workers` threads. Past the last sample (only when max_steps is raised on resume:
    num_samples stays the checkpoint's) the samples repeat from the first.
    """

    def __init__(self, cfg, *, micro_batch_size: int, process_index: int, process_count: int,
                 num_workers: int = 1, prefetch_batches: int = 2):
        d = cfg.dataset
        self.sampler = Sampler(d.dataloader_type, d.data_sharding, d.micro_batch_size, d.data_parallel_size)
        self.prefix = parse_prefix(d.train_dataset_path, "dataset.train_dataset_path")
        self.max_length = cfg.max_length
        self.seed = cfg.seed
        self.num_samples = cfg.max_steps * cfg.global_train_batch_size
        self.micro_batch_size = micro_batch_size
        self.local_batch_size = micro_batch_size // process_count
        self.process_index = process_index
        self.vocab_size = d.vocab_size
        self.batch_options = dict(eod_id=d.eod_id, eod_mask_loss=d.eod_mask_loss, ignore_id=cfg.pad_token_id)
        self.num_workers = max(1, num_workers)
        self.prefetch_batches = prefetch_batches
        self.consumed = 0  # samples of all processes in the micro-batches handed out
        self._samples: GPTSamples | None = None  # built on first use, for self.num_samples
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._next_row = 0  # this process's next row to submit, counted over its rows only

    @property
    def samples(self) -> GPTSamples:
        if self._samples is None or self._samples.requested != self.num_samples:
            data = IndexedData.open(self.prefix, "dataset.train_dataset_path")
            self._samples = GPTSamples(data, self.max_length, self.num_samples, self.seed)
            logger.info("training data: %d samples of %d tokens in %d epoch(s) of %s", len(self._samples),
                        self.max_length + 1, self._samples.num_epochs, self.prefix)
        return self._samples

    def dataset_index(self, position: int) -> int:
        """The dataset index read at a global position (all processes' rows, in order)."""
        return self.sampler.index(position, len(self.samples))

    def sample_id(self, row: int) -> int:
        """The dataset index of this process's row-th row (counted over its rows)."""
        micro_batch, r = divmod(row, self.local_batch_size)
        return self.dataset_index(micro_batch * self.micro_batch_size + self.process_index * self.local_batch_size + r)

    def __iter__(self) -> MegatronTrainStream:
        return self

    def start(self) -> None:
        if self._executor is not None:
            return
        self.samples  # noqa: B018 - build the index before the first step
        self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="clm-megatron-data")
        self._next_row = self.consumed // self.micro_batch_size * self.local_batch_size
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self.prefetch_batches * self.local_batch_size:
            self._pending.append(self._executor.submit(self.samples.__getitem__, self.sample_id(self._next_row)))
            self._next_row += 1

    def __next__(self) -> dict[str, np.ndarray]:
        self.start()
        futures = [self._pending.popleft() for _ in range(self.local_batch_size)]
        self._fill()
        samples = np.stack([f.result() for f in futures])
        check_ids(samples, self.vocab_size, f"{self.prefix}.bin")
        self.consumed += self.micro_batch_size
        return to_batch(samples, **self.batch_options)

    @property
    def stats(self) -> dict[str, int]:
        return {"samples": self.consumed, "skipped_lines": 0}

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "layout": self._layout(), "consumed_samples": self.consumed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        saved, layout = state.get("layout", {}), self._layout()
        changed = sorted(key for key in layout if saved.get(key) != layout[key])
        if state.get("format") != STATE_FORMAT or changed or state["consumed_samples"] % self.micro_batch_size:
            raise UserError(
                f"the checkpoint's data position does not fit this run (changed: {', '.join(changed) or 'format'}); "
                "resume with the same dataset prefix, seed and max_length, and a micro-batch that divides "
                f"the {state.get('consumed_samples')} samples read"
            )
        self.close()
        self.consumed = state["consumed_samples"]
        # The sample order depends on num_samples (max_steps x global batch): keep the checkpoint's.
        self.num_samples = state["num_samples"]

    def close(self) -> None:
        if self._executor is None:
            return
        for future in self._pending:
            future.cancel()
        self._executor.shutdown(wait=True)
        self._executor = None
        self._pending.clear()

    def __enter__(self) -> MegatronTrainStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _layout(self) -> dict:
        return {"prefix": self.prefix.rsplit("/", 1)[-1], "seed": self.seed, "max_length": self.max_length,
                "sampler": repr(self.sampler)}


class Sampler:
    """Megatron-LM's training samplers as a map from global position to dataset index (see the
    module docstring); positions past the sampler's epoch start its next one, as Megatron's
    cyclic iterator does."""

    def __init__(self, dataloader_type: str, data_sharding: bool, micro_batch_size: int | None,
                 data_parallel_size: int | None):
        self.dataloader_type = dataloader_type
        self.data_sharding = data_sharding
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self._permutation: tuple[int, int, np.ndarray] | None = None  # (epoch, size, torch.randperm)

    def __repr__(self) -> str:
        if self.dataloader_type == "single":
            return "single"
        return (f"cyclic(data_sharding={self.data_sharding}, micro_batch_size={self.micro_batch_size}, "
                f"data_parallel_size={self.data_parallel_size})")

    def index(self, position: int, num_samples: int) -> int:
        if self.dataloader_type == "single":
            return position % num_samples
        mbs, dp = self.micro_batch_size, self.data_parallel_size
        per_step = mbs * dp
        active = num_samples - num_samples % per_step  # the last incomplete micro-step is dropped
        epoch, position = divmod(position, active)
        step, within = divmod(position, per_step)
        rank, j = divmod(within, mbs)
        if self.data_sharding:
            bucket = num_samples // per_step * mbs
            return rank * bucket + int(self.permutation(epoch, bucket)[step * mbs + j])
        # Without sharding: one permutation of every whole micro-batch, dealt to the ranks in turn.
        return int(self.permutation(epoch, num_samples // mbs * mbs)[step * per_step + j * dp + rank])

    def permutation(self, epoch: int, size: int) -> np.ndarray:
        if self._permutation is None or self._permutation[:2] != (epoch, size):
            import torch

            generator = torch.Generator()
            generator.manual_seed(epoch)
            self._permutation = (epoch, size, torch.randperm(size, generator=generator).numpy())
        return self._permutation[2]


def build_train_stream(cfg, micro_batch_size: int, process_index: int = 0, process_count: int = 1):
    return MegatronTrainStream(cfg, micro_batch_size=micro_batch_size, process_index=process_index,
                               process_count=process_count, num_workers=cfg.dataset.num_proc or 1)


# --------------------------------------------------------------------------- validation


def build_eval_set(cfg, process_index: int = 0, process_count: int = 1):
    """This process's rows of the validation samples (eval_samples), padded to whole global batches."""
    samples = eval_samples(cfg)
    batch = to_batch(samples, eod_id=cfg.dataset.eod_id, eod_mask_loss=cfg.dataset.eod_mask_loss,
                     ignore_id=cfg.pad_token_id)
    return padded_eval_set(cfg, batch["input_ids"], batch["labels"], cfg.dataset.eod_id or 0, batch["input_ids"].size,
                           {"samples": len(samples), "skipped_lines": 0}, process_index, process_count)


def eval_samples(cfg) -> np.ndarray:
    """The validation samples, int64 [n, max_length + 1]: the first n_eval_examples samples of
    the validation prefix's GPTDataset (one epoch; all of them when n_eval_examples is null)."""
    prefix = parse_prefix(cfg.dataset.eval_dataset_path, "dataset.eval_dataset_path")
    samples = GPTSamples(IndexedData.open(prefix, "dataset.eval_dataset_path"), cfg.max_length, None, cfg.seed)
    count = len(samples) if cfg.n_eval_examples is None else min(cfg.n_eval_examples, len(samples))
    if count < (cfg.n_eval_examples or 0):
        logger.warning("validation data: %s holds %d samples of %d tokens, fewer than n_eval_examples=%d; "
                       "evaluating on those %d", prefix, len(samples), cfg.max_length + 1, cfg.n_eval_examples, count)
    rows = np.stack([samples[i] for i in range(count)])
    check_ids(rows, cfg.dataset.vocab_size, f"{prefix}.bin")
    return rows
