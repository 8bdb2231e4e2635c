"""gs:// paths against a real GCS server on loopback (gcp-storage-emulator, started here)."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clm import storage
from clm.data import build_eval_set, build_train_stream, load_tokenizer, validate_dataset
from clm.errors import UserError
from test_data import SP, c4_line, make_cfg, pack, sample_texts

BUCKET = "clm-test-data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_server():
    port = free_port()
    emulator = Path(sys.executable).parent / "gcp-storage-emulator"
    server = subprocess.Popen(
        [str(emulator), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "gcp-storage-emulator did not start"
            time.sleep(0.1)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    fs, _ = storage.filesystem(f"gs://{BUCKET}")
    fs.mkdir(BUCKET)  # gcsfs makes a bucket
    yield f"gs://{BUCKET}"
    if previous is None:
        del os.environ["STORAGE_EMULATOR_HOST"]
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous
    server.terminate()
    server.wait(timeout=10)


def upload(path: str, data: bytes) -> None:
    fs, name = storage.filesystem(path)
    fs.pipe_file(name, data)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_storage_round_trip(gcs_server):
    base = f"{gcs_server}/roundtrip"
    with storage.open(storage.join(base, "notes.txt"), "w") as f:
        f.write("naïve text\n")
    with storage.open(storage.join(base, "sub", "data.bin"), "wb") as f:
        f.write(bytes(range(256)) * 4)
    with storage.open(f"{base}/notes.txt", "r") as f:
        assert f.read() == "naïve text\n"
    with storage.open(f"{base}/sub/data.bin") as f:
        assert f.read() == bytes(range(256)) * 4
    assert storage.list_files(base) == {"notes.txt": len("naïve text\n".encode())}
    assert storage.glob(f"{base}/*.txt") == [f"{base}/notes.txt"]
    assert storage.size(f"{base}/sub/data.bin") == 1024
    assert storage.exists(f"{base}/notes.txt") and storage.exists(base) and storage.isdir(f"{base}/sub")
    assert not storage.exists(f"{base}/nothing") and not storage.isdir(f"{base}/notes.txt")


def test_not_found_names_bucket_and_object(gcs_server):
    with pytest.raises(UserError, match="bucket 'clm-test-data', object 'no/such.json'"):
        storage.open(f"{gcs_server}/no/such.json")
    with pytest.raises(UserError, match="bucket 'no-such-bucket', object 'c4/x.json'"):
        storage.open("gs://no-such-bucket/c4/x.json")
    with pytest.raises(UserError, match="dataset.train_dataset_path: gs://no-such-bucket/c4: not found .bucket 'no-s"):
        validate_dataset(make_cfg("gs://no-such-bucket/c4"))


@pytest.mark.parametrize("status", [403, 401])
def test_permission_denied_names_bucket_and_object(gcs_server, status):
    # The emulator has no IAM, so this feeds an HTTP 403 / 401 response through gcsfs's own
    # response check (what it does with every GCS answer) inside the translation that every
    # GCS call in clm.storage goes through.
    from gcsfs.retry import validate_response

    body = b'{"error": {"code": %d, "message": "caller does not have storage.objects.get access"}}' % status
    with pytest.raises(UserError) as error:
        with storage._gcs_errors("gs://private-bucket/c4/c4-train.00768-of-01024.json"):
            validate_response(status, body, "b/private-bucket/o/c4%2Fc4-train.00768-of-01024.json")
    message = str(error.value)
    assert "permission denied" in message and "\n" not in message
    assert "bucket 'private-bucket'" in message and "object 'c4/c4-train.00768-of-01024.json'" in message


def test_train_and_eval_from_gcs_equal_local(gcs_server, tmp_path, tokenizer):
    texts = sample_texts()
    groups = [texts[0:5], texts[5:10]]
    for i, group in enumerate(groups):
        payload = b"".join(c4_line(t) for t in group)
        name = f"part-{i}.json" + (".gz" if i else "")
        data = gzip.compress(payload) if i else payload
        upload(f"{gcs_server}/own/{name}", data)
        (tmp_path / name).write_bytes(data)
    for location in (f"{gcs_server}/own", str(tmp_path)):
        cfg = make_cfg(location, global_train_batch_size=1, global_eval_batch_size=2)
        validate_dataset(cfg)
        expected = [block for group in groups for block in pack(group, 64)]
        with build_train_stream(cfg, tokenizer) as stream:
            blocks = [tuple(next(stream)["input_ids"][0].tolist()) for _ in expected]
        assert blocks == expected, location
        eval_set = build_eval_set(cfg, tokenizer)
        assert eval_set.num_tokens == sum(len(SP.encode(text)) for group in groups for text in group)


@pytest.mark.xla
@pytest.mark.slow
def test_c4_layout_on_gcs_and_resume_from_gcs(gcs_server, tokenizer):
    train, validation = f"{gcs_server}/c4/train", f"{gcs_server}/c4/validation"
    texts = [t[:400] for t in sample_texts()]
    for i in range(768, 1024):
        data = b"".join(c4_line(t) for t in texts[i % 7 : i % 7 + 2])
        upload(f"{train}/c4-train.{i:05d}-of-01024.json.gz", gzip.compress(data))
    cfg = make_cfg(train, validation, dataset={"dataset_name": "c4_mlperf"}, max_length=32, shuffle=True)
    with pytest.raises(UserError, match=f"dataset.eval_dataset_path={validation}: 1 of 1 .*{validation}/c4-valid"):
        validate_dataset(cfg)
    upload(f"{validation}/c4-validation_24567exp.json", b"".join(c4_line(t) for t in texts[:3]))
    validate_dataset(cfg)

    with build_train_stream(cfg, tokenizer) as stream:
        uninterrupted = [next(stream)["input_ids"] for _ in range(12)]
    with build_train_stream(cfg, tokenizer) as stream:
        first = [next(stream)["input_ids"] for _ in range(5)]
        state = stream.state_dict()
    with build_train_stream(cfg, tokenizer) as stream:
        stream.load_state_dict(state)
        rest = [next(stream)["input_ids"] for _ in range(7)]
    assert all(np.array_equal(a, b) for a, b in zip(first + rest, uninterrupted, strict=True))
    assert build_eval_set(cfg, tokenizer).stats["documents"] == 3
