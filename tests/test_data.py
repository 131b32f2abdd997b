"""Shipped data: real text, checksums, deterministic batches, clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from faircalib import hub
from faircalib.cli import main
from faircalib.data import (
    calibration_batch,
    corpora,
    eval_sequences,
    gpt2_tokenizer,
    load_text,
    load_texts,
    special_ids,
    train_bpe,
)
from faircalib.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return hub.load_tokenizer("mdlm-tiny")


def test_real_text_with_the_documented_counts():
    assert len(load_texts("c4", "train")) == 1041
    assert len(load_texts("c4", "validation")) == 1025
    assert load_texts("c4", "train")[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    test = load_text("wikitext2", "test")
    assert " = Robert Boulter = " in test
    assert sum(len(d.split()) for d in load_texts("wikitext2", "test")) == 241_211  # SOURCES.md


def test_gpt2_token_counts_match_sources():
    g = gpt2_tokenizer()
    assert special_ids(g) == (50256, 50257)
    ids, _ = corpora.tokenized_docs(g, "c4", "train")
    assert sum(len(d) for d in ids) == 498_183  # SOURCES.md


def test_tampered_file_is_refused(tmp_path: Path, monkeypatch):
    for f in corpora.FILES_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    target = tmp_path / corpora.CORPORA["c4"]["validation"][0]
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF
    target.write_bytes(bytes(data))
    monkeypatch.setattr(corpora, "FILES_DIR", tmp_path)
    corpora._load_docs.cache_clear()
    with pytest.raises(DataError, match="checksum mismatch"):
        load_texts("c4", "validation")
    corpora._load_docs.cache_clear()


def test_calibration_batches_are_deterministic(tok):
    a = calibration_batch(tok, n_samples=8, seq_len=64, seed=3)
    b = calibration_batch(tok, n_samples=8, seq_len=64, seed=3)
    c = calibration_batch(tok, n_samples=8, seq_len=64, seed=4)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < tok.get_vocab_size()


def test_eval_sequences_wrap_the_whole_split(tok):
    seqs, n_bytes = eval_sequences(tok, "wikitext2", "test", 128)
    stream = corpora.token_stream(tok, "wikitext2", "test")
    assert seqs.shape == (len(stream) // 128, 128)
    assert torch.equal(seqs.flatten(), stream[: seqs.numel()])
    assert 1_200_000 < n_bytes <= len(load_text("wikitext2", "test").encode())


def test_bad_requests_raise_clear_errors(tok):
    with pytest.raises(DataError, match="unknown corpus 'ptb'"):
        load_texts("ptb", "test")
    with pytest.raises(DataError, match="no split 'train'"):
        load_texts("wikitext2", "train")
    with pytest.raises(DataError, match="at least 1 sample"):
        calibration_batch(tok, n_samples=0)
    with pytest.raises(DataError, match=r"tokens; a window of 10,000,000"):
        calibration_batch(tok, n_samples=1, seq_len=10_000_000)
    with pytest.raises(DataError, match="fewer than one sequence"):
        eval_sequences(tok, "wikitext2", "test", 10_000_000)


def test_tokenizer_round_trips_real_text():
    text = load_texts("c4", "validation")[0][:2000]
    g = gpt2_tokenizer()
    assert g.decode(g.encode(text).ids) == text
    small = train_bpe(load_texts("c4", "train")[:50], vocab_size=400)
    assert special_ids(small) == (0, 1)
    assert small.decode(small.encode(text).ids) == text


def test_wikitext2_splits_into_its_60_articles_per_split():
    """Merity et al. (2016): WikiText-2 has 60 validation and 60 test articles. Two equation
    lines of 'Constant k filter' have a title's shape but sit inside a paragraph."""
    for split in ("test", "validation"):
        articles = load_texts("wikitext2", split)
        assert len(articles) == 60, split
        assert all(a.lstrip().startswith("= ") for a in articles)
    k_filter = next(a for a in load_texts("wikitext2", "test") if "Constant k filter" in a[:40])
    assert " = 1 henry and capacitance C = " in k_filter


def test_data_command_json(capsys):
    assert main(["data", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["corpus"], r["split"]): r for r in out["corpora"]}
    assert rows[("c4", "validation")]["tokens"] == 506_708
    assert rows[("wikitext2", "test")]["documents"] == 60  # the dataset's 60 test articles


def test_tampered_tokenizer_file_is_refused(tmp_path: Path, monkeypatch):
    src = corpora.FILES_DIR / "tokenizers" / "gpt2"
    dst = tmp_path / "tokenizers" / "gpt2"
    shutil.copytree(src, dst)
    vocab = dst / "vocab.json.gz"
    vocab.chmod(0o644)
    data = bytearray(vocab.read_bytes())
    data[-20] ^= 0xFF  # inside the gzip trailer or payload: either way the load must fail
    vocab.write_bytes(bytes(data))
    monkeypatch.setattr(corpora, "FILES_DIR", tmp_path)
    with pytest.raises(DataError, match="vocab.json.gz"):
        gpt2_tokenizer()


def test_stream_cache_is_per_tokenizer_object():
    # two different tokenizers, the first freed before the second exists: ids may be reused
    a = train_bpe(load_texts("c4", "train")[:30], vocab_size=300)
    stream_a = corpora.token_stream(a, "c4", "validation").clone()
    del a
    b = train_bpe(load_texts("c4", "train")[:30], vocab_size=600)
    stream_b = corpora.token_stream(b, "c4", "validation")
    assert len(stream_b) < 0.9 * len(stream_a)  # the larger vocabulary compresses the text
    assert int(stream_b.max()) >= 300  # uses ids only the larger vocabulary has


def test_eval_sequences_are_copies_and_check_length(tok):
    seqs, _ = eval_sequences(tok, "c4", "validation", 64)
    first = int(seqs[0, 0])
    seqs.fill_(-1)  # callers mask in place; the cached stream must not change
    again, _ = eval_sequences(tok, "c4", "validation", 64)
    assert int(again[0, 0]) == first and int(again.min()) >= 0
    with pytest.raises(DataError, match="must be positive, got 0"):
        eval_sequences(tok, "c4", "validation", 0)
