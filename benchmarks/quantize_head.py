"""`--quantize-head`: its quality cost on mdlm-small and the whole-checkpoint bytes it saves.

    python benchmarks/quantize_head.py --out benchmarks/results/quantize-head

(a) Quality: mdlm-small calibrated once with GPTQ W4 g128 (128 C4 train samples, the shared
    `quantize_for_bench` calibration), then its vocabulary layers (embedding and output layer)
    left in float / RTN INT8 per row / RTN INT4 g128 - exactly the step `quantize` runs after
    the blocks with `CalibConfig.quantize_head` - and the WikiText-2 test likelihood bound of
    each (and of the float model) with the shipped evaluator (`faircalib.eval.likelihood_bound`),
    the same sequences and the same noise draws for every row. Two more rows put the output
    layer through GPTQ instead (INT8 / INT4 g128, on its real inputs: the calibrated model's
    final hidden states on the same calibration rows, `quantize_model(head_inputs=True)`),
    the embedding staying RTN - what `quantize` does when the blocks are GPTQ-based. The first
    `--limit` sequences only (256 by default: 5-6 minutes in all on a 2-core CPU, measured;
    the Markdown states the run's own wall time; use 128 on a loaded machine).
(b) Bytes: the whole packed checkpoint (every tensor: codes, scales, zero points, float
    tensors in bf16) of the LLaDA-8B and Dream-7B shapes (benchmarks/llada_8b.py's configs) with
    the blocks at GPTQ W4 g128 and the head float / INT8 / INT4, computed from the packed
    layout on the meta-device model (`formats.packed.packed_checkpoint_bytes`), vs bf16 (target:
    at most 0.30x). The formula is checked against packed checkpoints actually written for
    smoke-size models of both layouts (every head mode), tensor bytes from their headers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/llada_8b.py's shapes
from faircalib import atomic, hub  # noqa: E402
from faircalib.bench import record_lines, run_record  # noqa: E402
from faircalib.calib import masked_inputs, quantize  # noqa: E402
from faircalib.calib.engine import (  # noqa: E402
    check_layers,
    head_config,
    quant_results,
    quantize_head,
    quantize_model,
)
from faircalib.config import CalibConfig, GPTQConfig  # noqa: E402
from faircalib.formats.packed import (  # noqa: E402
    checkpoint_tensor_bytes,
    packed_checkpoint_bytes,
    save_packed_model,
)
from faircalib.models.io import build_model, probe_model  # noqa: E402
from llada_8b import DREAM_7B, LLADA_8B, SMOKE_SIZES  # noqa: E402

MODES = (None, "int8", "int4")
GPTQ_MODES = ("int8", "int4")  # head rows whose output layer is quantized by GPTQ
TARGET_RATIO = 0.30
SHAPES = {"llada-8b": LLADA_8B, "dream-7b": DREAM_7B}
SMOKE_FAMILY = {"llada-8b": "llada", "dream-7b": "dream"}
# smoke sizes with a hidden dim a 128-group divides (INT4 g128 needs it)
SMOKE_D128 = {
    "llada-8b": {"d_model": 128, "mlp_hidden_size": 256},
    "dream-7b": {"hidden_size": 128, "intermediate_size": 256},
}


def label(mode: str | None, head_method: str = "rtn") -> str:
    suffix = " (output layer gptq)" if head_method == "gptq" else ""
    return "gptq w4g128" + (f" + head {mode}" if mode else "") + suffix


def schemes(model, body, mode: str | None) -> dict:
    """Layer name -> its quantizer: every block linear at `body`, the declared vocab layers
    at `--quantize-head mode`."""
    prefix = next(n for n, m in model.named_modules() if m is model.blocks)
    out = {
        f"{prefix}.{i}.{name}": body
        for i, block in enumerate(model.blocks)
        for name, _ in model.quantizable_linears(block)
    }
    if mode:
        out.update({v.module: head_config(mode) for v in model.vocab_layers().layers})
    return out


def float_bytes(model, dtype=torch.bfloat16) -> int:
    item = torch.empty(0, dtype=dtype).element_size()
    return sum(t.numel() * item for t in model.state_dict().values())


def byte_rows() -> list[dict]:
    body = GPTQConfig(bits=4, group_size=128)
    rows = []
    for shape, config in SHAPES.items():
        model = probe_model(config)  # meta device: shapes only
        bf16 = float_bytes(model)
        vocab = sum(
            model.get_submodule(v.module).get_parameter(v.param).numel()
            for v in model.vocab_layers().layers
        )
        for mode in MODES:
            b = packed_checkpoint_bytes(model, schemes(model, body, mode))
            rows.append(
                {
                    "shape": shape,
                    "head": mode or "bf16",
                    "params": sum(t.numel() for t in model.state_dict().values()),
                    "vocab_params": vocab,
                    "bf16_bytes": bf16,
                    "packed_bytes": b["total"],
                    "quantized_bytes": b["quantized"],
                    "float_bytes": b["float"],
                    "ratio": b["total"] / bf16,
                    "meets_target": b["total"] / bf16 <= TARGET_RATIO,
                }
            )
    return rows


def formula_checks() -> list[dict]:
    """Write packed checkpoints of smoke-size models (both layouts, every head mode) and compare
    the formula with the tensor bytes in their files."""
    rows = []
    for shape, config in SHAPES.items():
        config = {**config, **SMOKE_SIZES[SMOKE_FAMILY[shape]], **SMOKE_D128[shape]}
        for mode in MODES:
            torch.manual_seed(0)
            model = build_model(config).eval()
            with torch.no_grad():  # bf16 values, as a bf16 checkpoint holds them
                for p in model.parameters():
                    p.copy_(p.bfloat16())
            body = GPTQConfig(bits=4, group_size=128, scale_dtype="bfloat16")
            predicted = packed_checkpoint_bytes(model, schemes(model, body, mode))["total"]
            tokens = torch.randint(0, 999, (4, 32), generator=torch.Generator().manual_seed(0))
            calib = CalibConfig(n_samples=4, seq_len=32, quantize_head=mode)
            quantize(model, body, tokens, calib, progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                out = save_packed_model(model, quant_results(model), Path(tmp) / "packed")
                written = checkpoint_tensor_bytes(out)
                files = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            rows.append(
                {
                    "shape": f"{shape} (smoke: d=128, 2 layers, vocab 1024)",
                    "head": mode or "bf16",
                    "formula_bytes": predicted,
                    "written_tensor_bytes": written,
                    "written_file_bytes": files,
                    "equal": predicted == written,
                }
            )
    return rows


def quality_rows(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from faircalib.eval import likelihood_bound
    from faircalib.eval.protocols import eval_sets

    model = hub.load("mdlm-small")
    tokenizer = hub.load_tokenizer("mdlm-small")
    sets, records = eval_sets(
        tokenizer, ["wikitext2"], "faircalib", model.seq_len, limit=args.limit
    )
    seqs, n_bytes = sets["wikitext2"]

    def bound(m) -> dict:
        tick = time.time()
        res = likelihood_bound(m, seqs, n_bytes, seed=0, progress=False).to_dict()
        return {**res, "eval_s": time.time() - tick}

    rows = [{"model": "float", **bound(model)}]
    tick = time.time()
    qmodel, report, head_inputs = calibrate(copy.deepcopy(model), tokenizer, args.nsamples)
    calib_s = time.time() - tick
    body = GPTQConfig(bits=4, group_size=128)
    for mode in MODES:
        m = qmodel if mode is None else copy.deepcopy(qmodel)
        head = quantize_head(m, mode) if mode else []
        rows.append({"model": label(mode), "head_layers": head, **bound(m)})
    for mode in GPTQ_MODES:  # same calibrated blocks, same calibration rows for the head
        m = copy.deepcopy(qmodel)
        head = quantize_head(m, mode, inputs=head_inputs, gptq=body)
        rows.append({"model": label(mode, "gptq"), "head_layers": head, **bound(m)})
    return rows, {"eval": records, "calib_s": calib_s, "calib": report["calib"]}


def calibrate(model, tokenizer, nsamples: int):
    """GPTQ W4 g128 blocks exactly as `quantize_for_bench(method="gptq", seed=0, device="cpu")`
    (C4 train, masked views, the same engine run), plus the output layer's input statistics
    over those calibration rows from the engine's final cache (`head_inputs=True`) - what
    `quantize` collects for a GPTQ head - so every head row shares one set of blocks."""
    from faircalib.data import calibration_batch

    config = GPTQConfig(bits=4, group_size=128)
    tokens = calibration_batch(tokenizer, "c4", "train", nsamples, model.seq_len, 0)
    calib = CalibConfig(n_samples=nsamples, seq_len=model.seq_len, seed=0, device="cpu")
    check_layers(model, config)
    x_t, t = masked_inputs(model, tokens, calib)
    text_ids = torch.arange(len(tokens)).repeat(calib.views)
    report = quantize_model(
        model, config, x_t, t, calib_cfg=calib, text_ids=text_ids, progress=False, head_inputs=True
    )
    head_inputs, report.head_inputs = report.head_inputs, None
    return model, report.to_dict(), head_inputs


def markdown(result: dict) -> str:
    rec = result["record"]
    lines = ["# `--quantize-head`: quality cost and whole-checkpoint bytes", "", *record_lines(rec)]
    q = result["quality"]
    lines += [
        "",
        "## Quality on mdlm-small (WikiText-2 test, likelihood bound)",
        "",
        f"GPTQ W4 g128 calibrated once on {result['nsamples']} C4 train samples (seed 0); the "
        "head modes are RTN of the embedding and output layer applied to that same calibrated "
        "model, and - rows marked *(output layer gptq)* - the embedding RTN and the output "
        "layer GPTQ (same grid: symmetric, INT8 per row / INT4 g128; the blocks' damp 0.01, "
        "act order, static groups) on its real inputs: the calibrated model's final hidden "
        "states on the same calibration rows, taken from the engine's final cache (what "
        "`quantize` does after GPTQ-based blocks). Evaluation: the shipped "
        f"likelihood bound on the **first {result['limit']} WikiText-2 test sequences only** "
        f"(`--limit {result['limit']}`; this whole run took {result['wall_s'] / 60:.1f} minutes "
        "on a 2-core CPU), 1 MC "
        "sample, seed 0: the same sequences and the same noise draws for every row, so "
        "differences are the models'.",
        "",
        "| model | ppl bound | 95% CI | bits/byte | vs GPTQ W4 |",
        "|---|---|---|---|---|",
    ]
    base = next(r for r in q if r["model"] == label(None))["ppl"]
    for r in q:
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['model']} | {r['ppl']:.2f} | {lo:.2f}-{hi:.2f} | {r['bits_per_byte']:.4f} | "
            f"{100 * (r['ppl'] / base - 1):+.2f}% |"
        )
    lines += [
        "",
        "Output layer, relative output error on a sample of its calibration inputs "
        "(`weighted_output_error`; the head row's `rel_error` / `rtn_rel_error`):",
        "",
        "| model | output layer | output error | RTN output error | weight error |",
        "|---|---|---|---|---|",
    ]
    for r in q:
        for h in r.get("head_layers", []):
            if h.get("method") == "gptq":
                lines.append(
                    f"| {r['model']} | {h['layer']} ({h['method']}) | {h['rel_error']:.4e} | "
                    f"{h['rtn_rel_error']:.4e} | {h['weight_rel_error']:.4e} |"
                )
    lines += [
        "",
        "## Whole-checkpoint bytes (packed, blocks GPTQ W4 g128 asymmetric, bf16 floats)",
        "",
        "Every tensor of the checkpoint, computed from the packed layout on the meta-device "
        "model (`faircalib.formats.packed.packed_checkpoint_bytes`); safetensors headers "
        f"(kilobytes) not counted. Target: at most {TARGET_RATIO:.2f}x of bf16.",
        "",
        "| shape | head | params | vocab params | bf16 GB | packed GB | ratio | <= 0.30x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["bytes"]:
        lines.append(
            f"| {r['shape']} | {r['head']} | {r['params'] / 1e9:.2f} B | "
            f"{r['vocab_params'] / 1e9:.2f} B | {r['bf16_bytes'] / 1e9:.2f} | "
            f"{r['packed_bytes'] / 1e9:.2f} | {r['ratio']:.3f}x | "
            f"{'yes' if r['meets_target'] else 'no'} |"
        )
    lines += [
        "",
        "Formula vs written checkpoints (smoke-size models in the same layouts, GPTQ W4 g128 "
        "body, scales rounded to bf16, `save_packed_model`; tensor bytes read from the files' "
        "headers):",
        "",
        "| model | head | formula bytes | written tensor bytes | file bytes | equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["formula_checks"]:
        lines.append(
            f"| {r['shape']} | {r['head']} | {r['formula_bytes']:,} | "
            f"{r['written_tensor_bytes']:,} | {r['written_file_bytes']:,} | {r['equal']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/quantize-head")
    p.add_argument("--limit", type=int, default=256, help="WikiText-2 test sequences evaluated")
    p.add_argument("--nsamples", type=int, default=128, help="C4 calibration samples")
    p.add_argument("--skip-quality", action="store_true", help="bytes only (seconds)")
    args = p.parse_args(argv)
    start = time.time()
    given = argv if argv is not None else sys.argv[1:]
    record = run_record(["python", "benchmarks/quantize_head.py", *given])
    out = Path(args.out)
    atomic.check_writable_dir(out)
    result = {
        "record": record,
        "limit": args.limit,
        "nsamples": args.nsamples,
        "bytes": byte_rows(),
        "formula_checks": formula_checks(),
        "quality": [],
    }
    if not all(r["equal"] for r in result["formula_checks"]):
        raise SystemExit("the byte formula disagrees with a written checkpoint")
    if not args.skip_quality:
        result["quality"], result["quality_setup"] = quality_rows(args)
    result["wall_s"] = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "quantize_head.json", json.dumps(result, indent=2) + "\n")
    if result["quality"]:
        atomic.write_text(out / "quantize_head.md", markdown(result))
        print(markdown(result))
    return result


if __name__ == "__main__":
    main()
