"""Malformed input, unwritable outputs, fuzzed headers: what every command does with them.

    python benchmarks/robustness.py --out benchmarks/results/robustness   # each case its own process
    python benchmarks/robustness.py --inprocess --out /tmp/robustness     # faster: cli.main here

Every case builds its inputs in a fresh directory (from the shipped mdlm-tiny, a packed copy of
it, or small files), runs one faircalib command and passes when: the exit status is non-zero,
stderr is exactly one line, there is no Python traceback, the line matches what the case
expects (it names the problem) and says what to do, and no directory that the command created
holds a config.json (every loader starts from it, and every writer writes it last).

The output cases need root: a read-only bind mount and a full disk (a 1 MiB tmpfs). Where
mounting is not permitted they are skipped, with the reason in the table. The fuzz cases feed
hypothesis-generated config.json files and safetensors headers to the loaders directly: each
example must load or raise one single-line FairCalibError, nothing else.

tests/test_robustness.py runs the same CASES (in-process, plus a few as real processes).
Writes robustness.json and robustness.md into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from faircalib import atomic, hub
from faircalib.bench import record_lines, run_record

TINY = hub.ASSETS / "models" / "mdlm-tiny"
SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"
LAYER = "blocks.0.attn_qkv"  # a quantized layer of the packed copy: [384, 128], 2 groups of 64
# "what to do": every refusal line names a remedy (a verb the user can act on)
ADVICE = re.compile(
    r"\b(use|pass|choose|remove|delete|re-download|re-export|reinstall|install|free|rerun|fix|"
    r"check|copy|see|convert|split|add|drop)\b",
    re.IGNORECASE,
)
QUANTIZE = ["quantize", "mdlm-tiny", "--method", "rtn", "--nsamples", "2", "--seq-len", "16"]


# --- shared inputs ---------------------------------------------------------------------------
@dataclass
class Inputs:
    """Built once per run: a float copy of mdlm-tiny and a packed (RTN W4 g64) copy."""

    root: Path
    float_dir: Path
    packed_dir: Path

    @classmethod
    def build(cls, root: Path) -> Inputs:
        from faircalib.calib import quantize, save_quantized
        from faircalib.config import CalibConfig, RTNConfig

        root.mkdir(parents=True, exist_ok=True)
        float_dir = root / "float"
        shutil.copytree(TINY, float_dir, ignore=shutil.ignore_patterns("*.md", "train_log.json"))
        model = hub.load("mdlm-tiny")
        tokens = torch.randint(
            2, model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
        )
        cfg = RTNConfig(bits=4, group_size=64, scale_dtype="bfloat16")
        report = quantize(model, cfg, tokens, CalibConfig(n_samples=2, seq_len=16), progress=False)
        packed_dir = root / "packed"
        save_quantized(model, report, packed_dir, TINY / "tokenizer.json", fmt="packed")
        return cls(root, float_dir, packed_dir)


# --- building blocks of cases ------------------------------------------------------------------
def clone(src: Path, work: Path) -> Path:
    dest = work / "model"
    shutil.copytree(src, dest)
    return dest


def edit_tensors(directory: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Apply `fn` to the single shard's tensors in place; the index follows the new names."""
    tensors = load_file(str(directory / SHARD))
    fn(tensors)
    save_file(tensors, str(directory / SHARD), metadata={"format": "pt"})
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"] = dict.fromkeys(tensors, SHARD)
    (directory / INDEX).write_text(json.dumps(index))
    return directory


def edit_json(path: Path, fn: Callable[[dict], object]) -> Path:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))
    return path.parent


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def header_file(path: Path, header: bytes, payload: bytes = b"") -> Path:
    """A safetensors file with this exact header (length prefix computed)."""
    return write(path, struct.pack("<Q", len(header)) + header + payload)


def evaluate(directory: Path | str) -> list[str]:
    return ["eval", str(directory), "--limit", "1", "--json"]


def good_shard(work: Path) -> Path:
    return write(work / "c.jsonl", '{"text": "a b c"}\n')


def train_case(
    make: Callable[[Path], Path],
    *extra: str,
    tokenizer: Callable[[Path], Path] = lambda _work: TINY / "tokenizer.json",
    out: str | None = None,
) -> Callable[[Path, Inputs], list[str]]:
    """`faircalib train` on a corpus shard `make` writes (the data path users bring today)."""

    def build(work: Path, _inputs: Inputs) -> list[str]:
        return [
            *("train", "--corpus", str(make(work)), "--tokenizer", str(tokenizer(work))),
            *("--out", (out or "CASE/trained").replace("CASE", str(work))),
            *("--max-steps", "1", "--batch-size", "2"),
            *("--device", "cpu", *(a.replace("CASE", str(work)) for a in extra)),
        ]

    return build


def fake_progress(state: object) -> Callable[[Path, Inputs], list[str]]:
    """A quantize run whose OUT.partial holds `state` as progress.json."""

    def build(work: Path, _inputs: Inputs) -> list[str]:
        content = state if isinstance(state, str) else json.dumps(state)
        write(work / "q.partial" / "progress.json", content)
        return [*QUANTIZE, "--out", str(work / "q"), "--json", "--resume"]

    return build


def progress_of_other_run(resume: bool) -> Callable[[Path, Inputs], list[str]]:
    state = {"format": "faircalib-progress", "version": 1, "finished_blocks": 2}
    state.update(fingerprint={"model_weights": "0" * 64}, blocks=[{}, {}], inputs=None)

    def build(work: Path, inputs: Inputs) -> list[str]:
        argv = fake_progress(state)(work, inputs)
        return argv if resume else argv[:-1]

    return build


def no_eos_tokenizer(work: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path = work / "tokenizer.json"
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    return path


def pickled_token_cache(work: Path) -> Path:
    import numpy as np

    # an object array is stored as a pickle: the loader must refuse it, not unpickle it
    np.save(work / "tokens.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return write(work / "corpus.jsonl", '{"text": "hello"}\n')


# --- mounts (root only) -----------------------------------------------------------------------
@contextlib.contextmanager
def mounted(kind: str, where: Path) -> Iterator[None]:
    """'ro': a read-only bind mount of an empty directory at `where`; 'full': a 1 MiB tmpfs."""
    where.mkdir(parents=True, exist_ok=True)
    if kind == "ro":
        source = where.with_name(where.name + "-src")
        source.mkdir()
        commands = [["mount", "--bind", str(source), str(where)]]
        commands.append(["mount", "-o", "remount,bind,ro", str(where)])
    else:
        commands = [["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)]]
    done = 0
    try:
        for cmd in commands:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            done += 1
        yield
    finally:
        if done:
            subprocess.run(["umount", str(where)], check=False, capture_output=True)


def mount_unavailable() -> str | None:
    """None where this process may mount file systems, else why not."""
    if sys.platform != "linux" or shutil.which("mount") is None:
        return "no mount(8) on this system"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with mounted("full", Path(tmp) / "probe"):
                pass
        except subprocess.CalledProcessError as exc:
            reason = (exc.stderr or "").strip().splitlines()
            return f"mounting is not permitted here ({reason[0] if reason else exc})"
    return None


# --- the cases ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    group: str
    build: Callable[[Path, Inputs], list[str]]  # makes its files in a fresh dir -> faircalib argv
    expect: str  # regex (case-insensitive) the error line must match: it names the problem
    mount: str | None = None  # "ro" / "full": the case's `work/mnt` is mounted during the run
    notes: str = ""


def put(name: str, data: bytes | str) -> Callable[[Path], object]:
    return lambda d: write(d / name, data)


def drop(*names: str) -> Callable[[Path], object]:
    return lambda d: [os.remove(d / n) for n in names]


def cut(name: str, size: Callable[[int], int]) -> Callable[[Path], object]:
    return lambda d: os.truncate(d / name, size((d / name).stat().st_size))


def tensor(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], object]:
    def fn(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = value(tensors[name]).contiguous()

    return lambda d: edit_tensors(d, fn)


def tensors(fn: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], object]:
    return lambda d: edit_tensors(d, fn)


def config(**fields: object) -> Callable[[Path], object]:
    return lambda d: edit_json(d / "config.json", lambda c: c.update(fields))


def index(fn: Callable[[dict], object]) -> Callable[[Path], object]:
    return lambda d: edit_json(d / INDEX, fn)


def group(**fields: object) -> Callable[[Path], object]:
    """Change the packed checkpoint's one compressed-tensors config group."""

    def fn(cfg: dict) -> None:
        next(iter(cfg["quantization_config"]["config_groups"].values())).update(fields)

    return lambda d: edit_json(d / "config.json", fn)


def weights(**fields: object) -> Callable[[Path], object]:
    return group(weights={**_packed_weights, **fields})


_packed_weights = {
    "num_bits": 4,
    "type": "int",
    "symmetric": False,
    "strategy": "group",
    "group_size": 64,
}


def qconfig(**fields: object) -> Callable[[Path], object]:
    return lambda d: edit_json(d / "config.json", lambda c: c["quantization_config"].update(fields))


def pickle_only(d: Path) -> None:
    """Weights only as a pickle (the bytes of pickle.dumps(1)): never to be unpickled."""
    drop(SHARD, INDEX)(d)
    write(d / "pytorch_model.bin", b"\x80\x04K\x01.")


def escape_index(d: Path) -> None:
    """The index points at a valid shard one directory up."""
    shutil.copy(d / SHARD, d.parent / "other.safetensors")
    edit_json(
        d / INDEX,
        lambda x: x.update(weight_map=dict.fromkeys(x["weight_map"], "../other.safetensors")),
    )


def bad_act_quant(d: Path) -> None:
    write(d / "act_quant.json", '{"layers": {"blocks.0.mlp.0": {"act_bits": "eight"}}}')
    save_file({"blocks.0.mlp.0.input_scale": torch.ones(128)}, str(d / "act_quant.safetensors"))


def nan_at(row: int, value: float = float("nan")) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.index_fill(0, torch.tensor([row]), value)


def on_float(fn: Callable[[Path], object]) -> Callable[[Path, Inputs], list[str]]:
    """A case that damages a copy of the float model, then evaluates it."""

    def build(work: Path, inputs: Inputs) -> list[str]:
        directory = clone(inputs.float_dir, work)
        fn(directory)
        return evaluate(directory)

    return build


def on_packed(fn: Callable[[Path], object]) -> Callable[[Path, Inputs], list[str]]:
    def build(work: Path, inputs: Inputs) -> list[str]:
        directory = clone(inputs.packed_dir, work)
        fn(directory)
        return evaluate(directory)

    return build


def fifo_config(work: Path) -> Path:
    """A model directory whose config.json is a named pipe (reading it would block)."""
    (work / "m").mkdir()
    os.mkfifo(work / "m" / "config.json")
    return work / "m"


def argv(*args: str) -> Callable[[Path, Inputs], list[str]]:
    """A command with CASE standing for the case's directory."""
    return lambda w, _inputs: [a.replace("CASE", str(w)) for a in args]


def shard(name: str, data: bytes | str) -> Callable[[Path], Path]:
    return lambda w: write(w / name, data)


HEADER_PAST_END = json.dumps(
    {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
).encode()
QKV, SCALE, ZP = f"{LAYER}.weight_packed", f"{LAYER}.weight_scale", f"{LAYER}.weight_zero_point"
Q = ("--out", "CASE/q", "--json")  # quantize's output and flags
PROC = "/proc/faircalib-robustness"

# fmt: off
CHECKPOINT = [  # a copy of mdlm-tiny, damaged, given to `faircalib eval`
    ("ckpt-missing-path", argv("eval", "CASE/nope"), r"neither a shipped model"),
    ("ckpt-empty-dir", argv("eval", "CASE"), r"config\.json is missing"),
    ("ckpt-path-is-a-file", lambda w, i: evaluate(write(w / "f.bin", b"x")), r"neither a shipped model"),
    ("ckpt-pickle-weights-only", on_float(pickle_only),
     r"holds only pickled weights \(pytorch_model\.bin\), which faircalib never loads"),
    ("ckpt-config-not-json", on_float(put("config.json", "{family: mdlm")), r"config\.json is not valid JSON"),
    ("ckpt-config-not-utf8", on_float(put("config.json", b"\xff\xfe{\x00}")), r"config\.json is not valid JSON"),
    ("ckpt-config-is-array", on_float(put("config.json", "[1, 2]")), r"holds a JSON list, not an object"),
    ("ckpt-config-100MB", on_float(lambda d: os.truncate(write(d / "config.json", b" "), 100 * 2**20)),
     r"104,857,600 bytes, over the .* a JSON metadata file may be"),
    ("ckpt-config-deeply-nested", on_float(put("config.json", "[" * 200_000)), r"config\.json is not valid JSON"),
    ("ckpt-config-unknown-family", on_float(config(family="gpt5")), r"unknown model family 'gpt5'"),
    ("ckpt-config-no-family", on_float(lambda d: edit_json(d / "config.json", lambda c: c.pop("family"))),
     r"unknown model family None"),
    ("ckpt-config-wider-than-weights", on_float(config(hidden_dim=256)), r"has shape .* config\.json implies"),
    ("ckpt-config-vocab-lies", on_float(config(vocab_size=9000)), r"has shape .* config\.json implies"),
    ("ckpt-config-more-blocks", on_float(config(n_blocks=5)), r"does not match the model config: missing"),
    ("ckpt-config-fewer-blocks", on_float(config(n_blocks=3)), r"unexpected \['blocks\.3"),
    ("ckpt-config-field-is-text", on_float(config(n_heads="4")), r"n_heads must be an integer"),
    ("ckpt-config-field-negative", on_float(config(hidden_dim=-128)), r"hidden_dim must be an integer in"),
    ("ckpt-config-billion-blocks", on_float(config(n_blocks=10**9)), r"n_blocks must be an integer in"),
    ("ckpt-config-field-is-bool", on_float(config(mlp_ratio=True)), r"mlp_ratio must be an integer"),
    ("ckpt-config-heads-do-not-divide", on_float(config(n_heads=3)), r"must split into 3 heads"),
    ("ckpt-config-mask-outside-vocab", on_float(config(mask_id=9000)), r"mask_id 9000 outside"),
    ("ckpt-config-mask-not-the-tokenizers", on_float(config(mask_id=5)),
     r"has <\|mask\|> at id 1 but config\.json's mask_id is 5"),
    ("ckpt-config-unknown-field", on_float(config(rope_theta=1e4)), r"unknown MDLM config fields"),
    ("ckpt-no-weights", on_float(drop(SHARD, INDEX)), r"no model\.safetensors\.index\.json"),
    ("ckpt-index-not-json", on_float(put(INDEX, "{")), r"index\.json is not valid JSON"),
    ("ckpt-index-map-is-list", on_float(put(INDEX, '{"weight_map": ["x"]}')), r"weight_map must map"),
    ("ckpt-shard-missing", on_float(drop(SHARD)), r"listed in the index is missing"),
    ("ckpt-index-escapes-dir", on_float(escape_index), r"'\.\./other\.safetensors', outside the model directory"),
    ("ckpt-index-absolute-path", on_float(index(lambda x: x.update(weight_map={"a": "/etc/hostname"}))),
     r"'/etc/hostname', outside the model directory"),
    ("ckpt-shard-empty", on_float(put(SHARD, b"")), r"empty or truncated \(0 bytes\)"),
    ("ckpt-shard-truncated", on_float(cut(SHARD, lambda n: n // 2)), r"not a readable safetensors file"),
    ("ckpt-shard-header-cut", on_float(cut(SHARD, lambda n: 100)), r"truncated: its header claims"),
    ("ckpt-shard-random-bytes", on_float(put(SHARD, bytes(range(256)) * 16)), r"header claims .* bytes \(at most"),
    ("ckpt-header-claims-2^60", on_float(put(SHARD, struct.pack("<Q", 2**60) + b"{}")),
     r"header claims 1,152,921,504,606,846,976 bytes"),
    ("ckpt-header-not-json", on_float(lambda d: header_file(d / SHARD, b"not json at all!")),
     r"not a readable safetensors file"),
    ("ckpt-header-offsets-past-end", on_float(lambda d: header_file(d / SHARD, HEADER_PAST_END, b"\0" * 4)),
     r"not a readable safetensors file"),
    ("ckpt-tensor-int-dtype", on_float(tensor("blocks.0.attn_qkv.weight", lambda t: t.to(torch.int32))),
     r"has dtype torch\.int32, expected a float"),
    ("ckpt-tensor-transposed", on_float(tensor("blocks.0.mlp.0.weight", lambda t: t.T)),
     r"blocks\.0\.mlp\.0\.weight has shape"),
    ("ckpt-tensor-nan", on_float(tensor("blocks.1.attn_out.weight", nan_at(3))), r"contains NaN or Inf"),
    ("ckpt-tensor-inf", on_float(tensor("vocab_embed.embedding", nan_at(0, float("inf")))), r"contains NaN or Inf"),
    ("ckpt-tensor-missing", on_float(tensors(lambda t: t.pop("blocks.2.mlp.2.weight"))),
     r"missing \['blocks\.2\.mlp\.2\.weight'\]"),
    ("ckpt-tensor-extra", on_float(tensors(lambda t: t.update(extra=torch.ones(2)))), r"unexpected \['extra'\]"),
    ("ckpt-index-lists-absent-tensor", on_float(index(lambda x: x["weight_map"].update(ghost=SHARD))),
     r"absent from shards: \['ghost'\]"),
    ("ckpt-tokenizer-missing", on_float(drop("tokenizer.json")), r"has no tokenizer\.json"),
    ("ckpt-tokenizer-garbage", on_float(put("tokenizer.json", '{"model": 3}')), r"not a readable tokenizer"),
    ("ckpt-act-quant-bad-bits", on_float(bad_act_quant), r"act_bits of blocks\.0\.mlp\.0 must be an integer"),
]
PACKED = [  # a compressed-tensors copy of mdlm-tiny (RTN W4 g64), damaged
    ("packed-codes-short", on_packed(tensor(QKV, lambda t: t[:, :-1])), r"weight_packed has shape"),
    ("packed-codes-int64", on_packed(tensor(QKV, lambda t: t.long())), r"weight_packed has dtype torch\.int64"),
    ("packed-codes-float", on_packed(tensor(QKV, lambda t: t.float())), r"weight_packed has dtype torch\.float32"),
    ("packed-codes-transposed", on_packed(tensor(QKV, lambda t: t.T)), r"weight_packed has shape"),
    ("packed-scale-zero", on_packed(tensor(SCALE, nan_at(5, 0.0))), r"weight_scale has non-positive"),
    ("packed-scale-negative", on_packed(tensor(SCALE, lambda t: -t)), r"weight_scale has non-positive"),
    ("packed-scale-nan", on_packed(tensor(SCALE, nan_at(1))), r"weight_scale contains NaN"),
    ("packed-scale-int", on_packed(tensor(SCALE, lambda t: t.to(torch.int32))), r"weight_scale has dtype torch\.int32"),
    ("packed-zero-point-out-of-range", on_packed(tensor(ZP, lambda t: torch.full((384, 2), 300, dtype=torch.int32))),
     r"weight_zero_point has shape \(384, 2\)"),
    ("packed-zero-point-float", on_packed(tensor(ZP, lambda t: t.float())), r"weight_zero_point has dtype"),
    ("packed-weight-shape-lies", on_packed(tensor(f"{LAYER}.weight_shape", lambda t: torch.tensor([128, 384]))),
     r"weight_shape is \[128, 384\]"),
    ("packed-scale-missing", on_packed(tensors(lambda t: t.pop(SCALE))), r"weight_scale is missing"),
    ("packed-extra-tensor", on_packed(tensors(lambda t: t.update({f"{LAYER}.weight": torch.ones(384, 128)}))),
     r"unexpected tensors"),
    ("packed-16-bit-weights", on_packed(weights(num_bits=16)), r"not int2\.\.int8"),
    ("packed-group-does-not-divide", on_packed(weights(group_size=96)), r"group size 96 does not divide"),
    ("packed-strategy-invalid", on_packed(weights(strategy="diagonal")), r"invalid quantization_config at"),
    ("packed-targets-unknown-layer", on_packed(group(targets=["blocks.9.attn_qkv"])),
     r"targets modules the model lacks"),
    ("packed-format-unsupported", on_packed(qconfig(format="marlin-24")),
     r"format 'marlin-24' is not supported"),
    ("packed-format-mismatch", on_packed(qconfig(format="float-quantized")),
     r"format 'pack-quantized' is not supported under the config's format 'float-quantized'"),
]
ARGUMENTS = [  # refused before any model is loaded or any calibration runs
    ("arg-bits-1", argv(*QUANTIZE, "--bits", "1", *Q), r"unsupported bit width 1"),
    ("arg-bits-16", argv(*QUANTIZE, "--bits", "16", *Q), r"unsupported bit width 16"),
    ("arg-bits-not-a-number", argv(*QUANTIZE, "--bits", "four", *Q), r"invalid int value: 'four'"),
    ("arg-group-96", argv(*QUANTIZE, "--group-size", "96", *Q), r"unsupported group size 96"),
    ("arg-group-256", argv(*QUANTIZE, "--group-size", "256", *Q), r"unsupported group size 256"),
    ("arg-method-unknown", argv("quantize", "mdlm-tiny", "--method", "hqq", *Q), r"invalid choice: 'hqq'"),
    ("arg-packed-awq", argv(*QUANTIZE, "--method", "awq", "--format", "packed", *Q), r"cannot store method 'awq'"),
    ("arg-packed-smoothquant", argv(*QUANTIZE, "--method", "smoothquant", "--format", "packed", *Q),
     r"cannot store method 'smoothquant'"),
    ("arg-packed-fair-awq-base", argv(*QUANTIZE, "--method", "fair", "--fair-base", "awq", "--format", "packed", *Q),
     r"cannot store method 'awq'"),
    ("arg-recon-weighting", argv(*QUANTIZE, "--method", "recon", "--fair-weighting", "instability", *Q),
     r"recon weights every token 1"),
    ("arg-nsamples-0", argv(*QUANTIZE, "--nsamples", "0", *Q), r"at least one sample"),
    ("arg-seq-len-0", argv(*QUANTIZE, "--seq-len", "0", *Q), r"--seq-len must be at least 1"),
    ("arg-views-0", argv(*QUANTIZE, "--views", "0", *Q), r"views must be >= 1"),
    ("arg-sampler-steps-0", argv(*QUANTIZE, "--masking", "sampler", "--sampler-steps", "0", *Q),
     r"sampler_steps must be >= 1"),
    ("arg-damp-negative", argv(*QUANTIZE, "--method", "gptq", "--damp=-0.1", *Q), r"--damp must be a fraction"),
    ("arg-alpha-above-1", argv(*QUANTIZE, "--method", "smoothquant", "--bits", "8", "--alpha", "2", *Q),
     r"alpha must be in \[0, 1\]"),
    ("arg-recon-steps-negative", argv(*QUANTIZE, "--method", "recon", "--recon-steps=-1", *Q),
     r"argument --recon-steps: must be at least 0"),
    ("arg-fair-gamma-negative", argv(*QUANTIZE, "--method", "fair", "--fair-gamma=-1", *Q),
     r"gamma, floor and max_weight must be >= 0"),
    ("arg-device-missing-gpu", argv(*QUANTIZE, "--device", "cuda:99", *Q), r"--device cuda:99: "),
    ("arg-device-unknown", argv(*QUANTIZE, "--device", "gpu0", *Q), r"unknown device 'gpu0'"),
    ("arg-model-unknown", argv("quantize", "mdlm-huge", "--method", "rtn", *Q), r"neither a shipped model"),
    ("arg-out-exists", lambda w, i: [*QUANTIZE, "--out", str((w / "q").mkdir() or w / "q")],
     r"already exists \(pass --overwrite"),
    ("arg-out-is-a-file", lambda w, i: [*QUANTIZE, "--overwrite", "--out", str(write(w / "q", b"x"))],
     r"exists and is not a directory"),
    ("arg-resume-other-run", progress_of_other_run(resume=True), r"progress of a different run \(model weights"),
    ("arg-progress-without-resume", progress_of_other_run(resume=False),
     r"pass --resume to continue it or --overwrite"),
    ("arg-resume-progress-corrupt", fake_progress("{oops"), r"not a readable faircalib progress directory"),
    ("arg-resume-progress-foreign", fake_progress({"format": "other"}), r"not a faircalib progress directory"),
    ("arg-eval-batch-size-0", argv("eval", "mdlm-tiny", "--batch-size", "0"), r"--batch-size: must be at least 1"),
    ("arg-eval-limit-0", argv("eval", "mdlm-tiny", "--limit", "0"), r"--limit: must be at least 1"),
    ("arg-eval-mc-samples-0", argv("eval", "mdlm-tiny", "--mc-samples", "0"), r"--mc-samples: must be at least 1"),
    ("arg-generate-steps-0", argv("generate", "mdlm-tiny", "--steps", "0"), r"--steps: must be at least 1"),
    ("arg-generate-too-long", argv("generate", "mdlm-tiny", "--gen-length", "500", "--steps", "5"),
     r"exceeds .* sequence length 128"),
    ("arg-eval-data-all-empty", lambda w, i: ["eval", "mdlm-tiny", "--data", str(write(
        w / "e.jsonl", '{"text": ""}\n' * 5))], r"holds no text: its 5 document\(s\) are all empty"),
    ("arg-recipe-field-type", lambda w, i: ["quantize", "mdlm-tiny", "--config", str(write(
        w / "recipe.json", json.dumps({"args": {"method": "rtn", "calib": 3}}))), *Q],
     r"recipe field calib = 3 must be a string"),
    ("arg-bench-flip-past-length", argv("bench", "--model", "mdlm-tiny", "--methods", "rtn",
     "--flip-gen-length", "500", "--out", "CASE/b"), r"--flip-gen-length 500: .* passes"),
    # second audit (nineteenth session)
    ("arg-train-lr-inf", train_case(good_shard, "--lr", "inf"), r"argument --lr: must be a finite"),
    ("arg-train-eval-every-0", train_case(good_shard, "--eval-every", "0"),
     r"argument --eval-every: must be at least 1"),
    ("arg-eval-data-surrogate", lambda w, i: ["eval", "mdlm-tiny", "--data", str(write(
        w / "s.jsonl", '{"text": "cut \\ud83d emoji"}\n'))], r"line 1: its text holds U\+D83D"),
    ("arg-eval-data-zstd", lambda w, i: ["eval", "mdlm-tiny", "--data", str(write(
        w / "s.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\0" * 16))], r"zstd-compressed"),
    # third audit (twentieth session)
    ("arg-eval-data-deep-json", lambda w, i: ["eval", "mdlm-tiny", "--data", str(write(
        w / "d.jsonl", '{"text": "a"}\n' + "[" * 100_000 + "\n"))], r"line 2 nests JSON too deeply"),
    ("arg-bench-data-empty", argv("bench", "mdlm-tiny", "--methods", "rtn", "--data", ",",
     "--out", "CASE/b"), r"--data ',' names no evaluation data"),
    ("arg-generate-cfg-overflow", argv("generate", "mdlm-tiny", "--cfg-scale", "1e308"),
     r"cfg_scale 1e\+308 is past"),
    ("arg-eval-config-fifo", lambda w, i: ["eval", str(fifo_config(w))], r"config\.json is not a regular file"),
    # fourth audit (twenty-first session)
    ("arg-eval-data-huge-integer", lambda w, i: ["eval", "mdlm-tiny", "--data", str(write(
        w / "b.jsonl", '{"text": "abc", "id": ' + "1" * 5000 + "}\n"))], r"line 1: Exceeds the limit"),
    ("arg-eval-data-csv-short-row", lambda w, i: ["eval", "mdlm-tiny", "--data", str(write(
        w / "s.csv", "id,text\n1\n"))], r"row 1 has 1 fields where the header has 2"),
    ("arg-eval-data-csv-open-quote", lambda w, i: ["eval", "mdlm-tiny", "--data", str(write(
        w / "q.csv", 'id,text\n1,"Hello," she said.\n'))], r"line 2: ',' expected after"),
    ("arg-bench-task-surrogate", lambda w, i: ["bench", "mdlm-tiny", "--methods", "rtn", "--task", str(write(
        w / "t.jsonl", '{"context": "cut \\ud83d", "choices": [" a", " b"], "answer": 0}\n')),
        "--out", str(w / "b")], r"line 1: its text holds U\+D83D"),
    ("arg-bench-task-choice-too-long", lambda w, i: ["bench", "mdlm-tiny", "--methods", "rtn", "--task", str(write(
        w / "t.jsonl", json.dumps({"context": "a", "choices": [" word" * 400, " b"], "answer": 0}) + "\n")),
        "--out", str(w / "b")], r"line 1: choice 0 has \d+ tokens, more than the model's length 128"),
]
OUTPUT = [  # outputs that cannot be written (the mounted ones need root)
    ("out-under-proc", argv(*QUANTIZE, "--out", f"{PROC}/q"), rf"cannot write {PROC}/q"),
    ("out-read-only-mount", argv(*QUANTIZE, "--out", "CASE/mnt/q", "--json"), r"cannot write .*Read-only file system"),
    ("out-disk-full", argv(*QUANTIZE, "--out", "CASE/mnt/q", "--json"), r"cannot write .*No space left on device"),
    ("out-train-under-proc", train_case(good_shard, out=f"{PROC}/t"), rf"cannot write {PROC}/t"),
    ("out-bench-under-proc", argv("bench", "--model", "mdlm-tiny", "--out", f"{PROC}/b"), rf"cannot write {PROC}/b"),
    # fourth audit: train used to replace --out whatever it held, its own corpus included
    ("out-train-holds-its-corpus", train_case(lambda w: good_shard(w / "data"), "--overwrite", out="CASE/data"),
     r"would replace the input .*c\.jsonl"),
]
DATA = [  # training shards as users bring them (`faircalib train --corpus`)
    ("data-empty-file", train_case(shard("c.jsonl", b"")), r"holds no text"),
    ("data-not-utf8", train_case(shard("c.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))), r"line 1 is not UTF-8"),
    ("data-binary", train_case(shard("c.jsonl", bytes(range(256)) * 64)), r"line 1 is not (UTF-8|JSON)"),
    ("data-plain-text", train_case(shard("c.jsonl", "Just some prose.\nMore.\n")), r"line 1 is not JSON"),
    ("data-no-text-field", train_case(shard("c.jsonl", '{"content": "x"}\n')), r"no string \"text\" field"),
    ("data-shorter-than-a-sequence", train_case(shard("c.jsonl", '{"text": "hello world"}\n')),
     r"tokens; training needs more than"),
    ("data-one-enormous-line", train_case(shard("c.jsonl", "x" * (16 * 2**20 + 10))),
     r"line 1 is over 16,777,216 characters"),
    ("data-missing-file", train_case(lambda w: w / "absent.jsonl"), r"cannot read training shard"),
    ("data-gzip-corrupt", train_case(shard("c.jsonl.gz", b"\x1f\x8b" + bytes(range(64)))),
     r"cannot read training shard"),
    ("data-gzip-truncated", train_case(shard("c.jsonl.gz", gzip.compress(b'{"text": "abc"}\n' * 999)[:40])),
     r"cannot read training shard"),
    ("data-xz-corrupt", train_case(shard("c.jsonl.xz", bytes(range(64)))), r"cannot read training shard"),
    ("data-tokenizer-garbage", train_case(good_shard, tokenizer=shard("tok.json", "not json")),
     r"not a readable tokenizer\.json"),
    ("data-tokenizer-without-eos", train_case(good_shard, tokenizer=no_eos_tokenizer), r"has no <\|endoftext\|> token"),
    ("data-token-cache-pickle", train_case(pickled_token_cache, "--token-cache", "CASE/tokens.npy"),
     r"not a plain \.npy array"),
]
# fmt: on
MOUNTS = {"out-read-only-mount": "ro", "out-disk-full": "full"}
NOTES = {
    "ckpt-pickle-weights-only": "a pickle is never read",
    "packed-zero-point-out-of-range": "zero points 300 stored unpacked; packed 4-bit fields cannot leave [-8, 7]",
    "out-disk-full": "1 MiB tmpfs: the progress directory fits, the 12 MB model does not",
}
CASES = [
    Case(name, group, build, expect, MOUNTS.get(name), NOTES.get(name, ""))
    for group, table in (
        ("checkpoint", CHECKPOINT),
        ("packed", PACKED),
        ("arguments", ARGUMENTS),
        ("output", OUTPUT),
        ("data", DATA),
    )
    for name, build, expect in table
]
FUZZ = ("fuzz-config-json", "fuzz-safetensors-header")


# --- running and judging -------------------------------------------------------------------------
def run_inprocess(argv: list[str]) -> tuple[object, str]:
    """(exit status, stderr) of `faircalib ARGV` in this process; an escaping exception is
    recorded as status 'traceback' with the traceback as stderr."""
    from faircalib.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            status: object = main(argv)
        except SystemExit as exc:  # argparse
            status = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            status = "traceback"
            err.write(traceback.format_exc())
    return status, err.getvalue()


def run_subprocess(argv: list[str], timeout: float = 600) -> tuple[object, str]:
    """(exit status, stderr) of `python -m faircalib.cli ARGV` as its own process."""
    # one thread: the cases are tiny, and on a shared machine threads only contend
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "faircalib.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    return done.returncode, done.stderr


def model_like_dirs(root: Path, before: set[Path]) -> list[str]:
    """Directories under `root`, created by the command, that hold a config.json."""
    found = []
    for config in root.rglob("config.json"):
        if config.parent not in before and config.parent != root:
            found.append(str(config.parent.relative_to(root)))
    return found


def judge(case: Case, status: object, stderr: str, leftovers: list[str]) -> list[str]:
    """What is wrong with an outcome (empty: the case passes)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    problems = []
    if status == 0:
        problems.append("exit status 0")
    if status == "traceback" or "Traceback (most recent call last)" in stderr:
        problems.append("Python traceback")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr")
    if not re.search(case.expect, line, re.IGNORECASE):
        problems.append(f"message does not match /{case.expect}/")
    if not ADVICE.search(line):
        problems.append("message does not say what to do")
    if leftovers:
        problems.append(f"left model-like directories {leftovers}")
    return problems


def run_case(case: Case, inputs: Inputs, work: Path, inprocess: bool = True) -> dict:
    """Build, run and judge one case in the empty directory `work`."""
    work.mkdir(parents=True, exist_ok=True)
    argv = case.build(work, inputs)
    before = {p.parent for p in work.rglob("config.json")}
    start = time.time()
    mount = mounted(case.mount, work / "mnt") if case.mount else contextlib.nullcontext()
    with mount:
        status, stderr = run_inprocess(argv) if inprocess else run_subprocess(argv)
        leftovers = model_like_dirs(work, before)  # inside the mount, before it goes away
    problems = judge(case, status, stderr, leftovers)
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {
        "case": case.name,
        "group": case.group,
        "command": "faircalib " + " ".join(_placeholder(a, work, inputs) for a in argv),
        "exit_status": status,
        "message": _placeholder(lines[-1], work, inputs) if lines else "",
        "outcome": "fail" if problems else "pass",
        "problems": problems,
        "seconds": round(time.time() - start, 3),
        "notes": case.notes,
    }


def _placeholder(text: str, work: Path, inputs: Inputs) -> str:
    """Paths of this run's temporary directories as readable placeholders."""
    for path, label in ((work, "CASE"), (inputs.root, "INPUTS"), (TINY, "MDLM_TINY")):
        text = text.replace(str(path), label)
    return text


def skipped(case: Case, reason: str) -> dict:
    return {
        "case": case.name,
        "group": case.group,
        "command": "",
        "exit_status": None,
        "message": "",
        "outcome": "skipped",
        "problems": [reason],
        "seconds": 0.0,
        "notes": case.notes,
    }


# --- fuzzing (hypothesis) -----------------------------------------------------------------------
def fuzz_outcome(fn: Callable[[], None]) -> str | None:
    """None if `fn` loads or raises one single-line FairCalibError, else what went wrong."""
    from faircalib.errors import FairCalibError

    try:
        fn()
    except FairCalibError as exc:
        if "\n" in str(exc):
            return f"multi-line message: {str(exc)[:200]!r}"
    except Exception as exc:  # anything else would reach the user as a traceback
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def json_values():
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=8,
    )


def fuzz_config(root: Path, examples: int) -> dict:
    """config.json of a small MDLM with fields replaced, removed or added at random."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from faircalib.models import save_model
    from faircalib.models.mdlm import MDLM, MDLMConfig

    directory = root / "fuzz-config"  # a small model: a config that passes loads in milliseconds
    small = MDLMConfig(32, 1, seq_len=8, hidden_dim=16, cond_dim=4, n_blocks=1, n_heads=2)
    save_model(MDLM(small), directory, overwrite=True)
    base = json.loads((directory / "config.json").read_text())
    failures: list[str] = []
    keys = st.sampled_from([*base, "model_type", "quantization_config", "extra"])
    packed = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    values = json_values() | st.just(packed) | st.just({**packed, "config_groups": []})

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.dictionaries(keys, values, max_size=4),
        st.lists(st.sampled_from(list(base)), max_size=2),
    )
    def check(changes: dict, removed: list[str]) -> None:
        config = {k: v for k, v in base.items() if k not in removed}
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))
        problem = fuzz_outcome(lambda: hub.load(directory))  # float, fake-quant or packed
        if problem:
            failures.append(f"{json.dumps(config)[:200]} -> {problem}")

    start = time.time()
    check()
    return _fuzz_row(
        "fuzz-config-json",
        examples,
        failures,
        start,
        "config.json of a small MDLM, fields replaced/removed/added",
    )


def fuzz_header(root: Path, examples: int) -> dict:
    """A safetensors file with a generated header (valid length prefix) and a few data bytes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from faircalib.models.io import read_safetensors

    path = root / "fuzz-header" / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    dtypes = st.sampled_from(
        ["F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F64", "F8_E4M3", "X9"]
    )
    entry = st.fixed_dictionaries(
        {
            "dtype": dtypes | st.text(max_size=4),
            "shape": st.lists(st.integers(min_value=-2, max_value=2**62), max_size=3),
            "data_offsets": st.lists(
                st.integers(min_value=-2, max_value=2**62), min_size=0, max_size=3
            ),
        }
    )
    headers = st.one_of(
        st.dictionaries(st.text(max_size=6), entry | json_values(), max_size=3).map(
            lambda h: json.dumps(h).encode()
        ),
        st.binary(max_size=64),
    )

    failures: list[str] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(headers, st.binary(max_size=32), st.booleans())
    def check(header: bytes, payload: bytes, lie_about_length: bool) -> None:
        prefix = struct.pack("<Q", len(header) + (2**40 if lie_about_length else 0))
        path.write_bytes(prefix + header + payload)
        problem = fuzz_outcome(lambda: read_safetensors(path))
        if problem:
            failures.append(f"{header[:120]!r} -> {problem}")

    start = time.time()
    check()
    return _fuzz_row(
        "fuzz-safetensors-header",
        examples,
        failures,
        start,
        "header JSON or bytes, length prefix true or 2^40 too long",
    )


def _fuzz_row(name: str, examples: int, failures: list[str], start: float, what: str) -> dict:
    return {
        "case": name,
        "group": "fuzz",
        "command": f"hypothesis, {examples} examples: {what}",
        "exit_status": None,
        "message": f"{examples - len(failures)} of {examples} examples loaded or gave one FairCalibError line",
        "outcome": "fail" if failures else "pass",
        "problems": failures[:10],
        "seconds": round(time.time() - start, 3),
        "notes": "",
    }


# --- the benchmark ------------------------------------------------------------------------------
def run_all(root: Path, inprocess: bool, names: list[str] | None, examples: int) -> list[dict]:
    inputs = Inputs.build(root / "inputs")
    no_mount = mount_unavailable()
    rows = []
    for case in CASES:
        if names and case.name not in names:
            continue
        if case.mount and no_mount:
            rows.append(skipped(case, f"skipped: {no_mount}"))
        else:
            rows.append(run_case(case, inputs, root / "cases" / case.name, inprocess))
        print(f"[robustness] {rows[-1]['outcome']:7} {case.name}", file=sys.stderr, flush=True)
    if not names or "fuzz-config-json" in names:
        rows.append(fuzz_config(root, examples))
    if not names or "fuzz-safetensors-header" in names:
        rows.append(fuzz_header(root, examples))
    return rows


def markdown(result: dict) -> str:
    rows = result["rows"]
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("pass", "fail", "skipped")}
    lines = [
        "# Robustness: malformed input, unwritable outputs, fuzzed headers",
        "",
        *record_lines(result["record"]),
        "",
        f"{len(rows)} cases: {counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} "
        f"skipped. Mode: {result['mode']}. A case passes when the command exits non-zero "
        "with one line on stderr that names the problem (the case's pattern) and says what to "
        "do, prints no traceback, and leaves no new directory holding a config.json. CASE is "
        "the case's own directory, INPUTS a float and a packed copy of mdlm-tiny.",
        "",
        "| case | group | outcome | exit | message (stderr) |",
        "|---|---|---|---:|---|",
    ]
    for r in rows:
        message = r["message"] if r["outcome"] != "skipped" else r["problems"][0]
        if r["outcome"] == "fail":
            message += " **[" + "; ".join(r["problems"])[:300] + "]**"
        message = message.replace("|", "\\|")
        status = "-" if r["exit_status"] is None else r["exit_status"]
        lines.append(f"| {r['case']} | {r['group']} | {r['outcome']} | {status} | {message} |")
    lines += ["", "Commands:", ""]
    lines += [f"- {r['case']}: `{r['command']}`" for r in rows if r["command"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--inprocess", action="store_true", help="run cases through cli.main here")
    p.add_argument("--cases", help="comma list of case names (default: all)")
    p.add_argument("--examples", type=int, default=500, help="hypothesis examples per fuzz case")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny cases: threads would only contend
    names = args.cases.split(",") if args.cases else None
    unknown = set(names or []) - {c.name for c in CASES} - set(FUZZ)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="faircalib-robustness-") as tmp:
        rows = run_all(Path(tmp), args.inprocess, names, args.examples)
    result = {
        "record": run_record(
            ["python", "benchmarks/robustness.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "mode": "in-process (cli.main)" if args.inprocess else "one process per case",
        "rows": rows,
        "summary": {k: sum(r["outcome"] == k for r in rows) for k in ("pass", "fail", "skipped")},
    }
    out = Path(args.out)
    atomic.check_writable_dir(out)
    atomic.write_json(out / "robustness.json", result, **atomic.COMPACT)
    atomic.write_text(out / "robustness.md", markdown(result))
    print(json.dumps(result["summary"]))
    return result


if __name__ == "__main__":
    main()
