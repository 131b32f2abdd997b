"""Tokenizers: GPT-2 BPE from shipped files, any tokenizer.json, and small BPEs trained here.

Every tokenizer the toolkit hands out is a `tokenizers.Tokenizer` with two special tokens:
`<|endoftext|>` (document separator) and `<|mask|>` (the diffusion absorbing state).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = [EOS, MASK]


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) whose ids 0 and 1 are EOS and MASK."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2 byte-level BPE from the shipped files (EOS 50256), plus <|mask|> as id 50257."""
    import json

    from faircalib.data.corpora import FILES_DIR, read_verified

    folder = FILES_DIR / "tokenizers" / "gpt2"
    vocab = json.loads(
        read_verified(folder / "vocab.json.gz", GPT2_SHA256["vocab.json"], "content")
    )
    merges_text = read_verified(
        folder / "merges.txt.gz", GPT2_SHA256["merges.txt"], "content"
    ).decode()
    merges = [tuple(line.split(" ")) for line in merges_text.splitlines()[1:] if line]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, MASK])
    return tok


GPT2_SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def encode_text(tokenizer: Tokenizer, texts: list[str], **kwargs) -> list[list[int]]:
    """Token ids of data text. A special token's string inside the text ("<|mask|>",
    "<|endoftext|>") is encoded as the text it is: taken as the special id, a literal mask
    token in a document would be scored as a clean [MASK] (an infinite bound) and a literal
    end-of-text would split documents."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return [enc.ids for enc in tokenizer.encode_batch(texts, **kwargs)]
    finally:
        tokenizer.encode_special_tokens = previous


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(eos_id, mask_id), or a DataError naming the missing token."""
    from faircalib.errors import DataError

    eos, mask = tokenizer.token_to_id(EOS), tokenizer.token_to_id(MASK)
    if eos is None or mask is None:
        raise DataError(f"tokenizer lacks {EOS if eos is None else MASK}")
    return eos, mask
