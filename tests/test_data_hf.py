"""Hugging Face `datasets` sources: the same documents give the same blocks, eval set,
multi-host split and resumable position as the JSON-lines reader. Everything offline:
the datasets are written here with `datasets` itself (save_to_disk, parquet files)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from clm.config import load_config  # noqa: E402
from clm.data import build_eval_set, build_train_stream, load_tokenizer, validate_dataset  # noqa: E402
from clm.errors import EXIT_USER_ERROR, UserError  # noqa: E402
from test_data import epoch_zero_blocks, make_cfg, pack, sample_texts, take_blocks, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NUM_PARQUET_FILES = 3


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def texts():
    return sample_texts()


def write_save_to_disk(directory: Path, train: list[str], validation: list[str]) -> Path:
    splits = {"train": train, "validation": validation}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}) for name, docs in splits.items()}
    ).save_to_disk(str(directory), num_shards={"train": NUM_PARQUET_FILES, "validation": 1})
    return directory


def write_parquet_folder(directory: Path, train: list[str], validation: list[str]) -> Path:
    """train-0000i-of-00003.parquet and validation-00000-of-00001.parquet: `datasets` takes
    the split names from the file names, and reads the files in name order."""
    directory.mkdir()
    for i in range(NUM_PARQUET_FILES):
        part = train[i * len(train) // NUM_PARQUET_FILES : (i + 1) * len(train) // NUM_PARQUET_FILES]
        datasets.Dataset.from_dict({"text": part}).to_parquet(directory / f"train-{i:05d}-of-{NUM_PARQUET_FILES:05d}.parquet")
    datasets.Dataset.from_dict({"text": validation}).to_parquet(directory / "validation-00000-of-00001.parquet")
    return directory


WRITERS = {"save_to_disk": write_save_to_disk, "parquet": write_parquet_folder}


def hf_cfg(path: Path, tmp_path: Path, streaming: bool, **overrides):
    dataset = {"dataset_name": str(path), "streaming": streaming, "train_dataset_path": None,
               "eval_dataset_path": None, **overrides.pop("dataset", {})}
    return make_cfg(None, dataset=dataset, cache_local_dir=str(tmp_path / "hf-cache"), **overrides)


# --------------------------------------------------------- same documents, same data


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_train_blocks_and_eval_set_equal_the_jsonl_reader(tmp_path, texts, tokenizer, kind, streaming):
    train, validation = texts[:30], texts[30:39]
    write_jsonl(tmp_path / "train.json", train)
    write_jsonl(tmp_path / "validation.json", validation)
    source = WRITERS[kind](tmp_path / kind, train, validation)
    overrides = {"max_length": 64, "global_eval_batch_size": 4, "global_train_batch_size": 1}
    jsonl_cfg = make_cfg(str(tmp_path / "train.json"), str(tmp_path / "validation.json"), **overrides)
    cfg = hf_cfg(source, tmp_path, streaming, **overrides)
    validate_dataset(cfg)

    with build_train_stream(jsonl_cfg, tokenizer) as stream:
        jsonl_blocks, jsonl_stats = epoch_zero_blocks(stream)
    with build_train_stream(cfg, tokenizer) as stream:
        blocks, stats = epoch_zero_blocks(stream)
    assert blocks == jsonl_blocks == pack(train, 64)
    assert stats == jsonl_stats

    jsonl_eval, hf_eval = build_eval_set(jsonl_cfg, tokenizer), build_eval_set(cfg, tokenizer)
    assert np.array_equal(hf_eval.input_ids, jsonl_eval.input_ids)
    assert np.array_equal(hf_eval.labels, jsonl_eval.labels)
    assert (hf_eval.num_blocks, hf_eval.num_padding_blocks, hf_eval.num_tokens, hf_eval.stats) == (
        jsonl_eval.num_blocks, jsonl_eval.num_padding_blocks, jsonl_eval.num_tokens, jsonl_eval.stats)
    assert hf_eval.num_padding_blocks > 0 and (hf_eval.labels == -100).any()  # padding was exercised

    limited = hf_cfg(source, tmp_path, streaming, n_eval_examples=4, **overrides)
    assert build_eval_set(limited, tokenizer).num_tokens == sum(len(t) for t in tokenizer.encode_batch(validation[:4]))


@pytest.mark.parametrize("streaming", [False, True])
def test_null_texts_are_skipped_and_counted(tmp_path, texts, tokenizer, streaming):
    rows = [texts[0], None, texts[1], None, texts[2]]
    write_save_to_disk(tmp_path / "nulls", rows, rows)
    cfg = hf_cfg(tmp_path / "nulls", tmp_path, streaming, max_length=32, global_train_batch_size=1)
    with build_train_stream(cfg, tokenizer) as stream:
        blocks, stats = epoch_zero_blocks(stream)
    assert blocks == pack(texts[:3], 32)
    assert (stats["documents"], stats["skipped_lines"]) == (3, 2)


# ----------------------------------------------------------------------- resuming


@pytest.mark.parametrize("streaming,shuffle,num_proc,stops", [
    (True, False, 1, [5]), (True, True, 1, [3, 17]), (True, True, 2, [11]), (False, True, 1, [4, 19])])
def test_resume_gives_identical_batches(tmp_path, texts, tokenizer, monkeypatch, streaming, shuffle, num_proc, stops):
    # Short documents in 3 parquet files, read 2 rows at a time in chunks of about 2 rows,
    # so 30 batches cross chunks, files and epochs and stop inside files.
    from clm.data import hf_datasets

    monkeypatch.setattr(hf_datasets, "CHUNK_CHARS", 1000)
    monkeypatch.setattr(hf_datasets, "READ_ROWS", 2)
    docs = [text[:600] for text in texts[:18]]
    source = write_parquet_folder(tmp_path / "corpus", docs, docs[:2])
    cfg = hf_cfg(source, tmp_path, streaming, max_length=32, shuffle=shuffle, dataset={"num_proc": num_proc})
    total = 30
    with build_train_stream(cfg, tokenizer) as stream:
        uninterrupted, stats = [], []
        for _ in range(total):
            uninterrupted.append(next(stream)["input_ids"])
            stats.append(stream.stats)
    assert stats[-1]["epoch"] >= 1, "the run should cross an epoch boundary"

    resumed, state, positions = [], None, []
    for stop in stops + [total]:
        with build_train_stream(cfg, tokenizer) as stream:
            if state is not None:
                stream.load_state_dict(pickle.loads(pickle.dumps(state)))
            while len(resumed) < stop:
                resumed.append(next(stream)["input_ids"])
            assert stream.stats == stats[stop - 1]
            state = stream.state_dict()
            positions.append(state["line"])
    assert all(np.array_equal(a, b) for a, b in zip(resumed, uninterrupted, strict=True))
    # Stops inside the split: a row index, or the library's IterableDataset state with the row count.
    def inside(p) -> bool:
        if streaming:
            return isinstance(p, dict) and 0 < p["rows"] < len(docs) and "examples_iterable" in p["state"]
        return 0 < p < len(docs)

    assert all(inside(p) for p in positions[:-1])


@pytest.mark.parametrize("chunk_chars", [1 << 18, 2000])
def test_streaming_resume_mid_split_continues_at_the_next_row(tmp_path, texts, tokenizer, monkeypatch, chunk_chars):
    # Small chunks put resume points inside the split and inside parquet files.
    from clm.data import hf_datasets

    monkeypatch.setattr(hf_datasets, "CHUNK_CHARS", chunk_chars)
    monkeypatch.setattr(hf_datasets, "READ_ROWS", 4)
    docs = texts[:24]
    source = write_parquet_folder(tmp_path / "corpus", docs, docs[:2])
    unit = hf_datasets.train_units(hf_cfg(source, tmp_path, True), 0, 1)[0]
    chunks = list(unit.read_chunks())
    assert [t for c in chunks for t in c.texts] == docs
    for i, chunk in enumerate(chunks[:-1]):
        after = [t for c in unit.read_chunks(start_line=pickle.loads(pickle.dumps(chunk.end_line))) for t in c.texts]
        assert after == [t for c in chunks[i + 1 :] for t in c.texts]


# ---------------------------------------------------------------------- multi-host


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("process_count", [2, 3])
def test_multi_host_split_covers_every_block_once(tmp_path, texts, tokenizer, streaming, process_count):
    docs = texts[:24]
    source = write_parquet_folder(tmp_path / "corpus", docs, docs[:2])
    write_jsonl(tmp_path / "train.json", docs)
    cfg = hf_cfg(source, tmp_path, streaming, global_train_batch_size=process_count, global_eval_batch_size=process_count)
    jsonl_cfg = make_cfg(str(tmp_path / "train.json"), global_train_batch_size=process_count)
    # Process p reads rows p, p+P, ...: a split behaves as one JSON-lines file shared by P processes.
    expected = Counter(block for p in range(process_count) for block in pack(docs[p::process_count], 64))
    seen, documents = Counter(), 0
    for process_index in range(process_count):
        with build_train_stream(cfg, tokenizer, process_index, process_count) as stream:
            blocks, stats = epoch_zero_blocks(stream)
            documents += stats["documents"]
        with build_train_stream(jsonl_cfg, tokenizer, process_index, process_count) as stream:
            assert epoch_zero_blocks(stream)[0] == blocks
        seen.update(blocks)
    assert seen == expected
    assert documents == len(docs)

    sets = [build_eval_set(cfg, tokenizer, p, process_count) for p in range(process_count)]
    assert len({s.num_batches for s in sets}) == 1 and all(s.stats["documents"] == 2 for s in sets)


# ------------------------------------------------------------------------ bad input


def one_line_error(cfg) -> str:
    with pytest.raises(UserError) as error:
        validate_dataset(cfg)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_split_column_and_empty_split_are_one_line_each(tmp_path, texts, streaming):
    source = write_save_to_disk(tmp_path / "saved", texts[:6], texts[6:8])
    message = one_line_error(hf_cfg(source, tmp_path, streaming, dataset={"eval_split": "test"}))
    assert message.startswith("dataset.eval_split=test:") and "its splits: train, validation" in message
    message = one_line_error(hf_cfg(source, tmp_path, streaming, dataset={"train_split": "training"}))
    assert message.startswith("dataset.train_split=training:")
    message = one_line_error(hf_cfg(source, tmp_path, streaming, dataset={"text_column": "body"}))
    assert message.startswith("dataset.text_column=body:") and "its columns: text, id" in message
    message = one_line_error(hf_cfg(source, tmp_path, streaming, dataset={"text_column": "id"}))
    assert message.startswith("dataset.text_column=id:") and "int64, not text" in message

    empty = write_save_to_disk(tmp_path / "empty-eval", texts[:6], [])
    message = one_line_error(hf_cfg(empty, tmp_path, streaming))
    # `datasets` itself refuses to load an empty split when it caches, so the message names the source there.
    knob = "dataset.eval_split=validation:" if streaming else f"dataset.dataset_name={empty}:"
    assert message.startswith(knob) and "split validation" in message and "is empty" in message

    # A JSON-lines folder, streamed: no declared features, so the first row names the columns.
    (tmp_path / "jsonl").mkdir()
    write_jsonl(tmp_path / "jsonl" / "train.jsonl", texts[:3])
    message = one_line_error(hf_cfg(tmp_path / "jsonl", tmp_path, streaming, dataset={"text_column": "body"}))
    assert "its columns:" in message and "text" in message and "url" in message


def test_missing_local_path_and_unknown_configuration_are_one_line(tmp_path, texts):
    message = one_line_error(hf_cfg(tmp_path / "nowhere", tmp_path, False))
    assert message.startswith(f"dataset.dataset_name={tmp_path / 'nowhere'}: no such file or directory")
    source = write_parquet_folder(tmp_path / "corpus", texts[:3], texts[3:4])
    message = one_line_error(hf_cfg(source, tmp_path, False, dataset={"dataset_config_name": "wikitext-2-raw-v1"}))
    assert message.startswith("dataset.dataset_config_name=wikitext-2-raw-v1:") and "'default'" in message
    assert "null for a local folder" in message


def run_module(args: list[str], **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    for name, value in env.items():
        if value is None:
            environment.pop(name)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, cwd=REPO,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("offline", [True, False])
def test_hub_name_without_network_is_one_line(tmp_path, offline):
    # Offline mode, or a hub endpoint that does not answer (a closed port on loopback): no retries.
    env = ({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if offline else
           {"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"})
    result = run_module(["-m", "clm.data.check", "dataset=wikitext", f"cache_local_dir={tmp_path}"], HF_HOME=str(tmp_path), **env)
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: dataset.dataset_name=wikitext:") and "cannot be reached (no network" in lines[0]
    assert "save_to_disk(DIR)" in lines[0] and "dataset.dataset_name=DIR dataset.dataset_config_name=null" in lines[0]


@pytest.mark.xla
@pytest.mark.slow
def test_trainer_checks_the_split_before_compiling(tmp_path, texts):
    source = write_parquet_folder(tmp_path / "corpus", texts[:6], texts[6:8])
    result = run_module(["run_clm.py", f"dataset.dataset_name={source}", "dataset.eval_split=test",
                         f"output_dir={tmp_path / 'out'}", f"cache_local_dir={tmp_path / 'cache'}"])
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "dataset.eval_split=test" in lines[0] and "train, validation" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ config and CLI


def test_wikitext_preset_and_new_knobs():
    cfg = load_config(["dataset=wikitext"], num_devices=8)
    d = cfg.dataset
    assert (d.dataset_name, d.dataset_config_name, d.streaming) == ("wikitext", "wikitext-2-raw-v1", False)
    assert (d.text_column, d.train_split, d.eval_split) == ("text", "train", "validation")
    for preset in ("c4_mlperf", "sample"):
        d = load_config([f"dataset={preset}"], num_devices=8).dataset
        assert (d.dataset_config_name, d.text_column, d.train_split, d.eval_split) == (None, "text", "train", "validation")


@pytest.mark.slow
def test_check_cli_on_a_parquet_folder_is_quiet(tmp_path, texts):
    source = write_parquet_folder(tmp_path / "corpus", texts[:30], texts[30:36])
    result = run_module(["-m", "clm.data.check", f"dataset.dataset_name={source}", "dataset.streaming=false",
                         "max_length=128", "global_eval_batch_size=4", f"cache_local_dir={tmp_path / 'cache'}"])
    assert result.returncode == 0, result.stderr
    assert "train split: train of" in result.stdout and "eval set:" in result.stdout
    # No progress bars or per-file log lines from `datasets`.
    assert "%|" not in result.stderr and "Generating" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) <= 2, result.stderr


def test_cached_loading_honours_load_from_cache_file_and_num_proc(tmp_path, texts):
    from clm.data import hf_datasets

    source = write_parquet_folder(tmp_path / "corpus", texts[:12], texts[12:14])
    cache = tmp_path / "hf-cache"

    def load(load_from_cache_file: bool, num_proc: int = 1):
        hf_datasets.load_splits.cache_clear()  # a new process, as far as loading goes
        split = hf_datasets.DatasetSplit(str(source), None, "train", "text", False, str(cache), num_proc,
                                         load_from_cache_file)
        rows = split.load()["text"]
        return rows, {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}

    rows, first = load(True)
    assert rows == texts[:12] and first
    assert load(True)[1] == first  # datasets' prepared cache reused
    rows, rebuilt = load(False)
    assert rows == texts[:12] and rebuilt.keys() == first.keys() and all(rebuilt[p] != first[p] for p in first)
    assert load(False, num_proc=2)[0] == texts[:12]  # prepared by 2 processes, one per file or more
