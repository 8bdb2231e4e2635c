"""Generate clm's bundled data sample: real English text in C4's JSON-lines format.

The text is CPython's own documentation, present on every machine with Python: the
language-reference topics behind `help()` (pydoc_data.topics) and the docstrings of the
pure-Python standard library modules, read with `ast` (nothing is imported or run). Both
are under the PSF license. One topic or one module is one document; url and timestamp
are synthetic but shaped like C4's.

The output is a function of the Python version only (same version, same bytes).

    python scripts/make_sample.py [--out-dir clm/data/sample]
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gzip
import hashlib
import json
import platform
import sys
import sysconfig
from pathlib import Path

TRAIN_FILE = "c4-sample-train.json.gz"
VALIDATION_FILE = "c4-sample-validation.json.gz"
VALIDATION_CHARS = 45_000
TRAIN_CHARS = 550_000
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "clm" / "data" / "sample"


def reference_topics() -> dict[str, str]:
    import pydoc_data.topics

    return {f"reference/{name}": text for name, text in pydoc_data.topics.topics.items()}


def module_docstrings() -> dict[str, str]:
    """One document per stdlib module: its docstring, then its public classes' and functions'."""
    documents = {}
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree] + [
            node
            for node in tree.body
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_")
        ]
        parts = [doc for node in nodes if (doc := ast.get_docstring(node))]
        if parts:
            documents[f"library/{path.stem}"] = "\n\n".join(parts)
    return documents


def c4_record(key: str, text: str) -> dict[str, str]:
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    moment = datetime.datetime(2019, 4, 18) + datetime.timedelta(seconds=digest % (14 * 24 * 3600))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    timestamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"text": text, "timestamp": timestamp, "url": f"https://docs.python.org/{version}/{key}.html"}


def split(documents: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """A fixed pseudo-random order (by hash of the key); the first ~45 KB validate, the next ~550 KB train."""
    order = sorted(documents, key=lambda key: hashlib.sha256(key.encode()).hexdigest())
    validation, train, chars = [], [], 0
    for key in order:
        if chars >= VALIDATION_CHARS + TRAIN_CHARS:
            break
        text = documents[key].strip()
        (validation if chars < VALIDATION_CHARS else train).append(c4_record(key, text))
        chars += len(text)
    return train, validation


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    # mtime=0 and no file name in the header: the same records give the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
        out.write(payload)


def readme(train: list[dict], validation: list[dict]) -> str:
    def size(records):
        return f"{len(records)} documents, {sum(len(r['text']) for r in records):,} characters"

    return (
        "# Bundled data sample\n\n"
        "Real English text in C4's JSON-lines format (`text`, `timestamp`, `url`; gzipped) for the\n"
        "default job and the tests: CPython's language-reference topics and standard-library\n"
        "docstrings (PSF license). Made by `python scripts/make_sample.py` with\n"
        f"Python {platform.python_version()}; the same version regenerates the same bytes.\n\n"
        f"- `{TRAIN_FILE}`: {size(train)}\n"
        f"- `{VALIDATION_FILE}`: {size(validation)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    train, validation = split({**reference_topics(), **module_docstrings()})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(args.out_dir / TRAIN_FILE, train)
    write_jsonl_gz(args.out_dir / VALIDATION_FILE, validation)
    (args.out_dir / "README.md").write_text(readme(train, validation), encoding="utf-8")
    print(readme(train, validation))


if __name__ == "__main__":
    main()
