"""The data pipeline, checked against computations written independently here:
SentencePiece called directly, packing and padding redone with plain lists."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import logging
import os
import pickle
import platform
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
from omegaconf import OmegaConf

from clm.data import build_eval_set, build_train_stream, load_tokenizer, validate_dataset
from clm.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "clm" / "data" / "sample"
SAMPLE_TRAIN = SAMPLE_DIR / "c4-sample-train.json.gz"
SAMPLE_VALIDATION = SAMPLE_DIR / "c4-sample-validation.json.gz"
PAD = -100


# ------------------------------------------------------------------------ helpers


def mixtral_model_file() -> str:
    path = str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1")
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest().startswith("dadfd56d")
    return path


SP = sentencepiece.SentencePieceProcessor(model_file=mixtral_model_file())


def sample_texts() -> list[str]:
    with gzip.open(SAMPLE_TRAIN, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def c4_line(text: str, i: int = 0) -> bytes:
    record = {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def write_jsonl(path: Path, texts: list[str], compress: bool = False) -> Path:
    payload = b"".join(c4_line(t, i) for i, t in enumerate(texts))
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def make_cfg(train: str, eval: str | None = None, **overrides) -> OmegaConf:
    cfg = {
        "seed": 0,
        "shuffle": False,
        "max_length": 64,
        "global_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "global_eval_batch_size": 4,
        "n_eval_examples": None,
        "pad_token_id": PAD,
        "cache_local_dir": None,
        "model": {"tokenizer_name_or_path": None},
        "dataset": {
            "dataset_name": "json",
            "dataset_config_name": None,
            "text_column": "text",
            "train_split": "train",
            "eval_split": "validation",
            "train_dataset_path": train,
            "eval_dataset_path": eval or train,
            "streaming": True,
            "num_proc": 1,
            "load_from_cache_file": True,
            "shuffle_buffer_size": 16,
        },
    }
    dataset_overrides = overrides.pop("dataset", {})
    cfg.update(overrides)
    cfg["dataset"].update(dataset_overrides)
    return OmegaConf.create(cfg)


def pack(texts: list[str], length: int) -> list[tuple[int, ...]]:
    """Independent packing: SentencePiece per document, concatenated, full blocks only."""
    tokens = [t for text in texts for t in SP.encode(text)]
    return [tuple(tokens[i : i + length]) for i in range(0, len(tokens) - length + 1, length)]


def take_blocks(stream, count: int) -> list[tuple[int, ...]]:
    blocks = []
    while len(blocks) < count:
        blocks.extend(tuple(row) for row in next(stream)["input_ids"].tolist())
    return blocks[:count]


def epoch_zero_blocks(stream) -> tuple[list[tuple[int, ...]], dict]:
    """The blocks handed out while the stream is in its first epoch (batch size 1), and the
    stream's counters at the last of them."""
    blocks, stats = [], None
    for batch in stream:
        if stream.stats["epoch"] > 0:
            return blocks, stats
        blocks.extend(tuple(row) for row in batch["input_ids"].tolist())
        stats = stream.stats


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def texts():
    return sample_texts()


@pytest.fixture
def four_files(tmp_path, texts) -> tuple[Path, list[list[str]]]:
    """Sample documents spread over four files (two gzipped), plus an empty document."""
    groups = [texts[i::4][:12] for i in range(4)]
    groups[1].insert(3, "")
    for i, group in enumerate(groups):
        write_jsonl(tmp_path / f"part-{i}.json{'.gz' if i % 2 else ''}", group, compress=bool(i % 2))
    return tmp_path, groups


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_equal_sentencepiece(tokenizer, texts):
    assert tokenizer.encode_batch(["Hello"]) == [[22557]]  # leading '▁' kept (16230 without it)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    sample = texts[:20] + ["Hello world", " leading space", "naïve café — 東京", ""]
    assert tokenizer.encode_batch(sample) == [SP.encode(t) for t in sample]
    assert tokenizer.decode(np.array(SP.encode("Hello world"))) == "Hello world"


def test_tokenizer_from_file_or_directory(tmp_path):
    shutil.copy(mixtral_model_file(), tmp_path / "tokenizer.model")
    for name in (str(tmp_path / "tokenizer.model"), str(tmp_path)):
        assert load_tokenizer(name).encode_batch(["Hello there"]) == [SP.encode("Hello there")]
    (tmp_path / "not-a-model.bin").write_bytes(b"garbage")
    with pytest.raises(UserError, match="model.tokenizer_name_or_path=.*not-a-model.bin"):
        load_tokenizer(str(tmp_path / "not-a-model.bin"))


def test_tokenizer_directory_without_sentencepiece_model_uses_hugging_face(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.encode_batch(["hello world", "world zzz"]) == [[2, 3], [3, 0]]
    assert tokenizer.eos_id == 1


# ------------------------------------------------------------------------ training


def test_train_blocks_equal_independent_packing(four_files, tokenizer):
    directory, groups = four_files
    cfg = make_cfg(str(directory), global_train_batch_size=3)
    expected = [block for group in groups for block in pack(group, 64)]  # files in name order
    with build_train_stream(cfg, tokenizer) as stream:
        batch = next(stream)
        assert batch["input_ids"].shape == (3, 64) and batch["input_ids"].dtype == np.int32
        # labels are the targets: the next token of the block, none for its last position
        assert batch["labels"].dtype == np.int32 and np.array_equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
        assert (batch["labels"][:, -1] == PAD).all()
        blocks = [tuple(r) for r in batch["input_ids"].tolist()] + take_blocks(stream, len(expected))
    assert blocks[: len(expected)] == expected
    assert blocks[len(expected) :] == expected[:3]  # the next epoch starts over


def test_micro_batch_is_global_over_accumulation_over_processes(four_files, tokenizer):
    cfg = make_cfg(str(four_files[0]), global_train_batch_size=16, gradient_accumulation_steps=2)
    with build_train_stream(cfg, tokenizer, process_index=1, process_count=4) as stream:
        assert next(stream)["input_ids"].shape == (2, 64)
    with pytest.raises(UserError, match="global_train_batch_size=16"):
        build_train_stream(cfg, tokenizer, process_index=0, process_count=3)


def test_shuffle_is_seeded_and_only_reorders(four_files, tokenizer):
    directory, groups = four_files
    expected = Counter(block for group in groups for block in pack(group, 64))
    with build_train_stream(make_cfg(str(directory)), tokenizer) as stream:
        unshuffled = take_blocks(stream, 40)

    def shuffled(seed):
        with build_train_stream(make_cfg(str(directory), shuffle=True, seed=seed), tokenizer) as stream:
            return take_blocks(stream, 40)

    first, again, other_seed = shuffled(0), shuffled(0), shuffled(1)
    assert first == again
    assert first != other_seed and first != unshuffled
    # 40 draws from a 16-block buffer over one epoch of more blocks: each block at most once.
    assert sum(expected.values()) >= 40 + 16
    assert not Counter(first) - expected


@pytest.mark.parametrize("shuffle,num_proc,stops", [(False, 1, [5]), (True, 1, [3, 17]), (True, 2, [11])])
def test_resume_gives_identical_batches(tmp_path, texts, tokenizer, shuffle, num_proc, stops):
    # Small files and blocks, so 30 batches cross files and epochs.
    for i in range(3):
        write_jsonl(tmp_path / f"f{i}.json", [text[:600] for text in texts[i * 3 : i * 3 + 3]])
    cfg = make_cfg(str(tmp_path), max_length=32, shuffle=shuffle, dataset={"num_proc": num_proc})
    total = 30
    with build_train_stream(cfg, tokenizer) as stream:
        uninterrupted, stats = [], []
        for _ in range(total):
            uninterrupted.append(next(stream)["input_ids"])
            stats.append(stream.stats)
    assert stats[-1]["epoch"] >= 1, "the run should cross an epoch boundary"

    # Stop at each point (the stream has prefetched past it), checkpoint, resume in a new stream.
    resumed, state = [], None
    for stop in stops + [total]:
        with build_train_stream(cfg, tokenizer) as stream:
            if state is not None:
                stream.load_state_dict(pickle.loads(pickle.dumps(state)))
            while len(resumed) < stop:
                resumed.append(next(stream)["input_ids"])
            assert stream.stats == stats[stop - 1]
            state = stream.state_dict()
    assert all(np.array_equal(a, b) for a, b in zip(resumed, uninterrupted, strict=True))

    # Rewinding a running stream to an earlier state replays the same batches.
    with build_train_stream(cfg, tokenizer) as stream:
        stream.start()  # producing ahead before the first batch is asked for
        for _ in range(stops[0]):
            next(stream)
        state = stream.state_dict()
        next(stream)
        stream.load_state_dict(state)
        assert np.array_equal(next(stream)["input_ids"], uninterrupted[stops[0]])


def test_producer_errors_reach_the_consumer_and_threads_end(tmp_path, tokenizer):
    threads_before = set(threading.enumerate())
    write_jsonl(tmp_path / "tiny.json", ["Hello world."])
    stream = build_train_stream(make_cfg(str(tmp_path)), tokenizer)
    with pytest.raises(UserError, match="no block of max_length=64 tokens"):
        next(stream)
    stream.close()
    with build_train_stream(make_cfg(str(tmp_path), max_length=2), tokenizer) as stream:
        next(stream)
    assert set(threading.enumerate()) <= threads_before


def test_state_dict_rejects_another_layout(four_files, tokenizer):
    with build_train_stream(make_cfg(str(four_files[0])), tokenizer) as stream:
        next(stream)
        state = stream.state_dict()
    with build_train_stream(make_cfg(str(four_files[0]), max_length=32), tokenizer) as stream:
        with pytest.raises(UserError, match="max_length"):
            stream.load_state_dict(state)


@pytest.mark.parametrize("num_files,process_count", [(4, 2), (4, 4), (2, 3)])
def test_multi_host_split_covers_every_block_once(tmp_path, texts, tokenizer, num_files, process_count):
    groups = [texts[i::num_files][:8] for i in range(num_files)]
    for i, group in enumerate(groups):
        write_jsonl(tmp_path / f"file-{i}.json", group)
    cfg = make_cfg(str(tmp_path), global_train_batch_size=process_count)
    # With fewer files than processes, each file is split into ceil(P / files) line-interleaved parts.
    parts = -(-process_count // num_files)
    expected = Counter(block for group in groups for part in range(parts) for block in pack(group[part::parts], 64))

    seen, documents = Counter(), 0
    for process_index in range(process_count):
        with build_train_stream(cfg, tokenizer, process_index, process_count) as stream:
            blocks, stats = epoch_zero_blocks(stream)
            documents += stats["documents"]
        seen.update(blocks)
    assert seen == expected
    assert documents == sum(len(g) for g in groups)  # every document read by exactly one process


# ---------------------------------------------------------------------------- eval


@pytest.mark.parametrize(
    "max_length,global_batch,process_count,n_eval",
    [(64, 4, 1, None), (64, 4, 2, None), (128, 6, 3, 5), (4096, 4, 2, None)],
)
def test_eval_set_equals_independent_padding(
    tmp_path, texts, tokenizer, max_length, global_batch, process_count, n_eval
):
    documents = texts[:9]
    write_jsonl(tmp_path / "validation.json", documents)
    cfg = make_cfg(str(tmp_path), max_length=max_length, global_eval_batch_size=global_batch, n_eval_examples=n_eval)

    # Independent: concatenate, cut, pad the last block, pad the count with ignored blocks.
    tokens = [t for text in documents[:n_eval] for t in SP.encode(text)]
    rows = [tokens[i : i + max_length] for i in range(0, len(tokens), max_length)]
    real_blocks = len(rows)
    while len(rows) % global_batch:
        rows.append([])
    inputs = np.array([r + [SP.eos_id()] * (max_length - len(r)) for r in rows], dtype=np.int32)
    # labels are the targets: position t is scored on the block's token t + 1
    labels = np.array([r[1:] + [PAD] * (max_length - len(r[1:])) for r in rows], dtype=np.int32)

    sets = [build_eval_set(cfg, tokenizer, p, process_count) for p in range(process_count)]
    for eval_set in sets:
        assert eval_set.num_blocks == real_blocks
        assert eval_set.num_padding_blocks == len(rows) - real_blocks
        assert eval_set.num_tokens == len(tokens)
        assert eval_set.num_target_tokens == int((labels != PAD).sum()) == len(tokens) - real_blocks
        assert eval_set.stats["documents"] == len(documents[:n_eval])
    per_process = [list(s.batches()) for s in sets]
    assert len({len(b) for b in per_process}) == 1
    for j, batch_parts in enumerate(zip(*per_process)):
        rows_j = slice(j * global_batch, (j + 1) * global_batch)
        assert all(part["input_ids"].shape == (global_batch // process_count, max_length) for part in batch_parts)
        assert np.array_equal(np.concatenate([part["input_ids"] for part in batch_parts]), inputs[rows_j])
        assert np.array_equal(np.concatenate([part["labels"] for part in batch_parts]), labels[rows_j])
    assert (inputs >= 0).all()  # -100 is a label only, never an input id


# ------------------------------------------------------------------------ bad data


def test_corrupt_lines_are_skipped_and_counted(tmp_path, texts, tokenizer, caplog):
    good = texts[:6]
    bad_lines = [b'{"text": "truncated', b"[1, 2, 3]", b'{"url": "no text"}', b'{"text": 42}', b"\x00\xff garbage"]
    lines = [c4_line(t) for t in good]
    for i, bad in enumerate(bad_lines):
        lines.insert(2 * i + 1, bad + b"\n")
    lines.insert(4, b"\n")  # a blank line is not corrupt
    (tmp_path / "mixed.json").write_bytes(b"".join(lines))
    cfg = make_cfg(str(tmp_path / "mixed.json"), max_length=32, global_eval_batch_size=2)

    with caplog.at_level(logging.WARNING, logger="clm.data"):
        with build_train_stream(cfg, tokenizer) as stream:
            blocks, stats = epoch_zero_blocks(stream)
    assert blocks == pack(good, 32)
    assert (stats["skipped_lines"], stats["documents"]) == (len(bad_lines), len(good))
    assert "mixed.json:2" in caplog.text  # file and line number of the first bad line
    eval_set = build_eval_set(cfg, tokenizer)
    assert eval_set.stats["skipped_lines"] == len(bad_lines)
    assert eval_set.num_tokens == sum(len(SP.encode(t)) for t in good)


def test_invalid_utf8_is_replaced_not_fatal(tmp_path, tokenizer):
    raw = b'{"text": "caf\xc3\xa9 ok \xff\xfe bad bytes, then more words to fill a block of tokens", "url": "x"}\n'
    (tmp_path / "bytes.json").write_bytes(raw + c4_line("A clean second document with several words in it."))
    cfg = make_cfg(str(tmp_path / "bytes.json"), max_length=8, global_eval_batch_size=1)
    replaced = raw.decode("utf-8", errors="replace")
    assert "\ufffd" in replaced
    eval_set = build_eval_set(cfg, tokenizer)
    assert eval_set.stats == {"documents": 2, "skipped_lines": 0, "replaced_utf8_lines": 1}
    expected = SP.encode(json.loads(replaced)["text"]) + SP.encode("A clean second document with several words in it.")
    assert eval_set.input_ids.reshape(-1)[: len(expected)].tolist() == expected


def test_missing_or_empty_c4_files_fail_before_anything_is_read(tmp_path):
    train, validation = tmp_path / "train", tmp_path / "validation"
    train.mkdir()
    validation.mkdir()
    for i in range(768, 1024):
        # Contents are never read by the check; mixed .json and .json.gz are both accepted.
        (train / f"c4-train.{i:05d}-of-01024.json{'.gz' if i % 2 else ''}").write_bytes(b"not even json")
    (validation / "c4-validation_24567exp.json").write_bytes(b"x")
    cfg = make_cfg(str(train), str(validation), dataset={"dataset_name": "c4_mlperf"})
    validate_dataset(cfg)

    (train / "c4-train.00800-of-01024.json").unlink()
    (train / "c4-train.00901-of-01024.json.gz").unlink()
    with pytest.raises(UserError) as error:
        validate_dataset(cfg)
    message = str(error.value)
    assert "\n" not in message and "dataset.train_dataset_path" in message
    assert "2 of 256" in message and str(train / "c4-train.00800-of-01024.json") in message

    (train / "c4-train.00800-of-01024.json").write_bytes(b"x")
    (train / "c4-train.00901-of-01024.json").write_bytes(b"")
    with pytest.raises(UserError, match="empty.*c4-train.00901-of-01024.json"):
        validate_dataset(cfg)

    (train / "c4-train.00901-of-01024.json").write_bytes(b"x")
    (validation / "c4-validation_24567exp.json").unlink()
    with pytest.raises(UserError, match="dataset.eval_dataset_path=.*1 of 1 .*c4-validation_24567exp.json"):
        validate_dataset(cfg)


def test_json_dataset_accepts_file_directory_glob_and_names_missing_paths(tmp_path, texts):
    write_jsonl(tmp_path / "a.jsonl", texts[:2])
    write_jsonl(tmp_path / "b.json.gz", texts[2:4], compress=True)
    (tmp_path / "notes.txt").write_text("ignored: not a JSON-lines name")
    for location in (tmp_path, tmp_path / "a.jsonl", f"{tmp_path}/*.json*"):
        validate_dataset(make_cfg(str(location)))
    with pytest.raises(UserError, match=f"dataset.train_dataset_path={tmp_path}/nope.json: 1 of 1 expected files"):
        validate_dataset(make_cfg(str(tmp_path / "nope.json"), str(tmp_path)))
    (tmp_path / "c.json").write_bytes(b"")
    with pytest.raises(UserError, match="empty, the first is .*c.json"):
        validate_dataset(make_cfg(str(tmp_path)))
    with pytest.raises(UserError, match="dataset.dataset_name=c5"):
        validate_dataset(make_cfg(str(tmp_path), dataset={"dataset_name": "c5"}))


# -------------------------------------------------------------- sample and check CLI


def test_bundled_sample_runs_through_the_default_config(tokenizer):
    from clm.config import load_config

    cfg = load_config([], num_devices=8)
    assert cfg.dataset.train_dataset_path == str(SAMPLE_TRAIN)
    assert cfg.dataset.eval_dataset_path == str(SAMPLE_VALIDATION)
    assert 300_000 <= sum(len(t) for t in sample_texts()) <= 600_000
    validate_dataset(cfg)
    with build_train_stream(cfg, tokenizer) as stream:
        batch = next(stream)
    micro = cfg.global_train_batch_size // cfg.gradient_accumulation_steps
    assert batch["input_ids"].shape == (micro, cfg.max_length)
    eval_set = build_eval_set(cfg, tokenizer)
    assert eval_set.num_batches >= 1 and eval_set.stats["skipped_lines"] == 0


@pytest.mark.slow
def test_sample_generator_reproduces_the_bundled_files(tmp_path):
    recorded = (SAMPLE_DIR / "README.md").read_text()
    if f"Python {platform.python_version()};" not in recorded:
        pytest.skip(f"the sample was made with another Python than {platform.python_version()}")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample.py"), "--out-dir", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("c4-sample-train.json.gz", "c4-sample-validation.json.gz", "README.md"):
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name


def run_check(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "clm.data.check", *overrides], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_check_cli_reports_files_tokens_and_eval_padding():
    result = run_check("max_length=128", "global_eval_batch_size=16")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "train files: 1 expected, 1 found" in out and "eval files: 1 expected, 1 found" in out
    assert "eval set:" in out and "padding blocks" in out


@pytest.mark.slow
def test_check_cli_bad_path_is_one_line_and_nonzero():
    result = run_check("dataset.train_dataset_path=/nonexistent/c4")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "/nonexistent/c4" in lines[0]
