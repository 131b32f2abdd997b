"""Perplexity protocols: how a text becomes the [N, L] token rows the likelihood bound scores.

- `faircalib` (our tables): documents (WikiText: articles) tokenized as they are, an end-of-text
  after each, the stream cut into rows of the model's length, the last partial row dropped.
- `mdlm`: MDLM's zero-shot protocol (Sahoo et al. 2024), re-implemented from reading
  kuleshov-group/mdlm's `dataloader.py` (`get_dataset`, `_group_texts`, `get_dataloaders`):
    1. every dataset row (WikiText: every line, blank lines included) goes through the corpus's
       detokenizer (`faircalib.eval.detokenizers`) and is tokenized without special tokens;
    2. an end-of-text token follows every row;
    3. rows are concatenated in batches of 1,000 (the `datasets.map(batched=True)` default
       batch that `_group_texts` sees), each batch cut into pieces of L - 2 tokens and its
       remainder dropped; every piece becomes [BOS] + piece + [EOS] (L tokens);
    4. WikiText is scored on its validation split (test only for text8, lm1b and ag_news).
  With GPT-2, BOS is `<|endoftext|>` like EOS; our tokenizers have no separate BOS either, so
  both are the end-of-text token. MDLM's map runs on `num_proc` = the machine's CPU count, each
  worker dropping its own remainders; we follow one worker (the difference is a few rows).

The bound itself is the same for both: every position of a row, the BOS/EOS included, is masked
and scored, as in MDLM's loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from faircalib.data.sources import TextSource
from faircalib.data.tokenizers import EOS, encode_text
from faircalib.errors import ConfigError, DataError
from faircalib.eval.detokenizers import SHIPPED_DETOKENIZER, get_detokenizer

PROTOCOLS = ("faircalib", "mdlm")
MDLM_GROUP_ROWS = 1000  # rows per concatenation batch (datasets' default map batch size)
# the split each protocol evaluates a shipped corpus on, when none is given
DEFAULT_SPLITS = {
    "faircalib": {"wikitext2": "test", "c4": "validation"},
    "mdlm": {"wikitext2": "validation", "c4": "validation"},
}
# what a shipped split is, where it differs from what MDLM's code loads
SPLIT_NOTES = {
    ("wikitext2", "validation"): "WikiText-103's tokenized validation rows of the WikiText-2 "
    "articles (0.77% <unk>): MDLM loads wikitext-2-raw-v1 validation, which is not shipped",
    ("wikitext2", "test"): "the raw WikiText-2 test text (byte-identical to wiki.test.raw); "
    "MDLM's protocol scores WikiText-2 on validation, not test",
    ("c4", "validation"): "C4 is not among MDLM's zero-shot corpora: no detokenizer",
}


@dataclass
class EvalBatch:
    sequences: torch.Tensor  # [N, L] token ids
    n_bytes: int  # UTF-8 bytes of the (detokenized) text those rows cover
    protocol: str
    detokenizer: str | None
    note: str | None


def default_split(protocol: str, corpus: str) -> str | None:
    """The split `protocol` scores shipped `corpus` on; None for the user's data."""
    return DEFAULT_SPLITS[check_protocol(protocol)].get(corpus)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    return protocol


def protocol_sequences(
    tokenizer: Tokenizer,
    source: TextSource,
    protocol: str,
    seq_len: int,
    detokenizer: str | None = "auto",
    limit: int | None = None,
) -> EvalBatch:
    """The rows `protocol` scores for `source` (at most `limit`: `first_rows`' rows and bytes).
    `detokenizer` (mdlm only): a name from faircalib.eval.detokenizers, None / 'none', or
    'auto' (MDLM's choice for a shipped corpus, none for the user's data)."""
    from faircalib.data import eval_sequences
    from faircalib.data.corpora import leading_sequences

    check_protocol(protocol)
    note = SPLIT_NOTES.get((source.name, source.split)) if source.kind == "shipped" else None
    if protocol == "faircalib":
        # with a limit, only the documents those rows need are tokenized (the same rows)
        seqs = None if limit is None else leading_sequences(
            tokenizer, source, source.split, seq_len, limit
        )  # fmt: skip
        if seqs is not None:
            return EvalBatch(seqs, rows_bytes(tokenizer, seqs), protocol, None, None)
        seqs, n_bytes = eval_sequences(tokenizer, source, source.split, seq_len)
        seqs, n_bytes = first_rows(tokenizer, seqs, n_bytes, limit)
        return EvalBatch(seqs, n_bytes, protocol, None, None)
    if detokenizer == "auto":
        detokenizer = SHIPPED_DETOKENIZER.get(source.name) if source.kind == "shipped" else None
    rows, detokenize = list(source.row_texts), get_detokenizer(detokenizer)
    if limit is not None:  # only the row groups the first rows come from are tokenized
        seqs = leading_mdlm_rows(tokenizer, rows, seq_len, detokenize, limit)
        if seqs is not None:
            return EvalBatch(seqs, rows_bytes(tokenizer, seqs), protocol, detokenizer, note)
    seqs, n_bytes = mdlm_sequences(tokenizer, rows, seq_len, detokenize)
    seqs, n_bytes = first_rows(tokenizer, seqs, n_bytes, limit)
    return EvalBatch(seqs, n_bytes, protocol, detokenizer, note)


def leading_mdlm_rows(
    tokenizer: Tokenizer,
    rows: list[str],
    seq_len: int,
    detokenize: Callable[[str], str] | None,
    limit: int,
    group_rows: int = MDLM_GROUP_ROWS,
) -> torch.Tensor | None:
    """The first `limit` rows of `mdlm_sequences`, tokenizing only the groups of `group_rows`
    rows they come from (each group is wrapped on its own); None when the text has fewer."""
    eos = _mdlm_eos(tokenizer)
    pieces: list[list[int]] = []
    for start in range(0, len(rows), group_rows):
        group = rows[start : start + group_rows]
        texts = [detokenize(r) for r in group] if detokenize else group
        ids = encode_text(tokenizer, texts, add_special_tokens=False)
        pieces += _pieces(ids, seq_len, eos, eos)
        if len(pieces) >= limit:
            return torch.tensor(pieces[:limit], dtype=torch.long)
    return None


def _mdlm_eos(tokenizer: Tokenizer) -> int:
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise DataError(f"tokenizer has no {EOS} token; use a tokenizer.json that has one")
    return eos


def mdlm_sequences(
    tokenizer: Tokenizer,
    rows: list[str],
    seq_len: int,
    detokenize: Callable[[str], str] | None = None,
    group_rows: int = MDLM_GROUP_ROWS,
) -> tuple[torch.Tensor, int]:
    """MDLM's wrapped evaluation rows [N, seq_len] and the UTF-8 bytes they cover (the bytes of
    the detokenized rows times the share of the row stream kept)."""
    eos = _mdlm_eos(tokenizer)
    texts = [detokenize(r) for r in rows] if detokenize else list(rows)
    ids = encode_text(tokenizer, texts, add_special_tokens=False)
    seqs = wrap_rows(ids, seq_len, bos=eos, eos=eos, group_rows=group_rows)
    streamed = sum(len(r) + 1 for r in ids)  # row tokens plus their end-of-text
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return seqs, round(text_bytes * len(seqs) * (seq_len - 2) / streamed)


def wrap_rows(
    rows: list[list[int]], seq_len: int, *, bos: int, eos: int, group_rows: int = MDLM_GROUP_ROWS
) -> torch.Tensor:
    """Rows of token ids -> [N, seq_len]: EOS after every row; per batch of `group_rows` rows
    the concatenation is cut into pieces of seq_len - 2 (the remainder dropped), each piece
    framed as [bos] + piece + [eos]."""
    pieces = []
    for start in range(0, len(rows), group_rows):
        pieces += _pieces(rows[start : start + group_rows], seq_len, bos, eos)
    if not pieces:
        raise DataError(
            f"the text is shorter than one evaluation row of {seq_len:,} tokens; add text or "
            "lower --seq-len"
        )
    return torch.tensor(pieces, dtype=torch.long)


def _pieces(group: list[list[int]], seq_len: int, bos: int, eos: int) -> list[list[int]]:
    """One group's rows joined with EOS after each, cut into [bos] + seq_len - 2 tokens +
    [eos] (the remainder dropped)."""
    if seq_len < 3:
        raise DataError(f"MDLM's rows need room for BOS and EOS: use --seq-len >= 3, not {seq_len}")
    body = seq_len - 2
    stream = list(itertools.chain.from_iterable(r + [eos] for r in group))
    return [[bos, *stream[i : i + body], eos] for i in range(0, len(stream) - body + 1, body)]


def split_spec(spec: str) -> tuple[str, str | None]:
    """'corpus:split', 'PATH' or 'DIR:split' -> (data, split or None). An existing path is
    taken whole, so a file name with a colon in it still works."""
    from pathlib import Path

    if Path(spec).expanduser().exists() or ":" not in spec:
        return spec, None
    data, split = spec.rsplit(":", 1)
    return data, split


def first_rows(
    tokenizer: Tokenizer, seqs: torch.Tensor, n_bytes: int, limit: int | None
) -> tuple[torch.Tensor, int]:
    """The first `limit` rows and the UTF-8 bytes they cover: their decoded text (special
    tokens dropped). The whole text's bytes per token would be wrong for a prefix of text of
    uneven density (English, then Chinese). The rows are decoded as one token stream, as they
    were cut from one: decoded one by one, a character whose bytes straddle two rows would
    come back as two replacement characters of 3 bytes each."""
    if limit is None or limit >= len(seqs):
        return seqs, n_bytes
    return seqs[:limit], rows_bytes(tokenizer, seqs[:limit])


def rows_bytes(tokenizer: Tokenizer, seqs: torch.Tensor) -> int:
    """The UTF-8 bytes of rows decoded as one token stream (`first_rows` says why)."""
    text = tokenizer.decode(seqs.reshape(-1).tolist(), skip_special_tokens=True)
    return len(text.encode("utf-8"))


def eval_sets(
    tokenizer: Tokenizer,
    specs: list[str],
    protocol: str,
    seq_len: int,
    *,
    limit: int | None = None,
    text_field: str = "text",
) -> tuple[dict[str, tuple[torch.Tensor, int]], dict[str, dict]]:
    """({spec: (sequences [N, L], bytes)}, {spec: data record}) for the bench: each spec is
    'corpus[:split]' or the user's data, read under `protocol`, cut to the first `limit` rows."""
    from faircalib.data.sources import load_source

    sets, records = {}, {}
    for spec in specs:
        data, split = split_spec(spec)
        source = load_source(data, split or default_split(protocol, data), text_field)
        batch = protocol_sequences(tokenizer, source, protocol, seq_len, limit=limit)
        sets[spec] = (batch.sequences, batch.n_bytes)
        records[spec] = {**source.record(), "protocol": protocol, "split_note": batch.note}
    return sets, records
