"""Which names hold secrets, and the one function that hides their values.

Secrets (HF_TOKEN, WANDB_API_KEY, ...) come from the environment and are never written:
config.yaml, the W&B run's config and anything printed go through `redact`.

A name is secret when, split into words at `_`, `-`, `.` and case changes, its LAST word is
token, key, secret, password (or passwd, apikey, credentials), or ANY word is secret or
password. So HF_TOKEN, WANDB_API_KEY, MY_SECRET, foo_password, aws_secret_access_key are
secret, while tokenizer_name_or_path, pad_token_id and num_key_value_heads are not: there
"token" and "key" are part of a longer name that describes something else.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

REDACTED = "<redacted>"
_LAST_WORD = {"token", "key", "secret", "password", "passwd", "apikey", "credentials"}
_ANY_WORD = {"secret", "password", "passwd"}
# Short values ("1", "true") would blank out unrelated text; real credentials are long.
_MIN_SECRET_LENGTH = 6


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_name(name: str) -> bool:
    words = _words(name)
    return bool(words) and (words[-1] in _LAST_WORD or any(w in _ANY_WORD for w in words))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables, longest first."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, values: list[str] | None = None) -> str:
    for value in secret_values() if values is None else values:
        text = text.replace(value, REDACTED)
    return text


def redact(obj: Any, values: list[str] | None = None) -> Any:
    """A copy of a plain config tree (dicts, lists, scalars) with secrets replaced by <redacted>.

    The value of every secret-named key is hidden, and so is any string that contains the
    value of a secret environment variable (a token pasted into a path, say).
    """
    values = secret_values() if values is None else values
    if isinstance(obj, Mapping):
        return {k: REDACTED if is_secret_name(str(k)) and obj[k] is not None else redact(v, values)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, values) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, values)
    return obj
