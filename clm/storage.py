"""Local paths and gs:// URLs behind one small API: the one place that knows about GCS.

Everything that reads or writes gs:// goes through here: the data sources, checkpoints
(torch.distributed.checkpoint's fsspec reader and writer, which reach gs:// by fsspec),
clm.convert. GCS is fsspec's gcsfs, the library those need anyway (docs/design.md, "One gs:// stack"); it honours STORAGE_EMULATOR_HOST (tests
point it at gcp-storage-emulator). Objects are read in blocks, never downloaded whole.

`open` moves bytes as stored: it does not decompress, even objects uploaded with
Content-Encoding: gzip; readers that accept gzip detect it themselves (clm.data.sources).
A missing bucket or object, or a denied permission, is a UserError naming the bucket and
the object.
"""

from __future__ import annotations

import builtins
import contextlib
import fnmatch
import glob as local_glob
import logging
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


def filesystem(path: str):
    """(fsspec filesystem, path within it) for a local path or a gs:// URL."""
    if is_gcs(path):
        split_gcs(path)  # a bucket name is required
        return _gcs(), path[len(GCS_PREFIX):]
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), path


def open(path: str, mode: str = "rb") -> IO:  # noqa: A001 - mirrors builtins.open on purpose
    """Open for reading ("r", "rb") or writing ("w", "wb"); text modes are UTF-8."""
    if mode not in ("r", "rb", "w", "wb"):
        raise ValueError(f"storage.open supports modes r, rb, w, wb, not {mode!r}")
    text = {} if "b" in mode else {"encoding": "utf-8"}
    if not is_gcs(path):
        try:
            return builtins.open(path, mode, **text)
        except FileNotFoundError:
            if mode.startswith("w"):
                raise  # a missing parent directory: the caller's bug
            raise UserError(f"{path}: no such file") from None
        except PermissionError:
            raise UserError(f"{path}: permission denied for this user") from None
    fs, name = filesystem(path)
    with _gcs_errors(path):
        if mode.startswith("r"):
            info = _info(path)
            if info is None or info["type"] != "file":
                raise _not_found(path)
        return fs.open(name, mode, **text)


def exists(path: str) -> bool:
    """True for an existing file, or a directory (on GCS: any object under path/)."""
    if not is_gcs(path):
        return os.path.exists(path)
    return _info(path) is not None


def isdir(path: str) -> bool:
    if not is_gcs(path):
        return os.path.isdir(path)
    info = _info(path)
    return info is not None and info["type"] == "directory"


def list_files(directory: str) -> dict[str, int]:
    """Files directly under directory: {name: size in bytes}. One listing call on GCS."""
    if not is_gcs(directory):
        if not os.path.isdir(directory):
            return {}
        with os.scandir(directory) as entries:
            return {e.name: e.stat().st_size for e in entries if e.is_file()}
    fs, name = filesystem(directory)
    with _gcs_errors(directory):
        try:
            entries = fs.ls(name.rstrip("/"), detail=True)
        except FileNotFoundError:
            entries = []
    if not entries:
        _check_bucket(directory)
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry["size"] for entry in entries if entry["type"] == "file"}


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a shell pattern (*, ?, [...]); on GCS '*' also crosses '/'."""
    if not is_gcs(pattern):
        return sorted(p for p in local_glob.glob(pattern) if os.path.isfile(p))
    fs, name = filesystem(pattern)
    literal = name[: min((name.find(c) for c in "*?[" if c in name), default=len(name))]
    directory, _, prefix = literal.rpartition("/")
    with _gcs_errors(pattern):
        try:
            found = fs.find(directory, prefix=prefix) if directory else []
        except FileNotFoundError:
            found = []
    if not found:
        _check_bucket(pattern)
    return sorted(GCS_PREFIX + path for path in found if fnmatch.fnmatchcase(path, name))


def read_range(path: str, start: int, length: int) -> bytes:
    """`length` bytes of a file from byte `start` (fewer at its end): one ranged request on
    GCS, for random access to large files (clm.data.megatron reads samples this way)."""
    if length <= 0:
        return b""
    if not is_gcs(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(length)
    fs, name = filesystem(path)
    with _gcs_errors(path):
        return fs.cat_file(name, start=start, end=start + length)


def size(path: str) -> int:
    if not is_gcs(path):
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
    info = _info(path)
    if info is None or info["type"] != "file":
        raise _not_found(path)
    return info["size"]


def check_writable(directory: str, knob: str) -> None:
    """Fail in one line, before anything runs, when `directory` cannot be created and written."""
    if is_gcs(directory):
        bucket_name, _ = split_gcs(directory)
        fs, name = filesystem(directory)
        probe = f"{name.rstrip('/')}/.clm-write-probe"
        try:
            with _gcs_errors(directory):
                fs.pipe_file(probe, b"")
                fs.rm_file(probe)
        except UserError as e:
            raise UserError(f"{knob}: {e}") from None
        except Exception as e:  # unreachable endpoint, DNS, timeouts: the HTTP stack's many kinds
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


def _gcs():
    """gcsfs, configured once for every gs:// user in the process (fsspec caches the instance)."""
    # Read by gcsfs at import: its experimental zonal/HNS-bucket support probes endpoints that
    # plain buckets (and the GCS emulator) do not have.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import gcsfs

    # gcsfs logs a request that ran out of retries, traceback and all, then raises its error:
    # the raised error is what clm reports (one line), so the log is only noise.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

    # No listing cache: another host, process or tool may have written since the last look
    # (a checkpoint completing, a data file uploaded). No automatic decompression: a ranged
    # read of an object stored with Content-Encoding: gzip must get the stored bytes.
    return gcsfs.GCSFileSystem(use_listings_cache=False, session_kwargs={"auto_decompress": False})


def _info(path: str) -> dict | None:
    """gcsfs's info for a gs:// path (type "file" or "directory"), None if nothing is there; a
    missing bucket is an error."""
    fs, name = filesystem(path)
    with _gcs_errors(path):
        try:
            return fs.info(name.rstrip("/") or name)
        except FileNotFoundError:
            pass
    _check_bucket(path)
    return None


def _check_bucket(path: str) -> None:
    """An empty answer about a missing bucket is an error naming it, not an empty directory."""
    bucket, _ = split_gcs(path)
    fs, _ = filesystem(path)
    with _gcs_errors(path):
        if not fs.exists(bucket):
            raise _not_found(path)


def _not_found(path: str) -> UserError:
    bucket, name = split_gcs(path)
    return UserError(f"{path}: not found (bucket '{bucket}', object '{name}'); check the bucket and object name")


@contextlib.contextmanager
def _gcs_errors(path: str) -> Iterator[None]:
    """Turn gcsfs's not-found and permission errors into one line naming bucket and object."""
    from gcsfs.retry import HttpError

    try:
        yield
    except FileNotFoundError:
        raise _not_found(path) from None
    except (OSError, HttpError) as e:
        denied = isinstance(e, HttpError) and e.code in (401, 403) or str(e).startswith("Forbidden")
        if not denied:
            raise
        bucket, name = split_gcs(path)
        reason = str(e).splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: permission denied (bucket '{bucket}', object '{name}'): {reason}; {_credentials_hint()}"
        ) from None


def _credentials_hint() -> str:
    if not os.environ.get("STORAGE_EMULATOR_HOST") and _gcs().credentials.method == "anon":
        return ("no Google Cloud credentials were found: run `gcloud auth application-default login` or set "
                "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file")
    return ("grant this job's service account access to the bucket (roles/storage.objectViewer to read, "
            "objectAdmin to write)")
