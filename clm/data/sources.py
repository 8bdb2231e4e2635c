"""Where the documents come from: the expected files, and reading them as JSON lines.

`dataset.dataset_name` picks the source:
  c4_mlperf  the MLPerf C4 resplit: c4-train.{00768..01023}-of-01024.json[.gz] under
             dataset.train_dataset_path, c4-validation_24567exp.json[.gz] under
             dataset.eval_dataset_path (local directories or gs:// prefixes).
  json       the user's own JSON lines with a "text" field: a file, a directory (its
             .json/.jsonl files, gzipped or not) or a glob, local or gs://.
  any other  a Hugging Face `datasets` name or local path (clm.data.hf_datasets).

A source hands the rest of the pipeline "units" (ShardUnit here, DatasetUnit there): each
reads its documents in DocumentChunks (clm.data.documents) from a resume position, so packing, shuffling,
batching, the eval set and the resumable position are the same code for every source.

Reading is forgiving where the reference's datasets loader would crash mid-run: a corrupt
line is skipped and counted, invalid UTF-8 is replaced (U+FFFD) and counted.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import orjson

from clm import storage
from clm.data import hf_datasets
from clm.data.documents import DocumentChunk
from clm.errors import UserError

logger = logging.getLogger(__name__)

C4_TRAIN_FILES = tuple(f"c4-train.{i:05d}-of-01024.json" for i in range(768, 1024))
C4_VALIDATION_FILES = ("c4-validation_24567exp.json",)
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
GZIP_MAGIC = b"\x1f\x8b"
READ_BLOCK_BYTES = 1 << 20
# A broken file could have millions of bad lines; the first few, with their line numbers,
# are enough to find the problem, the rest are only counted.
MAX_WARNINGS_PER_FILE = 5


@dataclass
class FileListing:
    """The files a split needs: `found` in order, plus what is wrong with the rest."""

    knob: str  # the config key that names the location, for error messages
    location: str
    hint: str  # what would work, for error messages
    expected: list[str]
    found: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)

    def check(self) -> list[str]:
        """The found paths; a UserError naming the first problem if any file is missing or empty."""
        where = f"{self.knob}={self.location}"
        if self.missing:
            raise UserError(
                f"{where}: {len(self.missing)} of {len(self.expected)} expected files are missing, the first is "
                f"{self.missing[0]}; {self.hint}"
            )
        if self.empty:
            raise UserError(
                f"{where}: {len(self.empty)} file(s) are empty, the first is {self.empty[0]}; "
                "re-download or regenerate it"
            )
        if not self.found:
            raise UserError(f"{where}: no JSON-lines files there; {self.hint}")
        return self.found


def list_split(dataset_cfg, split: str) -> FileListing:
    """The expected and found files of split "train" or "eval"."""
    knob = f"dataset.{split}_dataset_path"
    location = dataset_cfg[f"{split}_dataset_path"]
    if not location:
        raise UserError(f"{knob} is not set; give a local directory or a gs:// prefix")
    name = dataset_cfg.dataset_name
    if not is_file_source(dataset_cfg):
        raise ValueError(f"dataset.dataset_name={name} is a `datasets` source: it has no file listing")
    try:
        if name == "c4_mlperf":
            return _list_c4(knob, location, C4_TRAIN_FILES if split == "train" else C4_VALIDATION_FILES)
        return _list_json(knob, location)
    except UserError as error:  # from storage: no such bucket, permission denied, no credentials
        raise UserError(f"{knob}: {error}") from None


FILE_SOURCES = ("c4_mlperf", "json")


def is_file_source(dataset_cfg) -> bool:
    """C4-layout or JSON-lines files read by this module; otherwise a `datasets` source."""
    return dataset_cfg.dataset_name in FILE_SOURCES


def validate_dataset(cfg) -> None:
    """Checks that fail in seconds, before anything compiles. Files: listings only, nothing
    read, every expected file there and not empty. `datasets`: the name resolves, both
    splits exist, hold rows and have the text column."""
    if not is_file_source(cfg.dataset):
        hf_datasets.validate(cfg)
        return
    for split in ("train", "eval"):
        list_split(cfg.dataset, split).check()


def _list_c4(knob: str, directory: str, names: tuple[str, ...]) -> FileListing:
    hint = f"point {knob} at the local directory or gs:// prefix holding {names[0]}[.gz]" + (
        f" ... {names[-1]}[.gz]" if len(names) > 1 else ""
    )
    sizes = storage.list_files(directory)
    listing = FileListing(knob, directory, hint, expected=[storage.join(directory, n) for n in names])
    for name in names:
        # Plain .json as the reference reads it, else the .json.gz the C4 release ships.
        present = next((n for n in (name, name + ".gz") if n in sizes), None)
        if present is None:
            listing.missing.append(storage.join(directory, name))
        elif sizes[present] == 0:
            listing.empty.append(storage.join(directory, present))
        else:
            listing.found.append(storage.join(directory, present))
    return listing


def _list_json(knob: str, location: str) -> FileListing:
    hint = f"give a JSON-lines file, a directory of {'/'.join(JSON_SUFFIXES)} files, or a glob"
    if any(c in location for c in "*?["):
        sizes = {path: storage.size(path) for path in storage.glob(location)}
    elif storage.isdir(location):
        listed = storage.list_files(location)
        sizes = {storage.join(location, n): listed[n] for n in sorted(listed) if n.endswith(JSON_SUFFIXES)}
    elif storage.exists(location):
        sizes = {location: storage.size(location)}
    else:
        return FileListing(knob, location, hint, expected=[location], missing=[location])
    return FileListing(
        knob,
        location,
        hint,
        expected=list(sizes),
        found=[path for path, size in sizes.items() if size > 0],
        empty=[path for path, size in sizes.items() if size == 0],
    )


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardUnit:
    """Lines `part`, `part + num_parts`, ... of one file: the unit a process reads.

    Files are split into parts only when there are fewer files than processes."""

    path: str
    part: int = 0
    num_parts: int = 1

    @property
    def key(self) -> str:
        # The file's name rather than its full path: a dataset copied to another bucket resumes fine.
        return f"{os.path.basename(self.path)}:{self.part}/{self.num_parts}"

    def read_chunks(self, start_line=0, max_documents: int | None = None) -> Iterator[DocumentChunk]:
        return read_chunks(self, start_line, max_documents)


def read_chunks(
    unit: ShardUnit, start_line: int = 0, max_documents: int | None = None, chunk_chars: int = 1 << 18
) -> Iterator[DocumentChunk]:
    """The unit's documents from line `start_line` on (at most max_documents of them), in
    chunks of about chunk_chars characters, the last one marked at_end.

    Every chunk's stats cover exactly its lines, so counts stay exact across a resume."""
    texts, chars, stats = [], 0, Counter()
    next_line = start_line
    documents = skipped = 0
    for line_index, line in enumerate(itertools.islice(_lines(unit.path), start_line, None), start_line):
        if documents == max_documents:
            break
        next_line = line_index + 1
        if line_index % unit.num_parts != unit.part or not line.strip():
            continue
        text, replaced_utf8 = _parse_document(line)
        if text is None:
            stats["skipped_lines"] += 1
            skipped += 1
            if skipped <= MAX_WARNINGS_PER_FILE:
                logger.warning('skipping %s:%d: not a JSON object with a string "text"', unit.path, next_line)
            continue
        documents += 1
        stats["documents"] += 1
        stats["replaced_utf8_lines"] += replaced_utf8
        texts.append(text)
        chars += len(text)
        if chars >= chunk_chars:
            yield DocumentChunk(texts, next_line, False, stats)
            texts, chars, stats = [], 0, Counter()
    yield DocumentChunk(texts, next_line, True, stats)


def _lines(path: str) -> Iterator[bytes]:
    with storage.open(path, "rb") as raw:
        # Detect gzip by content, not name: GCS objects uploaded with Content-Encoding: gzip
        # arrive compressed under a .json name.
        is_gzip = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        # Splitting large blocks in C is much faster than readline on a GCS reader.
        tail = b""
        while block := stream.read(READ_BLOCK_BYTES):
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            yield from lines
        if tail:
            yield tail


def _parse_document(line: bytes) -> tuple[str | None, bool]:
    """(the line's "text", or None if the line is corrupt; whether invalid UTF-8 was replaced)."""
    try:
        return _text_field(orjson.loads(line)), False
    except orjson.JSONDecodeError:
        try:
            line.decode("utf-8")
            return None, False  # valid UTF-8, so the JSON itself is broken
        except UnicodeDecodeError:
            pass
    # Valid JSON around a few bad bytes: keep the document, the bad bytes become U+FFFD.
    try:
        return _text_field(orjson.loads(line.decode("utf-8", errors="replace"))), True
    except orjson.JSONDecodeError:
        return None, False


def _text_field(doc) -> str | None:
    text = doc.get("text") if isinstance(doc, dict) else None
    return text if isinstance(text, str) else None
