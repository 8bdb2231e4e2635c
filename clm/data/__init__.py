"""The data pipeline: the training stream and the eval set of a config's source.

`dataset.dataset_name` selects the source:
  c4_mlperf, json   text files, local or gs:// (sources.py), tokenized and packed (train_stream.py, eval_set.py)
  megatron          Megatron indexed datasets (.bin/.idx), already tokenized (megatron.py)
  any other         a Hugging Face `datasets` name or path (hf_datasets.py), tokenized and packed

Every source yields the same batches, {"input_ids", "labels"}: int32 [rows, max_length], where
labels[:, t] is the target of position t (already shifted) and pad_token_id marks an unscored
position.
"""

from clm.data import eval_set, megatron, sources, train_stream
from clm.data.eval_set import EvalSet
from clm.data.tokenizer import load_model_tokenizer, load_tokenizer
from clm.data.train_stream import TrainStream

MEGATRON = "megatron"


def is_pretokenized(dataset_cfg) -> bool:
    """Sources read as token ids, with no tokenizer."""
    return dataset_cfg.dataset_name == MEGATRON


def tokenizer_for(cfg, vocab_size: int | None = None):
    """The tokenizer a config's data needs (clm.data.tokenizer's choice, checked against the
    model's vocab_size when given): None for pre-tokenized data."""
    if is_pretokenized(cfg.dataset):
        return None
    return load_model_tokenizer(cfg.model, vocab_size, cfg.cache_local_dir)


def validate_dataset(cfg) -> None:
    """Checks that fail in seconds, before anything compiles (see each source's own)."""
    if is_pretokenized(cfg.dataset):
        megatron.validate(cfg)
    else:
        sources.validate_dataset(cfg)


def build_train_stream(cfg, tokenizer, process_index: int = 0, process_count: int = 1):
    """This process's share of the training micro-batches: an endless, resumable iterator
    with start(), close(), stats, state_dict() and load_state_dict()."""
    if is_pretokenized(cfg.dataset):
        micro_batch_size = train_stream.micro_batch_size(cfg, process_count)
        return megatron.build_train_stream(cfg, micro_batch_size, process_index, process_count)
    return train_stream.build_train_stream(cfg, tokenizer, process_index, process_count)


def build_eval_set(cfg, tokenizer, process_index: int = 0, process_count: int = 1) -> EvalSet:
    """This process's rows of the validation set, the same at every eval."""
    if is_pretokenized(cfg.dataset):
        return megatron.build_eval_set(cfg, process_index, process_count)
    return eval_set.build_eval_set(cfg, tokenizer, process_index, process_count)


__all__ = ["EvalSet", "TrainStream", "build_eval_set", "build_train_stream", "is_pretokenized", "load_tokenizer",
           "tokenizer_for", "validate_dataset"]
