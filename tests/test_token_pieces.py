"""The pre-tokenised corpus transport (faircalib.data.token_pieces, `faircalib data
pack-tokens / assemble-tokens`) and `faircalib train --token-cache` reading its output."""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from faircalib.data import token_pieces
from faircalib.errors import DataError

TOKENIZER = Path(__file__).parents[1] / "src/faircalib/assets/tokenizers/wiki-bpe-8k.json"


def zipf_stream(n: int, vocab: int = 8000, seed: int = 0) -> np.ndarray:
    """Token-like ids: Zipf-distributed, so xz compresses them roughly as it does text ids."""
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.3, n) % vocab).astype(np.int64)


def test_pieces_respect_the_size_limit_and_decompress_to_the_stream(tmp_path):
    stream = zipf_stream(120_000)
    limit_mib = 0.02  # ~21 KB pieces: several of them
    manifest = token_pieces.write_pieces(
        stream, tmp_path, max_piece_mib=limit_mib, vocab_size=8000, source={"test": True}
    )
    assert len(manifest["pieces"]) >= 3
    joined = []
    for entry in manifest["pieces"]:
        blob = (tmp_path / entry["name"]).read_bytes()
        assert len(blob) <= limit_mib * 2**20
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
        joined.append(np.frombuffer(lzma.decompress(blob), dtype="<u2"))
    np.testing.assert_array_equal(np.concatenate(joined), stream)
    assert manifest["tokens"] == len(stream) == sum(e["tokens"] for e in manifest["pieces"])
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_assemble_joins_the_pieces_present_in_order(tmp_path):
    stream = zipf_stream(60_000, seed=1)
    manifest = token_pieces.write_pieces(
        stream, tmp_path, max_piece_mib=0.02, vocab_size=8000, source={}
    )
    counts = [e["tokens"] for e in manifest["pieces"]]
    bounds = np.cumsum([0, *counts])
    (tmp_path / manifest["pieces"][1]["name"]).unlink()  # one piece never arrived
    out = tmp_path / "tokens.npy"
    result = token_pieces.assemble(tmp_path, out)
    expected = np.concatenate([stream[: bounds[1]], stream[bounds[2] :]])
    np.testing.assert_array_equal(np.load(out), expected)
    assert result["missing"] == [manifest["pieces"][1]["name"]]
    assert result["tokens"] == len(expected)
    with pytest.raises(DataError, match="missing"):
        token_pieces.assemble(tmp_path, out, require_all=True)


def test_a_corrupt_piece_is_refused(tmp_path):
    manifest = token_pieces.write_pieces(zipf_stream(20_000), tmp_path, vocab_size=8000, source={})
    path = tmp_path / manifest["pieces"][0]["name"]
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="sha256"):
        token_pieces.assemble(tmp_path, tmp_path / "t.npy")


def test_ids_that_do_not_fit_16_bits_are_refused(tmp_path):
    with pytest.raises(DataError, match="uint16"):
        token_pieces.write_pieces(np.array([1, 70_000]), tmp_path, vocab_size=80_000, source={})


def test_tokenize_shards_matches_the_tokenizer_document_by_document(tmp_path):
    from tokenizers import Tokenizer

    docs = ["The cat sat on the mat.", "Paris is the capital of France.", "  ", "Ünïcode ok"]
    shard = tmp_path / "a.jsonl"
    shard.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stream, vocab = token_pieces.tokenize_shards([str(shard)], str(TOKENIZER))
    tok = Tokenizer.from_file(str(TOKENIZER))
    eos = tok.token_to_id("<|endoftext|>")
    expected = [i for d in docs if d.strip() for i in [*tok.encode(d).ids, eos]]
    assert stream.tolist() == expected
    assert vocab == tok.get_vocab_size()
    limited, _ = token_pieces.tokenize_shards([str(shard)], str(TOKENIZER), max_tokens=5)
    assert limited.tolist() == expected[:5]


def test_cli_pack_then_assemble_then_train_from_the_token_file(tmp_path):
    """The lease's path: pieces -> assembled .npy -> `faircalib train --token-cache` with no
    text at all, on the CPU; the trained model saw exactly the assembled tokens."""
    from faircalib.cli import main

    rng = np.random.default_rng(0)
    words = ["river", "stone", "green", "the", "of", "and", "city", "north", "music", "old"]
    docs = [" ".join(rng.choice(words, 60)) + "." for _ in range(120)]
    shard = tmp_path / "c.jsonl"
    shard.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pieces = tmp_path / "pieces"
    assert main(["data", "pack-tokens", str(shard), "--tokenizer", str(TOKENIZER),
                 "--out", str(pieces), "--max-piece-mib", "0.002"]) == 0  # fmt: skip
    cache = tmp_path / "tokens.npy"
    assert main(["data", "assemble-tokens", str(pieces), "--out", str(cache), "--require-all"]) == 0
    expected, _ = token_pieces.tokenize_shards([str(shard)], str(TOKENIZER))
    np.testing.assert_array_equal(np.load(cache), expected)
    out = tmp_path / "model"
    argv = ["train", "--tokenizer", str(TOKENIZER), "--token-cache", str(cache), "--out", str(out),
            "--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--max-steps", "2",
            "--warmup-steps", "1", "--eval-every", "1000", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["corpus_tokens"] == len(expected)
    assert log["config"]["corpus"] == []


def test_a_token_cache_from_another_tokenizer_is_refused(tmp_path):
    from faircalib.training import read_token_cache

    path = tmp_path / "t.npy"
    np.save(path, np.array([1, 2, 9000], dtype=np.uint16))
    with pytest.raises(DataError, match="another"):
        read_token_cache(path, vocab_size=8192)
    np.save(path, np.array([1, 2, 8191], dtype=np.uint16))
    widened = read_token_cache(path, vocab_size=8192)
    assert widened.dtype == np.int32 and widened.tolist() == [1, 2, 8191]


def test_assembly_refuses_pieces_of_another_tokenizer(tmp_path):
    source = {"tokenizer_sha256": hashlib.sha256(TOKENIZER.read_bytes()).hexdigest()}
    token_pieces.write_pieces(zipf_stream(5_000), tmp_path, vocab_size=8192, source=source)
    other = tmp_path / "other.json"
    other.write_bytes(TOKENIZER.read_bytes() + b" ")
    with pytest.raises(DataError, match="tokenizer"):
        token_pieces.assemble(tmp_path, tmp_path / "t.npy", tokenizer=other)
    result = token_pieces.assemble(tmp_path, tmp_path / "t.npy", tokenizer=TOKENIZER)
    assert result["tokens"] == 5_000
