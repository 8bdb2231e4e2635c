"""The data pipeline: C4 (or any JSON lines) from local disk or gs://, tokenized, packed,
batched per host; see train_stream.py and eval_set.py for the semantics."""

from clm.data.eval_set import EvalSet, build_eval_set
from clm.data.sources import validate_dataset
from clm.data.tokenizer import load_tokenizer
from clm.data.train_stream import TrainStream, build_train_stream

__all__ = ["EvalSet", "TrainStream", "build_eval_set", "build_train_stream", "load_tokenizer", "validate_dataset"]
