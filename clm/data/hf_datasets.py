"""Documents from any Hugging Face `datasets` source, as the reference's `dataset=wikitext`.

`dataset.dataset_name` is a hub name (where the hub is reachable) or a local path that
`datasets.load_dataset` reads: a `save_to_disk` directory, or a folder of parquet / json /
csv files (split names from the file or folder names, e.g. train-*.parquet and
validation-*.parquet; otherwise every file is "train"). `dataset.dataset_config_name`
picks a configuration, `dataset.text_column` the documents' column,
`dataset.train_split` / `dataset.eval_split` the splits, `cache_local_dir` the cache.

`dataset.streaming=true` reads an IterableDataset; `false` loads and caches the splits
first (`dataset.num_proc` processes prepare them; `dataset.load_from_cache_file=false`
rebuilds that cache from the source files). Either way the rows' texts go, in row order,
into the same tokenize -> pack -> shuffle -> batch code as C4 files: a split behaves as one
JSON-lines file holding its rows. With P processes, process p reads rows p, p+P, ... (as a
C4 file shared by P processes). The resume position inside a split is a row index, or for
a streaming split the library's own IterableDataset.state_dict() with the row count.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import socket
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from clm.data.documents import DocumentChunk
from clm.errors import UserError

READ_ROWS = 64  # rows per read from the split; a chunk ends at a read's end
CHUNK_CHARS = 1 << 18  # as the file reader's chunks
TEXT_TYPES = ("string", "large_string")
HUB_PROBE_SECONDS = 3.0
NO_LIMIT = 1 << 62
EMPTY_SPLIT = re.compile(r'Instruction "([^"]+)" corresponds to no data')


@dataclass(frozen=True)
class DatasetSplit:
    """One split of a `datasets` source, as the config names it (hashable: loads are cached)."""

    name: str
    config_name: str | None
    split: str
    text_column: str
    streaming: bool
    cache_dir: str | None
    num_proc: int
    load_from_cache_file: bool

    def load(self):
        """The split, its text column only (a Dataset, or an IterableDataset when streaming)."""
        splits = load_splits(self.name, self.config_name, self.streaming, self.cache_dir, self.num_proc,
                             self.load_from_cache_file)
        dataset = splits[self.split]
        if self.streaming:
            # A fresh pipeline of examples iterables per call: an IterableDataset keeps its
            # reading position in them, so two readers of one object would clash.
            dataset = dataset.shard(num_shards=1, index=0)
        return dataset.select_columns([self.text_column])

    @property
    def key(self) -> str:
        # The last path component only, so a copy of the dataset elsewhere resumes fine.
        where = os.path.basename(self.name.rstrip("/")) or self.name
        mode = "streaming" if self.streaming else "cached"
        return f"{where}[{self.config_name or 'default'}]:{self.split}:{self.text_column}:{mode}"


def split_of(cfg, which: str) -> DatasetSplit:
    """The configured "train" or "eval" split."""
    d = cfg.dataset
    return DatasetSplit(
        name=d.dataset_name,
        config_name=d.dataset_config_name,
        split=d.train_split if which == "train" else d.eval_split,
        text_column=d.text_column,
        streaming=d.streaming,
        cache_dir=cfg.cache_local_dir,
        num_proc=d.num_proc,
        load_from_cache_file=d.load_from_cache_file,
    )


@dataclass(frozen=True)
class DatasetUnit:
    """Rows `part`, `part + num_parts`, ... of one split: the unit a process reads."""

    split: DatasetSplit
    part: int = 0
    num_parts: int = 1

    @property
    def key(self) -> str:
        return f"{self.split.key}:{self.part}/{self.num_parts}"

    def read_chunks(self, start_line=0, max_documents: int | None = None) -> Iterator[DocumentChunk]:
        """The unit's documents from `start_line` on (a row index of this unit, or a
        streaming position from an earlier chunk; 0 is the start), in chunks."""
        dataset = self.split.load()
        if self.split.streaming:
            return self._read_streaming(dataset, start_line, max_documents)
        if self.num_parts > 1:
            dataset = dataset.shard(num_shards=self.num_parts, index=self.part, contiguous=False)
        return self._read_rows(dataset, start_line, max_documents)

    def _read_rows(self, dataset, start: int, max_documents: int | None) -> Iterator[DocumentChunk]:
        column, num_rows = self.split.text_column, len(dataset)
        chunk = _ChunkBuilder(max_documents)
        row = start
        while row < num_rows and not chunk.full_of_documents:
            texts = dataset[row : min(num_rows, row + READ_ROWS, row + chunk.documents_left)][column]
            row += len(texts)
            chunk.add(texts, range(len(texts)))
            if chunk.chars >= CHUNK_CHARS:
                yield chunk.take(row, at_end=False)
        yield chunk.take(row, at_end=True)

    def _read_streaming(self, dataset, start, max_documents: int | None) -> Iterator[DocumentChunk]:
        rows = 0
        if start:
            dataset.load_state_dict(start["state"])
            rows = start["rows"]
        column = self.split.text_column
        chunk = _ChunkBuilder(max_documents)
        for batch in dataset.iter(batch_size=READ_ROWS):
            texts = batch[column]
            # Rows of the whole split are numbered; this unit keeps its share of them.
            first = (self.part - rows) % self.num_parts
            chunk.add(texts, range(first, len(texts), self.num_parts))
            rows += len(texts)
            if chunk.full_of_documents:
                break  # only the eval set stops early, and it never resumes
            if chunk.chars >= CHUNK_CHARS:
                yield chunk.take({"rows": rows, "state": dataset.state_dict()}, at_end=False)
        yield chunk.take({"rows": rows, "state": dataset.state_dict()}, at_end=True)


class _ChunkBuilder:
    """The documents of one chunk being gathered, with the reading counters."""

    def __init__(self, max_documents: int | None):
        self.documents_left = NO_LIMIT if max_documents is None else max_documents
        self.texts: list[str] = []
        self.chars = 0
        self.stats = Counter()

    @property
    def full_of_documents(self) -> bool:
        return self.documents_left <= 0

    def add(self, texts: list, indices: range) -> None:
        for i in indices:
            if self.documents_left <= 0:
                return
            text = texts[i]
            if not isinstance(text, str):  # a null in the column: counted as the file reader counts a corrupt line
                self.stats["skipped_lines"] += 1
                continue
            self.texts.append(text)
            self.chars += len(text)
            self.stats["documents"] += 1
            self.documents_left -= 1

    def take(self, end, at_end: bool) -> DocumentChunk:
        chunk = DocumentChunk(self.texts, copy.deepcopy(end), at_end, self.stats)
        self.texts, self.chars, self.stats = [], 0, Counter()
        return chunk


def describe(split: DatasetSplit) -> str:
    """One line about a split, for python -m clm.data.check."""
    dataset = split.load()
    rows = f"{dataset.num_rows:,} rows" if hasattr(dataset, "num_rows") and not split.streaming else "streaming"
    config = f" ({split.config_name})" if split.config_name else ""
    return f"{split.split} of {split.name}{config}, {rows}, text in column {split.text_column}"


def train_units(cfg, process_index: int, process_count: int) -> list[DatasetUnit]:
    return [DatasetUnit(split_of(cfg, "train"), process_index, process_count)]


def eval_units(cfg) -> list[DatasetUnit]:
    return [DatasetUnit(split_of(cfg, "eval"))]


# --------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=4)
def load_splits(name: str, config_name: str | None, streaming: bool, cache_dir: str | None, num_proc: int,
                load_from_cache_file: bool):
    """All splits of the source ({split: Dataset or IterableDataset}), loaded once per process."""
    import datasets

    # Progress bars for every file and split would bury the training log.
    datasets.disable_progress_bars()
    knob = f"dataset.dataset_name={name}"
    local = _looks_local(name)
    if local and not os.path.exists(os.path.expanduser(name)):
        raise UserError(f"{knob}: no such file or directory; give a save_to_disk directory or a folder of "
                        "parquet/json/csv files, or a Hugging Face hub name")
    if not local and not _hub_reachable():
        _work_offline()
    options = {"cache_dir": cache_dir, "streaming": streaming}
    if not streaming:
        options["num_proc"] = num_proc if num_proc > 1 else None
        # Reuse the downloaded files but build datasets' prepared cache of the splits anew.
        options["download_mode"] = None if load_from_cache_file else "reuse_cache_if_exists"
    try:
        loaded = datasets.load_dataset(os.path.expanduser(name), config_name, **options)
    except ConnectionError:  # the hub unreachable and the dataset not in the cache
        raise UserError(
            f"{knob}: not a local path, and the Hugging Face hub cannot be reached (no network, or "
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set) with no cached copy; where there is network, save it with "
            f"datasets.load_dataset({name!r}{', ' + repr(config_name) if config_name else ''}).save_to_disk(DIR), "
            "then set dataset.dataset_name=DIR dataset.dataset_config_name=null"
        ) from None
    except datasets.exceptions.DatasetNotFoundError:
        raise UserError(f"{knob}: no such dataset on the Hugging Face hub, and no such local path") from None
    except ValueError as e:  # e.g. an unknown configuration; datasets names the ones there are
        empty = EMPTY_SPLIT.search(str(e))
        if empty:  # a split without rows cannot be loaded, even when unused
            raise UserError(f"{knob}: split {empty.group(1)} is empty; remove it, or give it rows (and point "
                            "dataset.train_split / dataset.eval_split at splits with rows)") from None
        if "config" in str(e).lower():
            raise UserError(f"dataset.dataset_config_name={config_name}: {_first_line(e)} (null for a local "
                            "folder or save_to_disk copy)") from None
        raise UserError(f"{knob}: {_first_line(e)}") from None
    except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
        raise UserError(f"{knob}: {_first_line(e)}; give a save_to_disk directory or a folder of "
                        "parquet/json/csv files") from None
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):  # a single-split save_to_disk
        loaded = {"train": loaded}
    return dict(loaded)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def _hub_reachable() -> bool:
    """False in offline mode or when the hub's host does not answer within seconds; one
    quick probe instead of huggingface_hub's retries (half a minute of log lines)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS).close()
        return True
    except OSError:
        return False


def _work_offline() -> None:
    # The process cannot reach the hub either way: offline mode makes `datasets` use a cached
    # copy at once (or fail with ConnectionError) instead of retrying. Both libraries read
    # the flag at import, so it is set on their config modules.
    import datasets
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------ validation


def validate(cfg) -> None:
    """The source resolves, and both splits exist, hold rows and have a text column."""
    import datasets

    d = cfg.dataset
    splits = load_splits(d.dataset_name, d.dataset_config_name, d.streaming, cfg.cache_local_dir, d.num_proc,
                         d.load_from_cache_file)
    where = f"dataset.dataset_name={d.dataset_name}" + (f" ({d.dataset_config_name})" if d.dataset_config_name else "")
    for knob, split in (("dataset.train_split", d.train_split), ("dataset.eval_split", d.eval_split)):
        if split not in splits:
            raise UserError(f"{knob}={split}: {where} has no such split; its splits: {', '.join(splits) or 'none'}")
        dataset = splits[split]
        if isinstance(dataset, datasets.Dataset):
            columns, empty = dataset.column_names, dataset.num_rows == 0
        else:  # streaming: one row tells; a source that declares no features also names its columns there
            first_row = next(iter(dataset.take(1)), None)
            columns, empty = dataset.column_names or list(first_row or ()), first_row is None
        if empty:
            raise UserError(f"{knob}={split}: split {split} of {where} is empty; point it at a split with rows")
        if d.text_column not in columns:
            raise UserError(f"dataset.text_column={d.text_column}: split {split} of {where} has no such column; "
                            f"its columns: {', '.join(columns)}")
        feature = (dataset.features or {}).get(d.text_column)
        dtype = getattr(feature, "dtype", "string" if feature is None else type(feature).__name__)
        if dtype not in TEXT_TYPES:
            raise UserError(f"dataset.text_column={d.text_column}: split {split} of {where} holds {dtype}, "
                            f"not text; pick a string column of {', '.join(columns)}")
