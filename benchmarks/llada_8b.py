"""8B scale on one GPU: a random LLaDA-8B- (or Dream-7B-) shaped checkpoint in the published
layout, quantized with `faircalib quantize ... --offload` at W4 g128 on 128 x 2048 calibration
tokens, then one denoising step of the packed result timed against bf16.

    python benchmarks/llada_8b.py --family llada --method gptq --out benchmarks/results/llada-8b-shape
    python benchmarks/llada_8b.py --smoke --out /tmp/llada-smoke      # CPU, a tiny model, ~1 min

Each call adds (or replaces) one (family, method) row of OUT/llada_8b.json and rewrites
OUT/llada_8b.md, so the table is assembled across device leases. The checkpoint is written once
into --work and reused while the machine stays warm. Measured per row: quantize wall time (the
CLI, loading and writing included), peak GPU memory (torch's allocator, from the run's
quantization.json) and peak host memory (the CLI process), source and packed bytes, and the time
of one denoising step (batch 1, the calibration length) of the packed model vs the bf16 model,
side by side in this process. Targets (issue 13): at most 15 minutes and 24 GiB of GPU memory.
Weights are random (no checkpoint can be fetched here): quality is not measured, cost is.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from faircalib import atomic, hub
from faircalib.bench import run_record
from faircalib.models.io import probe_model

GIB = 2**30
TARGET_MINUTES, TARGET_GIB = 15.0, 24.0

# The published config.json fields (GSAI-ML/LLaDA-8B-Base, Dream-org/Dream-v0-Base-7B); see
# docs/models.md for where each comes from.
LLADA_8B = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}
DREAM_7B = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_dream.DreamConfig",
        "AutoModel": "modeling_dream.DreamModel",
    },
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
SHAPES = {"llada": (LLADA_8B, "<|mdm_mask|>"), "dream": (DREAM_7B, "<|mask|>")}
SMOKE_SIZES = {  # the same layouts, tiny: every code path on a CPU
    "llada": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 256,
              "embedding_size": 1024, "vocab_size": 1024, "mask_token_id": 1000,
              "eos_token_id": 999, "pad_token_id": 999},
    "dream": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 1024,
              "mask_token_id": 1000, "eos_token_id": 999, "bos_token_id": 999,
              "pad_token_id": 999},
}  # fmt: skip
SHARD_BYTES = 4 * GIB
EOS = "<|endoftext|>"  # the toolkit's document separator (faircalib.data.tokenizers.EOS)


def stand_in_tokenizer(vocab: int, eos_id: int, mask_id: int, mask_token: str) -> Tokenizer:
    """Byte-level stand-in with the published vocabulary size and special-token ids (the real
    tokenizer files cannot be fetched here): bytes are ids 0-255, reserved fillers the rest."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    table = {c: i for i, c in enumerate(alphabet)}
    special = {eos_id: EOS, mask_id: mask_token}
    for i in range(len(table), vocab):
        table[special.get(i, f"<|reserved_{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=table, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, mask_token])
    return tok


def write_random_checkpoint(directory: Path, config: dict, mask_token: str, device: str) -> Path:
    """config.json, bf16 safetensors shards + index and tokenizer.json; names and shapes are
    those of the family's loader (tested against upstream's names in tests/llama_like_ckpt.py).
    Matrices ~ N(0, 0.02^2) (the published init_std), norms 1. Written once, then reused; jobs
    started side by side (one per GPU) wait for the one that writes it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (directory / "config.json").is_file():
            _write_checkpoint(directory, config, mask_token, device)
    return directory


@torch.no_grad()
def _write_checkpoint(directory: Path, config: dict, mask_token: str, device: str) -> None:
    if directory.exists():  # a writer killed after its rename: config.json is written last
        shutil.rmtree(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
    tmp.mkdir(parents=True)
    shapes = {k: tuple(v.shape) for k, v in probe_model(config).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape in shapes.items():
        if len(shape) == 1:  # RMSNorm weights
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (0.02 * torch.randn(shape, generator=gen, device=device)).bfloat16().cpu()
        shard[name] = tensor
        size += tensor.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = index  # rename to the published model-0000i-of-0000n pattern
    renamed = {}
    for i in range(1, total + 1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (tmp / f"model-{i:05d}.safetensors").rename(tmp / final)
        renamed[f"model-{i:05d}.safetensors"] = final
    weight_map = {k: renamed[v] for k, v in weight_map.items()}
    index_json = {"metadata": {"total_size": 2 * sum(_numel(s) for s in shapes.values())},
                  "weight_map": weight_map}  # fmt: skip
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    vocab = config.get("embedding_size") or config["vocab_size"]
    tok = stand_in_tokenizer(vocab, config["eos_token_id"], config["mask_token_id"], mask_token)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(directory)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def quantize(ckpt: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run the CLI as a user would; wall time, peaks and the run's record."""
    cmd = [sys.executable, "-m", "faircalib.cli", "quantize", str(ckpt), "--method", args.method,
           "--bits", "4", "--group-size", str(args.group_size), "--nsamples", str(args.nsamples),
           "--seq-len", str(args.seq_len), "--offload", "--device", args.device,
           "--calib-dtype", "bfloat16", "--format", "packed", "--out", str(out), "--overwrite"]  # fmt: skip
    if args.max_device_gib:
        cmd += ["--max-device-gib", str(args.max_device_gib)]
    if args.quantize_head:
        cmd += ["--quantize-head", args.quantize_head]
    cmd += args.extra
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    tick = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - tick
    # the largest of this process's waited-for children: the one quantize run of a GPU job
    # (a process that runs several reports the largest so far)
    host_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    report = json.loads((out / "quantization.json").read_text())
    return {"command": " ".join(["faircalib", *cmd[3:]]), "wall_s": wall,
            "peak_host_bytes": host_peak, "report": report}  # fmt: skip


@torch.no_grad()
def step_time(directory: Path, device: str, seq_len: int, mask_id: int, reps: int) -> dict:
    """Median seconds of one denoising step (log-probs of a [1, seq_len] canvas, half masked)
    and the peak device memory of loading + stepping."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = hub.load(directory, device=device, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, seq_len), generator=gen)
    x[:, seq_len // 2 :] = mask_id
    x, t = x.to(device), torch.full((1,), 0.5, device=device)
    times = []
    for i in range(reps + 2):  # two warm-up steps (kernel selection, autotuning)
        sync(device)
        tick = time.perf_counter()
        model.log_probs(x, t)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    del model
    return {"step_s": statistics.median(times), "peak_device_bytes": int(peak)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=sorted(SHAPES), default="llada")
    p.add_argument("--method", default="gptq", help="any quantize --method (gptq, fair, ...)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--max-device-gib", type=float, default=TARGET_GIB,
                   help="passed to quantize: the 24 GB GPU the target is about")  # fmt: skip
    p.add_argument("--step-reps", type=int, default=10)
    p.add_argument("--work", default="/root/work", help="where checkpoints are written")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, few samples")
    p.add_argument("--quantize-head", choices=["int8", "int4"],
                   help="also quantize the embedding and output layer (row: METHOD+head-MODE)")  # fmt: skip
    p.add_argument("--label", help="the row's method name (default: METHOD[+head-MODE]); "
                   "name rows that pass extra quantize flags")  # fmt: skip
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only merge the rows of these llada_8b.json files into OUT")  # fmt: skip
    p.add_argument("extra", nargs="*", help="more quantize flags, after --")
    args = p.parse_args(argv)
    if args.merge:
        return merge(Path(args.out), args.merge)
    record = run_record(argv if argv is not None else sys.argv[1:])
    config, mask_token = SHAPES[args.family]
    if args.smoke:
        config = {**config, **SMOKE_SIZES[args.family]}
        args.nsamples, args.seq_len, args.group_size, args.step_reps = 4, 64, 32, 2
        args.device, args.max_device_gib = "cpu", None
    work = Path(args.work) / f"{args.family}{'-smoke' if args.smoke else ''}"
    tick = time.time()
    ckpt = write_random_checkpoint(work / "bf16", config, mask_token, args.device)
    write_s = time.time() - tick
    method = args.label or args.method + (
        f"+head-{args.quantize_head}" if args.quantize_head else ""
    )
    run = quantize(ckpt, work / f"w4-{method}", args)
    res = run["report"].get("resources", {})
    steps = {
        name: step_time(d, args.device, args.seq_len, config["mask_token_id"], args.step_reps)
        for name, d in (("bf16", ckpt), ("packed", work / f"w4-{method}"))
    }
    row = {
        "family": args.family,
        "method": method,
        "smoke": args.smoke,
        "params": sum(_numel(v.shape) for v in probe_model(config).state_dict().values()),
        "quantize_command": run["command"],
        "wall_s": run["wall_s"],
        "peak_device_bytes": res.get("peak_device_bytes", 0),
        "peak_host_bytes": run["peak_host_bytes"],
        "timings": run["report"].get("timings", {}),
        "fair": run["report"].get("calib", {}).get("fair", {}),
        "bf16_bytes": dir_bytes(ckpt),
        "packed_bytes": dir_bytes(work / f"w4-{method}"),
        "step_s": {k: v["step_s"] for k, v in steps.items()},
        "step_peak_device_bytes": {k: v["peak_device_bytes"] for k, v in steps.items()},
        "checkpoint_write_s": write_s,
        "record": record,
    }
    return write_rows(Path(args.out), [row])


def row_key(row: dict) -> tuple:
    return row["family"], row["method"], row["smoke"]


def write_rows(out: Path, new_rows: list[dict]) -> dict:
    """Add `new_rows` to OUT/llada_8b.json (a row of the same family, method and smoke flag is
    replaced) and rewrite OUT/llada_8b.md."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "llada_8b.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    fresh = {row_key(r) for r in new_rows}
    result = {
        "targets": {"minutes": TARGET_MINUTES, "device_gib": TARGET_GIB},
        "rows": [*(r for r in rows if row_key(r) not in fresh), *new_rows],
    }
    atomic.write_text(path, json.dumps(result, indent=2) + "\n")
    atomic.write_text(out / "llada_8b.md", markdown(result))
    print(markdown(result))
    return result


def merge(out: Path, files: list[str]) -> dict:
    """Rows of jobs that ran side by side (one JSON each, e.g. one per GPU) into OUT's table;
    later files win."""
    rows: dict[tuple, dict] = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["rows"]:
            rows[row_key(r)] = r
    return write_rows(out, list(rows.values()))


def markdown(result: dict) -> str:
    lines = [
        "# 8B-shaped dLLMs on one GPU (random weights, published layouts)",
        "",
        "W4 g128 packed, 128 x 2048 calibration tokens, `--offload --calib-dtype bfloat16 "
        f"--max-device-gib {TARGET_GIB:g}`. Targets: at most {TARGET_MINUTES:g} min and "
        f"{TARGET_GIB:g} GiB of GPU memory per run. Step: one denoising step, batch 1, the "
        "calibration length, median; packed vs bf16 measured side by side in one process.",
        "",
        "| model | method | params | quantize min | peak GPU GiB | peak host GiB | bf16 GB | "
        "packed GB | ratio | bf16 step ms | packed step ms | speed vs bf16 | targets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        minutes, gpu = r["wall_s"] / 60, r["peak_device_bytes"] / GIB
        met = minutes <= TARGET_MINUTES and gpu <= TARGET_GIB
        lines.append(
            f"| {r['family']}{' (smoke)' if r['smoke'] else ''} | {r['method']} | "
            f"{r['params'] / 1e9:.2f} B | {minutes:.1f} | {gpu:.1f} | "
            f"{r['peak_host_bytes'] / GIB:.1f} | {r['bf16_bytes'] / 1e9:.2f} | "
            f"{r['packed_bytes'] / 1e9:.2f} | {r['packed_bytes'] / r['bf16_bytes']:.2f}x | "
            f"{1e3 * r['step_s']['bf16']:.1f} | {1e3 * r['step_s']['packed']:.1f} | "
            f"{r['step_s']['bf16'] / r['step_s']['packed']:.2f}x | {'met' if met else 'missed'} |"
        )
    lines += ["", "Per row (commit, device, date):", ""]
    for r in result["rows"]:
        rec = r["record"]
        lines.append(f"- {r['family']} {r['method']}: `{rec['git_commit'][:10]}`, "
                     f"{rec['device']}, {rec['date']}; `{r['quantize_command']}`")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
