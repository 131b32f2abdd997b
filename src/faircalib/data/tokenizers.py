"""Tokenizers: GPT-2 BPE from shipped files, any tokenizer.json, byte-level BPEs rebuilt from a
checkpoint's vocab.json + merges.txt (repositories that ship only a slow tokenizer, e.g. Dream),
and small BPEs trained here.

Every tokenizer the toolkit hands out is a `tokenizers.Tokenizer` with two special tokens:
`<|endoftext|>` (document separator) and `<|mask|>` (the diffusion absorbing state).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

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
    """A tokenizer.json, or a DataError naming the file and what is wrong with it."""
    from faircalib.errors import DataError

    if not Path(path).is_file():
        raise DataError(f"tokenizer {path} is not a file; pass a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a readable tokenizer.json ({reason})") from exc


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


# documents per encode_batch call: an Encoding also holds every token's string and offsets,
# dozens of bytes a token, so a whole large corpus encoded in one call held gigabytes at once
ENCODE_BATCH = 512


def encode_text(tokenizer: Tokenizer, texts: list[str], **kwargs) -> list[list[int]]:
    """Token ids of data text. A special token's string inside the text ("<|mask|>",
    "<|endoftext|>") is encoded as the text it is: taken as the special id, a literal mask
    token in a document would be scored as a clean [MASK] (an infinite bound) and a literal
    end-of-text would split documents."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        ids: list[list[int]] = []
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = tokenizer.encode_batch(texts[start : start + ENCODE_BATCH], **kwargs)
            ids.extend(enc.ids for enc in batch)
        return ids
    finally:
        tokenizer.encode_special_tokens = previous


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(eos_id, mask_id), or a DataError naming the missing token."""
    from faircalib.errors import DataError

    eos, mask = tokenizer.token_to_id(EOS), tokenizer.token_to_id(MASK)
    if eos is None or mask is None:
        raise DataError(f"tokenizer lacks {EOS if eos is None else MASK}")
    return eos, mask


# Qwen2's pre-tokenization (Dream's tokenizer is Qwen2's): contractions, letters with one
# leading non-letter, single digits, punctuation runs, newlines, spaces
QWEN2_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# tokenizer_config.json's `tokenizer_class` -> how its vocab.json + merges.txt pre-tokenize
SLOW_BPE_CLASSES = {
    "Qwen2Tokenizer": "qwen2",
    "Qwen2TokenizerFast": "qwen2",
    "DreamTokenizer": "qwen2",
    "GPT2Tokenizer": "gpt2",
    "GPT2TokenizerFast": "gpt2",
}


def bpe_from_slow_files(directory: Path) -> Tokenizer:
    """The fast tokenizer of a checkpoint that ships only slow-tokenizer files: vocab.json,
    merges.txt and tokenizer_config.json (its `tokenizer_class` and `added_tokens_decoder`),
    built the way transformers converts them (byte-level BPE; Qwen2's NFC normalisation and
    pre-tokenization regex). Raises ValueError naming what it cannot rebuild."""
    import json

    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text("utf-8")) if config_path.is_file() else {}
    cls = config.get("tokenizer_class")
    style = SLOW_BPE_CLASSES.get(cls)
    if style is None:
        raise ValueError(
            f"its tokenizer_class {cls!r} is not one faircalib rebuilds from vocab.json + "
            f"merges.txt ({', '.join(SLOW_BPE_CLASSES)})"
        )
    vocab = json.loads((directory / "vocab.json").read_text("utf-8"))
    lines = (directory / "merges.txt").read_text("utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if any(len(pair) != 2 for pair in merges):
        raise ValueError("merges.txt has a line that is not two tokens separated by one space")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        prefix = bool(config.get("add_prefix_space", False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tok.decoder = decoders.ByteLevel()
    _add_declared_tokens(tok, config.get("added_tokens_decoder") or {})
    return tok


def _add_declared_tokens(tok: Tokenizer, declared: dict) -> None:
    """tokenizer_config.json's added tokens, at the ids it declares (in id order; each must
    land on its id, i.e. follow the vocabulary without gaps)."""
    for key in sorted(declared, key=int):
        entry = declared[key]
        token = AddedToken(
            entry["content"],
            single_word=bool(entry.get("single_word", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", not entry.get("special", False))),
            special=bool(entry.get("special", False)),
        )
        if tok.token_to_id(entry["content"]) is None:
            tok.add_tokens([token])
        if tok.token_to_id(entry["content"]) != int(key):
            raise ValueError(
                f"added token {entry['content']!r} is declared as id {key} but lands on "
                f"{tok.token_to_id(entry['content'])}"
            )
