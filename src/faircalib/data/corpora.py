"""Shipped corpora, checksummed at load time, and the batches built from them.

Files live in `data/files/` (see DATA.md for origin and licence). Every checksum below is the
sha256 listed in the shared data's SOURCES.md for the original file: for files we ship
gzip-compressed it is the sha256 of the decompressed bytes, so provenance stays checkable.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer

from faircalib.data.tokenizers import EOS, encode_text
from faircalib.errors import DataError

if TYPE_CHECKING:
    from faircalib.data.sources import TextSource

FILES_DIR = Path(__file__).parent / "files"

# corpus -> split -> (file, sha256 of the original (decompressed) file, what the file holds)
CORPORA: dict[str, dict[str, tuple[str, str, str]]] = {
    "wikitext2": {
        "test": (
            "wikitext2-test.raw.gz",
            "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
            "raw",
        ),
        # near-raw validation text: WikiText-103's rows of the same articles (few <unk>)
        "validation": (
            "wikitext103-validation.jsonl.gz",
            "a868a5ab8f73be4a406ed7c997de29f7a328865497f3c1677575ab49ac7ac3fa",
            "rows",
        ),
    },
    "c4": {
        "train": (
            "c4-train.00000-of-01024.first1041.jsonl.gz",
            "6b1a44a29595c18e0eccdbbd2db1c2c9781fb5748d515af2c237c045d7c55fda",
            "docs-gz",
        ),
        "validation": (
            "c4-validation.00000-of-00008.first1025.jsonl.gz",
            "1ddb9bdeeb2309ff2a4b0658ad97304bf5af4aa56bfa1799ce26590e3b668f7a",
            "docs-gz",
        ),
    },
}


def _check(corpus: str, split: str) -> tuple[Path, str, str]:
    if corpus not in CORPORA:
        raise DataError(f"unknown corpus {corpus!r}; shipped corpora: {sorted(CORPORA)}")
    if split not in CORPORA[corpus]:
        raise DataError(
            f"corpus {corpus!r} has no split {split!r}; splits: {sorted(CORPORA[corpus])}"
        )
    name, sha, kind = CORPORA[corpus][split]
    return FILES_DIR / name, sha, kind


def read_verified(path: Path, sha256: str, checksum_of: str) -> bytes:
    """File bytes (decompressed), after checking `sha256` of the raw or decompressed bytes."""
    if not path.exists():
        raise DataError(f"data file {path} is missing; reinstall faircalib")
    raw = path.read_bytes()
    if checksum_of == "file":
        _compare(path, sha256, raw)
    try:
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError) as exc:
        raise DataError(
            f"{path.name} is not a readable gzip file ({exc}); reinstall faircalib"
        ) from exc
    if checksum_of != "file":
        _compare(path, sha256, data)
    return data


def _compare(path: Path, sha256: str, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise DataError(
            f"checksum mismatch for {path.name}: expected {sha256[:12]}..., got {digest[:12]}..."
        )


def _is_title(lines: list[str], i: int) -> bool:
    """Whether line i is an article's title: ' = Title = ' between blank lines. The blank lines
    matter: an equation's continuation inside a paragraph can have the same shape (WikiText-2's
    test split has two, ' = 1 henry and capacitance C = ', which made it 62 articles where the
    dataset has 60)."""
    stripped = lines[i].strip()
    if not (stripped.startswith("= ") and stripped.endswith(" =")) or stripped.startswith("= ="):
        return False
    before = i == 0 or not lines[i - 1].strip()
    after = i + 1 == len(lines) or not lines[i + 1].strip()
    return before and after


def _wikitext_articles(lines: list[str]) -> list[str]:
    """Split WikiText lines into articles at their titles (_is_title)."""
    articles: list[list[str]] = []
    for i, line in enumerate(lines):
        if _is_title(lines, i):
            articles.append([])
        if not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a).strip("\n") for a in articles if "".join(a).strip()]


def _read_rows(path_str: str, sha: str, kind: str) -> tuple[str, ...]:
    """The file's rows: C4 documents, or WikiText's Hugging Face rows ("" for blank lines)."""
    path = Path(path_str)
    data = read_verified(path, sha, "file" if kind == "docs-gz" else "content")
    text = data.decode("utf-8")
    if kind in ("docs-gz", "rows"):
        return tuple(json.loads(line)["text"] for line in text.splitlines() if line.strip())
    # raw WikiText: rebuild the Hugging Face rows
    return tuple(
        "" if not line.strip() else line + "\n"
        for line in text.replace("\r\n", "\n").split("\n")[:-1]
    )


@lru_cache(maxsize=8)
def _load_docs(path_str: str, sha: str, kind: str) -> tuple[str, ...]:
    rows = _read_rows(path_str, sha, kind)
    return rows if kind == "docs-gz" else tuple(_wikitext_articles(list(rows)))


def load_texts(corpus: str, split: str) -> list[str]:
    """The documents of a shipped corpus split (WikiText: one document per article)."""
    path, sha, kind = _check(corpus, split)
    return list(_load_docs(str(path), sha, kind))


_load_rows = lru_cache(maxsize=4)(_read_rows)


def load_rows(corpus: str, split: str) -> list[str]:
    """The rows of a shipped corpus split as the Hugging Face dataset has them (WikiText: one
    per line, "" for blank lines; C4: one per document): the units MDLM's protocol wraps."""
    path, sha, kind = _check(corpus, split)
    return list(_load_rows(str(path), sha, kind))


def load_text(corpus: str, split: str) -> str:
    """The whole split as one string: its documents joined by blank lines."""
    return "\n\n".join(load_texts(corpus, split))


def _eos(tokenizer: Tokenizer) -> int:
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise DataError(f"tokenizer has no {EOS} token")
    return eos


# (id(tokenizer), source key) -> (tokenizer, ids per doc, bytes per doc, EOS-joined stream).
# The tokenizer itself is kept so that its id cannot be reused by a new object while cached, and
# is compared by identity so a stale entry is never served.
_STREAMS: dict[tuple, tuple[Tokenizer, list[list[int]], list[int], torch.Tensor]] = {}
_MAX_CACHED = 16


def as_source(corpus: str | TextSource, split: str | None) -> TextSource:
    """A TextSource as-is; a shipped corpus name (with its split) loaded as one."""
    from faircalib.data.sources import TextSource, shipped_source

    if isinstance(corpus, TextSource):
        return corpus
    _check(corpus, split)
    return shipped_source(corpus, split)


def _tokenized(
    tokenizer: Tokenizer, corpus: str | TextSource, split: str | None
) -> tuple[Tokenizer, list[list[int]], list[int], torch.Tensor]:
    source = as_source(corpus, split)
    key = (id(tokenizer), source.key)
    hit = _STREAMS.get(key)
    if hit is None or hit[0] is not tokenizer:
        docs = list(source.docs)
        eos = _eos(tokenizer)
        ids = encode_text(tokenizer, docs)
        stream = torch.tensor([t for doc in ids for t in [*doc, eos]], dtype=torch.long)  # [T]
        if len(_STREAMS) >= _MAX_CACHED:  # bound memory: drop the oldest entry
            del _STREAMS[next(iter(_STREAMS))]
        _STREAMS[key] = (tokenizer, ids, [len(d.encode("utf-8")) for d in docs], stream)
    return _STREAMS[key]


def tokenized_docs(
    tokenizer: Tokenizer, corpus: str | TextSource, split: str | None
) -> tuple[list[list[int]], list[int]]:
    """(token ids per document, UTF-8 bytes per document), cached per tokenizer object."""
    _, ids, doc_bytes, _ = _tokenized(tokenizer, corpus, split)
    return ids, doc_bytes


def token_stream(tokenizer: Tokenizer, corpus: str | TextSource, split: str | None) -> torch.Tensor:
    """All documents joined with EOS after each: [T] token ids (a cached tensor: do not modify)."""
    return _tokenized(tokenizer, corpus, split)[3]


def calibration_batch(
    tokenizer: Tokenizer,
    corpus: str | TextSource = "c4",
    split: str | None = "train",
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """[n_samples, seq_len] random windows of the EOS-joined stream (GPTQ-style), seeded.
    `corpus` is a shipped corpus name (with `split`) or a TextSource (the user's data)."""
    if n_samples < 1:
        raise DataError(f"calibration needs at least 1 sample, {n_samples} requested")
    if seq_len < 1:
        raise DataError(f"sequence length must be positive, got {seq_len}")
    source = as_source(corpus, split)
    stream = token_stream(tokenizer, source, split)
    if len(stream) <= seq_len:
        raise DataError(
            f"{source.label} has {len(stream):,} tokens; a window of {seq_len:,} tokens needs more"
        )
    if len(stream) < n_samples * seq_len:  # windows would overlap: text repeated, not more text
        raise DataError(
            f"{source.label} has {len(stream):,} tokens, fewer than {n_samples:,} samples x "
            f"{seq_len:,} tokens = {n_samples * seq_len:,}; add text or lower --nsamples/--seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n_samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def leading_sequences(
    tokenizer: Tokenizer, corpus: str | TextSource, split: str | None, seq_len: int, rows: int
) -> torch.Tensor | None:
    """The first `rows` rows of `eval_sequences`, from the documents they need alone (a quick
    `--limit` look at a large file need not tokenize, nor hold, all of it); None when the text
    has fewer rows (then `eval_sequences` itself gives them and their bytes)."""
    source = as_source(corpus, split)
    eos, need = _eos(tokenizer), rows * seq_len
    docs, pieces, have, start, batch = source.docs, [], 0, 0, 8
    while have < need and start < len(docs):
        for ids in encode_text(tokenizer, list(docs[start : start + batch])):
            pieces.append(torch.tensor([*ids, eos], dtype=torch.long))
            have += len(ids) + 1
        start, batch = start + batch, min(2 * batch, 512)
    if have < need:
        return None
    return torch.cat(pieces)[:need].view(rows, seq_len).clone()


def eval_sequences(
    tokenizer: Tokenizer, corpus: str | TextSource, split: str | None, seq_len: int
) -> tuple[torch.Tensor, int]:
    """MDLM zero-shot protocol: join documents with EOS, wrap into [N, seq_len] chunks (the last
    partial chunk dropped). Also returns the UTF-8 bytes those tokens cover: the bytes of the
    whole text times the share of tokens kept (every document lies in the kept stream except
    the dropped tail, which is less than one chunk)."""
    if seq_len < 1:
        raise DataError(f"sequence length must be positive, got {seq_len}")
    source = as_source(corpus, split)
    stream = token_stream(tokenizer, source, split)
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(
            f"{source.label} has {len(stream):,} tokens, fewer than one sequence of {seq_len:,}"
        )
    _, doc_bytes = tokenized_docs(tokenizer, source, split)
    n_bytes = round(sum(doc_bytes) * n * seq_len / len(stream))
    # clone: callers mask sequences in place, and the stream is cached
    return stream[: n * seq_len].view(n, seq_len).clone(), n_bytes
