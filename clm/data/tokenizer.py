"""Tokenizers: SentencePiece's own encoder for Mixtral, Hugging Face's for anything else.

Which one (`tokenizer_source`): model.tokenizer_name_or_path when set; else the pretrained
directory's own (model.name_or_path with a tokenizer.model, tokenizer.json or anything else
AutoTokenizer loads); else the Mixtral v1 SentencePiece model shipped in mistral-common, the
offline default. A tokenizer whose largest id does not fit the model's vocab_size is a one-line
error (`load_model_tokenizer`).

Special ids: text is encoded without BOS or EOS (as the reference); `pad_id` is the input id
of padded positions (their labels are ignored): the tokenizer's pad token, else its EOS (the
Mixtral tokenizer has no pad token, so that is EOS, 2), else 0.

The benchmark's token ids must equal SentencePiece's `encode` of each document with the
Mixtral v1 model, leading '▁' included. transformers 5's AutoTokenizer built from a bare
tokenizer.model drops that '▁' ("Hello" gives 16230 instead of 22557), so whenever a
tokenizer.model is at hand it is run through sentencepiece directly.

encode_batch runs on one thread on purpose: the data pipeline runs `dataset.num_proc`
of them side by side (both libraries release the GIL while encoding).
"""

from __future__ import annotations

import os
from pathlib import Path

from clm.errors import UserError

SENTENCEPIECE_MODEL = "tokenizer.model"
# What AutoTokenizer loads a tokenizer from, besides tokenizer.model.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def mixtral_v1_tokenizer_path() -> str:
    """The Mixtral-8x7B/8x22B-v0.1 SentencePiece model that ships inside mistral-common."""
    import mistral_common

    return str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")


class SentencePieceTokenizer:
    def __init__(self, model_file: str):
        import sentencepiece

        self.name = model_file
        self._processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._processor.vocab_size()
        # SentencePiece says -1 for a special token the model does not have.
        self.bos_id = _id_or_none(self._processor.bos_id())
        self.eos_id = _id_or_none(self._processor.eos_id())
        self.pad_id = _first_id(self._processor.pad_id(), self.eos_id)
        self.max_id = self.vocab_size - 1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, no BOS/EOS."""
        return self._processor.encode(texts, num_threads=1)

    def decode(self, ids) -> str:
        return self._processor.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
    """A tokenizer that comes without a tokenizer.model (e.g. only tokenizer.json)."""

    def __init__(self, name_or_path: str, cache_dir: str | None = None):
        from transformers import AutoTokenizer

        self.name = name_or_path
        self._tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
        self.vocab_size = len(self._tokenizer)
        self.bos_id = self._tokenizer.bos_token_id
        self.eos_id = self._tokenizer.eos_token_id
        self.pad_id = _first_id(self._tokenizer.pad_token_id, self.eos_id)
        self.max_id = max(self._tokenizer.get_vocab().values())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def _id_or_none(value: int) -> int | None:
    return value if value is not None and value >= 0 else None


def _first_id(*candidates) -> int:
    return next((c for c in candidates if c is not None and c >= 0), 0)


def tokenizer_source(model_cfg) -> str | None:
    """model.tokenizer_name_or_path, else the pretrained directory if it holds a tokenizer, else
    None (the bundled Mixtral v1 model)."""
    if model_cfg.tokenizer_name_or_path:
        return model_cfg.tokenizer_name_or_path
    directory = model_cfg.name_or_path
    if directory and any(os.path.isfile(os.path.join(directory, f)) for f in (SENTENCEPIECE_MODEL, *HF_TOKENIZER_FILES)):
        return directory
    return None


def load_model_tokenizer(model_cfg, vocab_size: int | None, cache_dir: str | None = None):
    """The tokenizer of cfg.model (`tokenizer_source`), checked against the model's vocab_size
    (None: not checked)."""
    tokenizer = load_tokenizer(tokenizer_source(model_cfg), cache_dir)
    if vocab_size is not None and tokenizer.max_id >= vocab_size:
        knob = (f"model.tokenizer_name_or_path={model_cfg.tokenizer_name_or_path}" if model_cfg.tokenizer_name_or_path
                else f"the tokenizer {tokenizer.name}")
        raise UserError(
            f"{knob}: its ids go up to {tokenizer.max_id} but the model's vocab_size is {vocab_size}; use the model's "
            "own tokenizer (model.tokenizer_name_or_path, or a tokenizer in model.name_or_path) or a model whose "
            f"vocab_size is at least {tokenizer.max_id + 1}"
        )
    return tokenizer


def load_tokenizer(name_or_path: str | None, cache_dir: str | None = None):
    """None: the bundled Mixtral v1 model. Otherwise a tokenizer.model file, a local
    directory (with a tokenizer.model, else a Hugging Face tokenizer), or a hub name."""
    if name_or_path is None:
        return SentencePieceTokenizer(mixtral_v1_tokenizer_path())
    if os.path.isfile(name_or_path):
        return _sentencepiece_or_error(name_or_path)
    if os.path.isdir(name_or_path):
        model_file = os.path.join(name_or_path, SENTENCEPIECE_MODEL)
        has_hf_files = any(os.path.isfile(os.path.join(name_or_path, f)) for f in HF_TOKENIZER_FILES)
        if os.path.isfile(model_file):
            # A tokenizer.model that is not SentencePiece (e.g. tiktoken's) next to a
            # tokenizer.json: the Hugging Face tokenizer is the directory's tokenizer.
            if has_hf_files and not _is_sentencepiece(model_file):
                return _huggingface_or_error(name_or_path, cache_dir)
            return _sentencepiece_or_error(model_file)
        return _huggingface_or_error(name_or_path, cache_dir)
    return _from_hub(name_or_path, cache_dir)


def _from_hub(repo_id: str, cache_dir: str | None):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return SentencePieceTokenizer(hf_hub_download(repo_id, SENTENCEPIECE_MODEL, cache_dir=cache_dir))
    except EntryNotFoundError:
        return _huggingface_or_error(repo_id, cache_dir)
    except Exception as e:  # offline, no access, no such repository: all one answer
        raise UserError(
            f"model.tokenizer_name_or_path={repo_id}: not a local file or directory, and the hub download failed "
            f"({type(e).__name__}); give a tokenizer.model path, a local tokenizer directory, or null for the "
            "bundled Mixtral v1 tokenizer"
        ) from None


def _is_sentencepiece(model_file: str) -> bool:
    try:
        SentencePieceTokenizer(model_file)
    except (RuntimeError, OSError):
        return False
    return True


def _sentencepiece_or_error(model_file: str) -> SentencePieceTokenizer:
    try:
        return SentencePieceTokenizer(model_file)
    except (RuntimeError, OSError) as e:
        raise UserError(
            f"model.tokenizer_name_or_path={model_file}: not a SentencePiece model ({e}); give a tokenizer.model "
            "file, or null for the bundled Mixtral v1 tokenizer"
        ) from None


def _huggingface_or_error(name_or_path: str, cache_dir: str | None) -> HuggingFaceTokenizer:
    try:
        return HuggingFaceTokenizer(name_or_path, cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model.tokenizer_name_or_path={name_or_path}: no tokenizer.model and no Hugging Face tokenizer "
            f"there ({type(e).__name__}); give a tokenizer.model file, or null for the bundled Mixtral v1 tokenizer"
        ) from None
