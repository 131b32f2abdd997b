"""Data-parallel calibration and evaluation: time and scaling efficiency at 1, 2 and 4 GPUs.

    python benchmarks/distributed.py --out benchmarks/results/distributed   # GPUs (1, 2, 4 ranks)
    python benchmarks/distributed.py --smoke --out /tmp/distributed          # CPU, gloo, seconds

Model: a random LLaDA with LLaDA-8B's shapes (d_model 4096, 32 heads, MLP 12288, vocabulary
126,464, untied output layer), `--blocks` of its 32 blocks (default 4; the time per block
extrapolates to 32). Calibration: GPTQ W4 g128 (act_order) on 128 random sequences x 512 tokens
masked at stratified t, with offloading (each rank keeps the model on the CPU and one block on
its GPU) - the setting of DESIGN.md's 13.6 s per block. Evaluation: the likelihood bound of 64
random sequences x 512 tokens, model on the GPU.

For each world size W (those of --worlds that the machine has GPUs for) the script starts W
ranks through torch.multiprocessing (W = 1 runs in the script's own process; NCCL on GPUs,
gloo with --smoke; NCCL's environment is inherited untouched); each builds the same random
model from one seed and runs the engine as `torchrun --nproc-per-node W -m faircalib.cli
quantize ...` does (faircalib.distributed). A warm-up calibration of a tiny model runs first
on every rank (library loading, NCCL set-up). Recorded per W: calibration wall time (model
already built; rank 0, between two barriers), the engine's stage times, seconds per block,
speed-up and scaling efficiency T1 / (W * TW), peak GPU memory and peak host memory per rank,
whether the quantized codes and weights equal the 1-rank run's (sha256 over every layer), and
the bound's time and value. Writes distributed.json and distributed.md into --out with the
command, commit, device and date (faircalib.bench.run_record).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from faircalib.bench import record_lines, run_record
from faircalib.calib import masked_inputs, quantize_model
from faircalib.calib.engine import quant_results
from faircalib.config import CalibConfig, GPTQConfig
from faircalib.eval import likelihood_bound
from faircalib.models.llada import LLaDA

METHOD = GPTQConfig(bits=4, group_size=128)


@dataclass
class Shape:
    hidden: int = 4096
    heads: int = 32
    mlp: int = 12288
    vocab: int = 126464
    blocks: int = 4
    full_blocks: int = 32  # LLaDA-8B's depth, for the extrapolation
    seq_len: int = 512
    nsamples: int = 128
    eval_sequences: int = 64


SMOKE = Shape(
    hidden=128, heads=4, mlp=256, vocab=512, blocks=2, seq_len=32, nsamples=40, eval_sequences=16
)


def llada_config(shape: Shape) -> dict:
    """config.json of a LLaDA with `shape` (the fields faircalib's LLaDA loader reads)."""
    return {
        "model_type": "llada",
        "block_type": "llama",
        "activation_type": "silu",
        "layer_norm_type": "rms",
        "rope": True,
        "d_model": shape.hidden,
        "n_heads": shape.heads,
        "n_kv_heads": shape.heads,
        "n_layers": shape.blocks,
        "mlp_hidden_size": shape.mlp,
        "vocab_size": shape.vocab,
        "embedding_size": shape.vocab,
        "mask_token_id": shape.vocab - 1,
        "max_sequence_length": shape.seq_len,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "weight_tying": False,
    }


def build_model(shape: Shape, seed: int = 0) -> LLaDA:
    """The same random LLaDA on the CPU in every process (PyTorch's default initialisation)."""
    torch.manual_seed(seed)
    return LLaDA.from_config(llada_config(shape)).eval()


def digest(model: torch.nn.Module) -> str:
    """sha256 over every quantized layer's codes and weights, in module order."""
    h = hashlib.sha256()
    for name, result in sorted(quant_results(model).items()):
        h.update(name.encode())
        for t in (result.codes, result.weight):
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibrate(shape: Shape, device: torch.device, seed: int = 0) -> tuple[LLaDA, dict]:
    """GPTQ of the random model, one block per rank on `device`; returns it and the timings."""
    model = build_model(shape, seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab - 1, (shape.nsamples, shape.seq_len), generator=gen)
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=shape.nsamples))
    calib = CalibConfig(n_samples=shape.nsamples, device=str(device), offload=True)
    sync(device)
    start = time.perf_counter()
    report = quantize_model(model, METHOD, x_t, t, calib_cfg=calib, progress=False)
    sync(device)
    return model, {"calib_s": time.perf_counter() - start, "timings": report.timings}


def evaluate(model: LLaDA, shape: Shape, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, shape.vocab - 1, (shape.eval_sequences, shape.seq_len), generator=gen)
    model.to(device)
    sync(device)
    start = time.perf_counter()
    bound = likelihood_bound(model, seqs, seqs.numel() * 4, batch_size=8, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    model.to("cpu")
    return {"eval_s": seconds, "nll_per_token": bound.nll_per_token}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def rank_main(rank: int, world: int, port: int, shape: Shape, smoke: bool, tmp: str) -> None:
    """One rank of a W-rank run: warm up, calibrate, evaluate, and (rank 0) write the row."""
    cuda = not smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if cuda else 1)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    calibrate(replace(SMOKE, blocks=1), device)  # warm-up: libraries, kernels, communicators
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model, calib = calibrate(shape, device)
    row = {**calib, **evaluate(model, shape, device), "digest": digest(model)}
    row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
    row["peak_host_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        (Path(tmp) / f"world{world}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()
    del model
    if cuda:
        torch.cuda.empty_cache()  # the 1-rank run is in the main process: free its GPU memory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, shape: Shape, smoke: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, free_port(), shape, smoke, tmp)
        if world == 1:  # one rank needs no second process (saves a start-up of torch)
            rank_main(0, *args)
        else:
            mp.spawn(rank_main, args=args, nprocs=world)
        ranks = json.loads((Path(tmp) / f"world{world}.json").read_text())
    lead = ranks[0]
    # per block: without the once-per-run parts (the stem, and the stem and head going back to
    # the host at the end: `home_s`, absent from records before it was timed)
    once = lead["timings"]["stem_s"] + lead["timings"].get("home_s", 0.0)
    per_block = (lead["calib_s"] - once) / shape.blocks
    return {
        "world": world,
        "calib_s": lead["calib_s"],
        "timings": lead["timings"],
        "seconds_per_block": per_block,
        "extrapolated_full_model_s": once + per_block * shape.full_blocks,
        "eval_s": lead["eval_s"],
        "nll_per_token": lead["nll_per_token"],
        "digest": lead["digest"],
        "ranks_agree": len({r["digest"] for r in ranks}) == 1,
        "peak_gpu_bytes": [r["peak_gpu_bytes"] for r in ranks],
        "peak_host_bytes": [r["peak_host_bytes"] for r in ranks],
    }


def add_scaling(rows: list[dict]) -> None:
    """Speed-up and efficiency T1 / (W * TW) against the 1-rank row, for calibration and eval."""
    base = next(r for r in rows if r["world"] == 1)
    for r in rows:
        for key in ("calib_s", "eval_s"):
            r[f"{key[:-2]}_speedup"] = base[key] / r[key]
            r[f"{key[:-2]}_efficiency"] = base[key] / (r["world"] * r[key])
        r["identical_to_1_rank"] = r["digest"] == base["digest"]
        r["bound_identical_to_1_rank"] = r["nll_per_token"] == base["nll_per_token"]


def stages(tm: dict) -> str:
    """Rank 0's stage times, each measured after the device's queued work (calib.engine's
    stage_clock); `offload_s`: the blocks' moves to the GPU and back; `home_s`: the stem and head
    back to the host at the end."""
    keys = ("stem_s", "stats_s", "quantize_s", "propagate_s", "offload_s", "home_s")
    return " / ".join("-" if k not in tm else f"{tm[k]:.1f}" for k in keys)


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"# Data-parallel calibration and evaluation ({result['record']['device']})",
        "",
        *record_lines(result["record"]),
        "",
        f"Random LLaDA, d_model {s['hidden']}, {s['heads']} heads, MLP {s['mlp']}, vocabulary "
        f"{s['vocab']:,}, {s['blocks']} of {s['full_blocks']} blocks. Calibration: {result['method']} "
        f"on {s['nsamples']} x {s['seq_len']} tokens, offloading (one block per rank on its "
        f"device). Evaluation: likelihood bound of {s['eval_sequences']} x {s['seq_len']} tokens.",
        "",
        "| ranks | calibration (s) | per block (s) | stem / stats / quantize / propagate / block "
        "moves / stem and head home (s) | speed-up | "
        "efficiency | full depth (s, extrapolated) | eval (s) | eval efficiency | same codes as 1 "
        "rank | peak GPU GiB per rank | peak host GiB per rank |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in result["rows"]:
        tm = r["timings"]
        gpu = max((b for b in r["peak_gpu_bytes"] if b is not None), default=None)
        lines.append(
            f"| {r['world']} | {r['calib_s']:.1f} | {r['seconds_per_block']:.2f} | "
            f"{stages(tm)} | "
            f"{r['calib_speedup']:.2f}x | {r['calib_efficiency']:.0%} | "
            f"{r['extrapolated_full_model_s']:.0f} | {r['eval_s']:.2f} | "
            f"{r['eval_efficiency']:.0%} | {'yes' if r['identical_to_1_rank'] else 'NO'} | "
            f"{gib(gpu)} | {gib(max(r['peak_host_bytes']))} |"
        )
    lines += ["", f"Bound identical on every world size: {result['checks']['bound_identical']}."]
    if result["skipped_worlds"]:
        lines.append(f"Not run (not enough devices): {result['skipped_worlds']} ranks.")
    if result["smoke"]:
        lines += ["", "CPU run (--smoke, gloo): the code path only; no timing is meaningful."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for distributed.json / distributed.md")
    p.add_argument("--smoke", action="store_true", help="tiny shape, CPU ranks on gloo (a test)")
    p.add_argument("--worlds", default=None, help="comma list of rank counts (1,2,4; smoke 1,2)")
    p.add_argument("--blocks", type=int, help="blocks of the model (default 4; smoke 2)")
    p.add_argument("--nsamples", type=int, help="calibration sequences (default 128; smoke 40)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke for the CPU check")
    shape = replace(
        SMOKE if args.smoke else Shape(),
        **{k: v for k, v in (("blocks", args.blocks), ("nsamples", args.nsamples)) if v},
    )
    worlds = [int(w) for w in (args.worlds or ("1,2" if args.smoke else "1,2,4")).split(",")]
    if 1 not in worlds:
        p.error("--worlds must include 1 (the baseline of the scaling efficiency)")
    available = 2**31 if args.smoke else torch.cuda.device_count()
    rows, skipped = [], [w for w in worlds if w > available]
    for world in (w for w in worlds if w <= available):
        rows.append(run_world(world, shape, args.smoke))
        print(f"[distributed] {world} rank(s): {rows[-1]}", file=sys.stderr, flush=True)
    add_scaling(rows)
    result = {
        "record": run_record(["python", "benchmarks/distributed.py", *argv]),
        "smoke": args.smoke,
        "shape": asdict(shape),
        "method": f"GPTQ W{METHOD.bits} g{METHOD.group_size} (act_order={METHOD.act_order})",
        "rows": rows,
        "skipped_worlds": skipped,
        "checks": {
            "identical_codes": all(r["identical_to_1_rank"] and r["ranks_agree"] for r in rows),
            "bound_identical": all(r["bound_identical_to_1_rank"] for r in rows),
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "distributed.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
