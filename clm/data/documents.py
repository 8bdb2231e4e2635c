"""What every source hands the pipeline: documents in chunks, with the position to resume from.

A source's units (clm.data.sources.ShardUnit for files, clm.data.hf_datasets.DatasetUnit for
`datasets` splits) each read their documents as DocumentChunks, so tokenizing, packing,
shuffling, the eval set and the resumable position are one code path for every source.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass
class DocumentChunk:
    """Consecutive documents of a unit, and where reading resumes after them."""

    texts: list[str]
    # Where reading resumes after this chunk, as the unit's read_chunks takes it: the index of
    # the first line (row) after it, or a streaming `datasets` split's own position.
    end_line: int | dict
    at_end: bool  # the last chunk of the unit
    stats: Counter  # documents, skipped_lines, replaced_utf8_lines within these lines
