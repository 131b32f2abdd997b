"""Pre-tokenised corpus transport: the training token stream as numbered, independently
xz-compressed pieces of at most N MiB each, with a sha256 manifest.

Why: a GPU call carries only a few MiB beside the repository, and uint16 token ids compress to
fewer bytes per training token than the xz'd jsonl text (measured in docs/training.md), and
skip the tokenisation on the GPU machine. Each piece is its own xz stream of little-endian
uint16 ids, so any subset of pieces that arrived is usable: `assemble` joins the pieces present
(checked against the manifest) in index order into one .npy that `faircalib train
--token-cache` reads directly.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import numpy as np

from faircalib.errors import DataError

MANIFEST = "manifest.json"
XZ_PRESET = 9 | lzma.PRESET_EXTREME
TOKEN_DTYPE = np.dtype("<u2")  # the 8k BPE ids fit 16 bits; half the bytes of int32


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def piece_name(index: int) -> str:
    return f"tokens.{index:04d}.u16.xz"


def _compress(ids: np.ndarray) -> bytes:
    return lzma.compress(ids.astype(TOKEN_DTYPE).tobytes(), preset=XZ_PRESET)


def split_into_pieces(
    stream: np.ndarray, max_piece_bytes: int, first_guess: int | None = None
) -> list[tuple[np.ndarray, bytes]]:
    """Cut `stream` into consecutive runs whose xz stream is at most `max_piece_bytes`; each
    run is as long as the compression ratio measured on the previous one allows (a run that
    comes out too large is shortened and compressed again)."""
    pieces: list[tuple[np.ndarray, bytes]] = []
    tokens_per_byte = (first_guess or max_piece_bytes) / max_piece_bytes
    start = 0
    while start < len(stream):
        n = max(1, int(max_piece_bytes * tokens_per_byte * 0.97))
        while True:
            run = stream[start : start + n]
            blob = _compress(run)
            if len(blob) <= max_piece_bytes:
                break
            if n == 1:  # xz's own framing outweighs the limit: no run can fit
                raise DataError(
                    f"a piece limit of {max_piece_bytes:,} bytes is below what one token "
                    f"compresses to ({len(blob):,} bytes); use a larger --max-piece-mib"
                )
            n = max(1, int(n * max_piece_bytes / len(blob) * 0.97))
        tokens_per_byte = len(run) / len(blob)
        pieces.append((run, blob))
        start += len(run)
    return pieces


def write_pieces(
    stream: np.ndarray,
    out_dir: str | Path,
    *,
    max_piece_mib: float = 3.9,
    vocab_size: int,
    source: dict,
) -> dict:
    """Write `stream` (token ids < 2**16) as pieces plus manifest.json into `out_dir`; returns
    the manifest. `source` records what was tokenised (shards, tokenizer sha256)."""
    if len(stream) == 0:
        raise DataError("no tokens to write")
    if int(stream.max()) >= 2**16 or int(stream.min()) < 0 or vocab_size > 2**16:
        raise DataError("token pieces hold uint16 ids: the tokenizer must have at most 65,536")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty directory; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    max_bytes = int(max_piece_mib * 2**20)
    if max_bytes < 1024:  # below xz's framing plus a few tokens
        raise DataError(f"--max-piece-mib {max_piece_mib} is under 1 KiB; use a larger limit")
    # a first guess of 1.5 tokens per compressed byte (the 8k BPE on Wikipedia) saves a retry
    entries = []
    for index, (run, blob) in enumerate(
        split_into_pieces(stream, max_bytes, first_guess=int(max_bytes * 1.5))
    ):
        name = piece_name(index)
        (out / name).write_bytes(blob)
        entries.append(
            {
                "name": name,
                "bytes": len(blob),
                "sha256": sha256_bytes(blob),
                "tokens": len(run),
                "tokens_sha256": sha256_bytes(run.astype(TOKEN_DTYPE).tobytes()),
            }
        )
    manifest = {
        "format": "faircalib token pieces v1: xz streams of little-endian uint16 token ids",
        "vocab_size": vocab_size,
        "tokens": int(len(stream)),
        "max_piece_bytes": max_bytes,
        "source": source,
        "pieces": entries,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(path: str | Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
        _ = manifest["pieces"][0]["sha256"], manifest["vocab_size"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise DataError(f"{path} is not a token-pieces manifest ({exc})") from exc
    return manifest


def verified_piece(directory: Path, entry: dict) -> np.ndarray | None:
    """The ids of one piece if its file is present and matches the manifest; None if absent.
    A corrupt piece is an error, never silently skipped."""
    path = directory / entry["name"]
    if not path.exists():
        return None
    blob = path.read_bytes()
    if sha256_bytes(blob) != entry["sha256"]:
        raise DataError(f"{path} does not match its manifest sha256; carry it again")
    raw = lzma.decompress(blob)
    if sha256_bytes(raw) != entry["tokens_sha256"]:
        raise DataError(f"{path} decompresses to other tokens than its manifest records")
    return np.frombuffer(raw, dtype=TOKEN_DTYPE)


def assemble(
    pieces_dir: str | Path,
    out_npy: str | Path,
    *,
    manifest_path: str | Path | None = None,
    require_all: bool = False,
    tokenizer: str | Path | None = None,
) -> dict:
    """Join the verified pieces present in `pieces_dir` (index order) into `out_npy` (uint16
    .npy, written atomically). `tokenizer`: refuse unless it is the one the pieces were made
    with. Returns {"pieces", "missing", "tokens", "path"}."""
    directory = Path(pieces_dir)
    manifest = read_manifest(manifest_path or directory / MANIFEST)
    expected = manifest.get("source", {}).get("tokenizer_sha256")
    if tokenizer is not None and expected != sha256_bytes(Path(tokenizer).read_bytes()):
        raise DataError(f"the token pieces were not made with {tokenizer}; use the same tokenizer")
    runs, missing = [], []
    for entry in manifest["pieces"]:
        ids = verified_piece(directory, entry)
        if ids is None:
            missing.append(entry["name"])
        else:
            runs.append(ids)
    if not runs or (require_all and missing):
        raise DataError(
            f"{len(missing)} of {len(manifest['pieces'])} token pieces are missing from "
            f"{directory} (first: {missing[:1]}); carry them first"
        )
    stream = np.concatenate(runs)
    out = Path(out_npy)
    if out.exists() or out.is_symlink():  # an input shard, a model file: never overwritten
        raise DataError(f"{out} already exists; choose a new --out (or delete it first)")
    tmp = out.with_name(out.name + ".tmp.npy")
    try:
        np.save(tmp, stream)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "pieces": len(runs),
        "missing": missing,
        "tokens": int(len(stream)),
        "path": str(out),
    }


def tokenize_shards(
    shards: list[str], tokenizer_path: str, max_tokens: int | None = None
) -> tuple[np.ndarray, int]:
    """The training stream of `shards` exactly as `faircalib train` builds it (documents
    joined by EOS), cut at `max_tokens`; returns (ids, vocab size)."""
    from faircalib.training import load_tokenizer, read_documents, tokenize_stream

    tokenizer, eos_id = load_tokenizer(tokenizer_path)
    runs, total = [], 0
    for shard in shards:  # shard by shard, so a token limit stops the reading early
        runs.append(tokenize_stream(tokenizer, read_documents([shard]), eos_id))
        total += len(runs[-1])
        if max_tokens is not None and total >= max_tokens:
            break
    return np.concatenate(runs)[:max_tokens], tokenizer.get_vocab_size()
