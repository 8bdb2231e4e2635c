"""Local paths and gs:// URLs behind one small API.

The data pipeline reads through here, so a dataset can live on local disk or in Google
Cloud Storage alike. (Checkpoints go through torch_xla's CheckpointManager, which
reaches gs:// by fsspec.)
GCS goes through google-cloud-storage, which honours STORAGE_EMULATOR_HOST (tests point
it at gcp-storage-emulator). Objects are streamed in chunks, never downloaded whole.

`open` moves bytes as stored: it does not decompress; readers that accept gzip detect it
themselves (clm.data.sources). A missing object or a denied permission is a UserError
naming the bucket and the object.
"""

from __future__ import annotations

import builtins
import contextlib
import fnmatch
import functools
import glob as local_glob
import io
import os
import tempfile
from typing import IO, Iterator

from clm.errors import UserError

GCS_PREFIX = "gs://"


def is_gcs(path: str) -> bool:
    return path.startswith(GCS_PREFIX)


def split_gcs(path: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, name = path[len(GCS_PREFIX) :].partition("/")
    if not bucket:
        raise UserError(f"{path}: a gs:// path needs a bucket name, e.g. gs://my-bucket/dir")
    return bucket, name


def join(base: str, *names: str) -> str:
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *(name.strip("/") for name in names)])
    return os.path.join(base, *names)


def open(path: str, mode: str = "rb") -> IO:  # noqa: A001 - mirrors builtins.open on purpose
    """Open for reading ("r", "rb") or writing ("w", "wb"); text modes are UTF-8."""
    if mode not in ("r", "rb", "w", "wb"):
        raise ValueError(f"storage.open supports modes r, rb, w, wb, not {mode!r}")
    if not is_gcs(path):
        try:
            return builtins.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
        except FileNotFoundError:
            if mode.startswith("w"):
                raise  # a missing parent directory: the caller's bug
            raise UserError(f"{path}: no such file") from None
        except PermissionError:
            raise UserError(f"{path}: permission denied for this user") from None
    bucket_name, name = split_gcs(path)
    with _gcs_errors(path):
        bucket = _client().bucket(bucket_name)
        if mode.startswith("w"):
            return bucket.blob(name).open(mode, encoding=None if "b" in mode else "utf-8")
        # Fetching the metadata pins the generation, so a concurrent overwrite cannot
        # splice two versions into one read, and turns a missing object into one clear error.
        blob = bucket.get_blob(name)
        if blob is None:
            raise _not_found(path)
        # raw_download: the bytes as stored, even for objects uploaded with
        # Content-Encoding: gzip (GCS would otherwise decompress them on the fly).
        reader = blob.open("rb", raw_download=True)
    return reader if mode == "rb" else io.TextIOWrapper(reader, encoding="utf-8")


def exists(path: str) -> bool:
    """True for an existing file, or a directory (on GCS: any object under path/)."""
    if not is_gcs(path):
        return os.path.exists(path)
    bucket_name, name = split_gcs(path)
    with _gcs_errors(path):
        is_file = bool(name) and _client().bucket(bucket_name).get_blob(name) is not None
    return is_file or isdir(path)


def isdir(path: str) -> bool:
    if not is_gcs(path):
        return os.path.isdir(path)
    bucket_name, name = split_gcs(path)
    prefix = name.rstrip("/") + "/" if name else ""
    with _gcs_errors(path):
        return any(True for _ in _client().list_blobs(bucket_name, prefix=prefix, max_results=1))


def list_files(directory: str) -> dict[str, int]:
    """Files directly under directory: {name: size in bytes}. One listing call on GCS."""
    if not is_gcs(directory):
        if not os.path.isdir(directory):
            return {}
        with os.scandir(directory) as entries:
            return {e.name: e.stat().st_size for e in entries if e.is_file()}
    bucket_name, name = split_gcs(directory)
    prefix = name.rstrip("/") + "/" if name else ""
    with _gcs_errors(directory):
        blobs = _client().list_blobs(bucket_name, prefix=prefix, delimiter="/")
        return {blob.name[len(prefix) :]: blob.size for blob in blobs if blob.name != prefix}


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a shell pattern (*, ?, [...]); on GCS '*' also crosses '/'."""
    if not is_gcs(pattern):
        return sorted(p for p in local_glob.glob(pattern) if os.path.isfile(p))
    bucket_name, name = split_gcs(pattern)
    literal_prefix = name[: min((name.find(c) for c in "*?[" if c in name), default=len(name))]
    with _gcs_errors(pattern):
        names = [b.name for b in _client().list_blobs(bucket_name, prefix=literal_prefix)]
    return sorted(f"{GCS_PREFIX}{bucket_name}/{n}" for n in names if fnmatch.fnmatchcase(n, name))


def read_range(path: str, start: int, length: int) -> bytes:
    """`length` bytes of a file from byte `start` (fewer at its end): one ranged request on
    GCS, for random access to large files (clm.data.megatron reads samples this way)."""
    if length <= 0:
        return b""
    if not is_gcs(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(length)
    bucket_name, name = split_gcs(path)
    with _gcs_errors(path):
        blob = _client().bucket(bucket_name).blob(name)
        return blob.download_as_bytes(start=start, end=start + length - 1, raw_download=True)


def size(path: str) -> int:
    if not is_gcs(path):
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
    bucket_name, name = split_gcs(path)
    with _gcs_errors(path):
        blob = _client().bucket(bucket_name).get_blob(name)
    if blob is None:
        raise _not_found(path)
    return blob.size


def check_writable(directory: str, knob: str) -> None:
    """Fail in one line, before anything runs, when `directory` cannot be created and written."""
    if is_gcs(directory):
        bucket_name, name = split_gcs(directory)
        probe = f"{name.rstrip('/')}/.clm-write-probe".lstrip("/")
        try:
            with _gcs_errors(directory):
                blob = _client().bucket(bucket_name).blob(probe)
                blob.upload_from_string(b"")
                blob.delete()
        except UserError as e:
            raise UserError(f"{knob}: {e}") from None
        except Exception as e:  # unreachable endpoint, DNS, timeouts: the client's many kinds
            raise UserError(
                f"{knob}={directory}: cannot write to bucket '{bucket_name}' ({type(e).__name__}: {e}); "
                "check the bucket name, the network and the credentials"
            ) from None
        return
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".clm-write-probe-"):
            pass
    except OSError as e:
        raise UserError(
            f"{knob}: cannot write to {directory} ({e.strerror or e}); choose a writable local directory"
        ) from None


# ------------------------------------------------------------------------------ GCS


def _client():
    # Keyed by the emulator address so tests that start their own server get a fresh client.
    return _client_for(os.environ.get("STORAGE_EMULATOR_HOST"))


@functools.lru_cache(maxsize=None)
def _client_for(emulator_host: str | None):
    # Imported here: google-cloud-storage takes about half a second to import, and runs
    # that never touch gs:// should not pay for it.
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage as gcs

    try:
        return gcs.Client()
    except DefaultCredentialsError as e:
        raise UserError(
            f"gs:// paths need Google Cloud credentials ({e}); run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
        ) from None


def _not_found(path: str) -> UserError:
    bucket, name = split_gcs(path)
    return UserError(f"{path}: not found (bucket '{bucket}', object '{name}'); check the bucket and object name")


@contextlib.contextmanager
def _gcs_errors(path: str) -> Iterator[None]:
    """Turn GCS's not-found and permission errors into one line naming bucket and object."""
    from google.api_core import exceptions as api_errors

    try:
        yield
    except api_errors.NotFound:
        raise _not_found(path) from None
    except (api_errors.Forbidden, api_errors.Unauthorized) as e:
        bucket, name = split_gcs(path)
        raise UserError(
            f"{path}: permission denied (bucket '{bucket}', object '{name}'): {e.message}; grant this job's "
            "service account access to the bucket (roles/storage.objectViewer to read, objectAdmin to write)"
        ) from None
