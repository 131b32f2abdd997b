"""Shipped corpora, tokenizers, calibration and evaluation batches."""

from faircalib.data.corpora import (
    CORPORA,
    calibration_batch,
    eval_sequences,
    load_text,
    load_texts,
    token_stream,
)
from faircalib.data.tokenizers import gpt2_tokenizer, load_tokenizer, special_ids, train_bpe

__all__ = [
    "CORPORA",
    "calibration_batch",
    "eval_sequences",
    "gpt2_tokenizer",
    "load_text",
    "load_texts",
    "load_tokenizer",
    "special_ids",
    "token_stream",
    "train_bpe",
]
