"""Activation quantization on a dLLM: float / W8A8 INT8 / W8A8 FP8 / W4A8 / W4A4 x methods.

    python benchmarks/w4a4.py --model mdlm-small --device cuda --out benchmarks/results/w4a4
    python benchmarks/w4a4.py --smoke --out /tmp/w4a4        # CPU, mdlm-tiny, seconds

Methods (`faircalib.calib.activations.METHODS`): rtn, gptq, smoothquant, quarot-rtn (online
randomized Hadamard + RTN weights), quarot (Hadamard + GPTQ weights, QuaRot's recipe),
flatquant (learned Kronecker transform, smoothing and clipping, RTN weights), flatquant-gptq and
fair (flatquant's optimiser on FAIR-Calib's calibration rows and frontier-instability row
weights), fair-gptq (fair's transform, then GPTQ on the transformed weights with the
FAIR-weighted Hessian). A --methods entry may carry variant options, `METHOD+opt+opt`:

    block<N>  block-wise stage steps (else one row per --block-steps value)
    steps<N>  per-layer learned-transform steps (else --flat-steps)   lr<F>  its Adam lr
    noclip    no learned weight/activation clipping
    shift / meanshift / noshift   the channel shift of the input (FlatQuantConfig.shift): learned
              from the row-weighted mean, fixed at that mean (the default), or none
    gamma<F> / maxw<F> / floor<F>   FAIR-Calib row-weight exponent / cap / floor (fair rows)
    uniform   FAIR-Calib's rows with every weight 1 (rows without the instability weighting)

e.g. `--methods quarot,flatquant,fair,fair-gptq,fair-gptq+block100,fair-gptq+gamma0.5`.
Every row calibrates on the same C4 draw, is scored on `--eval-data` (WikiText-2 test and/or C4
validation; the first is the table's ppl) with the same
evaluation noise (likelihood bound, `--mc-samples` draws) and, at W4A4 (`--flip-schemes`),
generates under the same sampler noise as the float model for its flip rate. With `--ablation`
the file also holds the per-layer A4 ablation and the masked/clean activation statistics.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

from faircalib import atomic, hub
from faircalib.bench import record_lines, run_record
from faircalib.calib import fair_inputs
from faircalib.calib.activations import (
    FAIR_METHODS,
    METHODS,
    SCHEMES,
    ActCalibConfig,
    a4_ablation,
    activation_outlier_stats,
    quantize_activations_model,
    summarize_stats,
)
from faircalib.calib.inputs import masked_inputs
from faircalib.config import CalibConfig, FairCalibConfig
from faircalib.data import calibration_batch, eval_sequences
from faircalib.eval import likelihood_bound
from faircalib.quant.flatquant import FlatQuantConfig

DEFAULT_METHODS = "rtn,gptq,smoothquant,quarot-rtn,quarot,flatquant,fair,fair-gptq"
DEFAULT_SCHEMES = "w8a8,w8a8fp8,w4a8,w4a8fp8,w4a4"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="mdlm-small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--nsamples", type=int, default=128, help="calibration texts (C4 train)")
    p.add_argument("--seq-len", type=int, help="default: the model's")
    p.add_argument("--eval-limit", type=int, help="eval sequences per data set (default: all)")
    p.add_argument(
        "--eval-data",
        default="wikitext2",
        help="comma list of wikitext2 (test), c4 (validation); the first is the ppl column",
    )
    p.add_argument("--mc-samples", type=int, default=2)
    p.add_argument("--flat-steps", type=int, default=200)
    p.add_argument("--block-steps", default="0",
                   help="comma list: steps of the block-wise stage of the learned methods, one row "
                   "per value (0: per-layer only; rows METHOD+blockN)")  # fmt: skip
    p.add_argument("--clip-search", action="store_true", help="search activation clip ratios")
    p.add_argument("--flip-schemes", default="w4a4", help="schemes that get a flip rate")
    p.add_argument("--flip-prompts", type=int, default=8)
    p.add_argument("--ablation", action="store_true", help="per-layer A4 ablation + statistics")
    p.add_argument("--stats-only", action="store_true", help="only the ablation and statistics")
    p.add_argument("--stats-sequences", type=int, default=32, help="calibration texts they use")
    p.add_argument(
        "--smoke", action="store_true", help="mdlm-tiny, tiny sizes, CPU (a test runs it)"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.nsamples, args.seq_len = "mdlm-tiny", "cpu", 4, 64
        args.eval_limit, args.mc_samples, args.flat_steps, args.flip_prompts = 4, 1, 2, 2
        args.ablation, args.schemes, args.stats_sequences = True, "w8a8fp8,w4a4", 4
        # every code path once, the lease's (fair-gptq, a FAIR weighting variant, C4) included
        args.methods = "rtn,smoothquant,quarot,flatquant,fair,fair-gptq+gamma0.5"
        args.eval_data = "wikitext2,c4"
    for name in args.schemes.split(","):
        if name not in SCHEMES:
            p.error(f"unknown scheme {name}; choose from {sorted(SCHEMES)}")
    for spec in args.methods.split(","):
        try:
            parse_variant(spec)
        except ValueError as err:
            p.error(str(err))
    for name in args.eval_data.split(","):
        if name not in EVAL_DATA:
            p.error(f"unknown eval data {name}; choose from {sorted(EVAL_DATA)}")
    args.ablation = args.ablation or args.stats_only
    return args


EVAL_DATA = {"wikitext2": ("wikitext2", "test"), "c4": ("c4", "validation")}
# variant option -> (field, parser, smallest allowed value): "block100" -> ("block_steps", 100)
VARIANT_OPTIONS = {
    "block": ("block_steps", int, 0),
    "steps": ("flat_steps", int, 1),
    "lr": ("flat_lr", float, 1e-12),
    "gamma": ("gamma", float, 1e-12),
    "maxw": ("max_weight", float, 1e-12),
    "floor": ("floor", float, 0),
}
FAIR_ROW_KNOBS = ("gamma", "max_weight", "floor", "weighting")
FLAG_OPTIONS = {  # variant options without a value
    "uniform": {"weighting": "uniform"},
    "noclip": {"learn_clip": False},
    "shift": {"shift": "learned"},
    "meanshift": {"shift": "mean"},
    "noshift": {"shift": "none"},  # the learned methods' behaviour before the shift existed
}


def parse_variant(spec: str) -> tuple[str, dict]:
    """ "fair-gptq+block100+gamma0.5" -> ("fair-gptq", {"block_steps": 100, "gamma": 0.5});
    refuses unknown methods, options, and options the method does not read."""
    method, *opts = spec.split("+")
    if method not in METHODS:
        raise ValueError(f"unknown method {method}; choose from {sorted(METHODS)}")
    knobs: dict = {}
    for opt in opts:
        if opt in FLAG_OPTIONS:
            knobs.update(FLAG_OPTIONS[opt])
            continue
        key = next((k for k in VARIANT_OPTIONS if opt.startswith(k)), None)
        if key is None:
            options = sorted([*VARIANT_OPTIONS, *FLAG_OPTIONS])
            raise ValueError(f"unknown option {opt!r} in {spec}; use {options}")
        field, cast, least = VARIANT_OPTIONS[key]
        try:
            value = cast(opt[len(key) :])
        except ValueError:
            raise ValueError(f"{spec}: {opt!r} needs a {cast.__name__} after {key!r}") from None
        if not value >= least:  # refused here, before the float model is scored
            raise ValueError(f"{spec}: {opt!r} must be at least {least:g}")
        knobs[field] = value
    learned = METHODS[method][1] == "learned"
    if not learned and knobs:
        raise ValueError(f"{spec}: options apply to the learned-transform methods only")
    if method not in FAIR_METHODS and any(k in knobs for k in FAIR_ROW_KNOBS):
        raise ValueError(f"{spec}: gamma/maxw/floor/uniform apply to {FAIR_METHODS} only")
    return method, knobs


def method_variants(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(row label, method, knobs) per row: a learned-transform entry without `block<N>` once
    per --block-steps value (label +blockN), every other entry once."""
    steps = [int(v) for v in args.block_steps.split(",")]
    rows = []
    for spec in args.methods.split(","):
        method, knobs = parse_variant(spec)
        if METHODS[method][1] != "learned" or "block_steps" in knobs:
            rows.append((spec, method, knobs))
            continue
        for n in steps:
            rows.append((f"{spec}+block{n}" if n else spec, method, {**knobs, "block_steps": n}))
    return rows


def act_config(scheme: str, method: str, knobs: dict, args) -> ActCalibConfig:
    """The row's ActCalibConfig: --flat-steps / --clip-search, overridden by the variant."""
    flat = FlatQuantConfig(
        steps=knobs.get("flat_steps", args.flat_steps),
        **{k: knobs[k] for k in ("learn_clip", "shift") if k in knobs},
        **({"lr": knobs["flat_lr"]} if "flat_lr" in knobs else {}),
    )
    return ActCalibConfig(
        scheme=scheme,
        method=method,
        clip_search=args.clip_search,
        flat=flat,
        device=args.device,
        block_steps=knobs.get("block_steps", 0),
    )


def fair_rows(model, tokens, args, seed: int, knobs: dict | None = None):
    """FAIR-Calib's mixed calibration rows (x_t, t, row weights): half the texts masked at
    stratified t (weight 1), half recorded sampler states with frontier-instability weights,
    from the toolkit's own split (`faircalib.calib.fair_inputs`); knobs: FairCalibConfig
    fields of the weighting (gamma, max_weight, floor, weighting)."""
    given = {k: v for k, v in (knobs or {}).items() if k in FAIR_ROW_KNOBS}
    fcfg = FairCalibConfig(
        bits=4, group_size=None, n_prompts=len(tokens) // 2, preset="fast", **given
    )
    if args.smoke:
        fcfg.steps, fcfg.prefix_len = 4, 16
    calib = CalibConfig(n_samples=len(tokens), seed=seed, device=args.device)
    inputs, _ = fair_inputs(model, fcfg, tokens, calib)
    return inputs["x_t"], inputs["t"], inputs["weights"].float(), inputs["text_ids"]


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    model = hub.load(args.model, device=args.device)
    tok = hub.load_tokenizer(args.model)
    seq_len = args.seq_len or model.seq_len
    evals = {
        name: eval_set(tok, name, seq_len, args.eval_limit) for name in args.eval_data.split(",")
    }
    tokens = calibration_batch(tok, "c4", "train", args.nsamples, seq_len, seed=0)
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=args.nsamples, seed=0))
    prompts = calibration_batch(tok, "c4", "validation", args.flip_prompts, 16, seed=1234)
    batch = 8 if args.device == "cpu" else 64

    def score(m) -> dict[str, float]:
        return {
            name: likelihood_bound(
                m, seqs, n_bytes, mc_samples=args.mc_samples, progress=False, batch_size=batch
            ).ppl
            for name, (seqs, n_bytes) in evals.items()
        }

    def scored(m) -> dict:
        ppl = score(m)
        return {"ppl": next(iter(ppl.values())), "ppl_by_data": ppl}

    def flips(m) -> float:
        from faircalib.frontier import SamplerConfig, compare_generations

        steps = 8 if args.smoke else 32
        scfg = SamplerConfig(sampler="low_confidence", steps=steps, gen_length=steps)
        res = compare_generations(model, m, prompts.to(args.device), scfg, seed=0, max_positions=0)
        return res["flip_rate"]

    rows = [{"scheme": "float", "method": "float", **scored(model)}]
    fair_data: dict[tuple, tuple] = {}  # FAIR-Calib rows per weighting, computed once each
    for scheme in [] if args.stats_only else args.schemes.split(","):
        for label, method, knobs in method_variants(args):
            cfg = act_config(scheme, method, knobs, args)
            q = copy.deepcopy(model)
            start = time.time()
            if method in FAIR_METHODS:
                key = tuple(sorted((k, v) for k, v in knobs.items() if k in FAIR_ROW_KNOBS))
                if key not in fair_data:
                    fair_data[key] = fair_rows(model, tokens, args, 0, dict(key))
                x_f, t_f, w_f, ids_f = fair_data[key]
                layers = quantize_activations_model(q, x_f, t_f, cfg, w_f, ids_f)
            else:
                layers = quantize_activations_model(q, x_t, t, cfg)
            row = {
                "scheme": scheme,
                "method": label,
                **scored(q),
                "calib_s": time.time() - start,
                "mean_layer_error": statistics.mean(r["rel_error"] for r in layers),
                "layers": layers,
            }
            if scheme in args.flip_schemes.split(","):
                row["flip_rate"] = flips(q)
            rows.append(row)
            print(
                json.dumps({k: row[k] for k in ("scheme", "method", "ppl", "calib_s")}),
                file=sys.stderr,
                flush=True,
            )
            del q
    out = {
        "record": run_record(
            ["python", "benchmarks/w4a4.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "model": args.model,
        "calib": {
            "source": "c4:train",
            "nsamples": args.nsamples,
            "seq_len": seq_len,
            "masking": "uniform t",
        },
        "eval": {
            "data": ",".join(":".join(EVAL_DATA[name]) for name in evals),
            "sequences": {name: len(seqs) for name, (seqs, _) in evals.items()},
            "mc_samples": args.mc_samples,
        },
        "rows": rows,
    }
    if args.ablation:
        n = min(len(x_t), args.stats_sequences)
        out["a4_ablation"] = a4_ablation(model, x_t[:n], t[:n], leave_one_out=not args.smoke)
        stats = activation_outlier_stats(model, x_t[:n], t[:n])
        out["activation_stats"] = {
            "sequences": n,
            "layers": stats,
            "by_kind": summarize_stats(stats),
        }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.write_json(dest / "w4a4.json", out, **atomic.COMPACT)
    atomic.write_text(dest / "w4a4.md", markdown(out))
    print(markdown(out))
    return out


def eval_set(tok, name: str, seq_len: int, limit: int | None):
    """(sequences, bytes) of eval data `name`, the first `limit` sequences."""
    seqs, n_bytes = eval_sequences(tok, *EVAL_DATA[name], seq_len)
    if limit:
        n_bytes, seqs = round(n_bytes * min(limit, len(seqs)) / len(seqs)), seqs[:limit]
    return seqs, n_bytes


def markdown(out: dict) -> str:
    fp = out["rows"][0]["ppl"]
    lines = [
        f"# Activation quantization: {out['model']}",
        "",
        *record_lines(out["record"]),
        "",
        f"Likelihood bound on {out['eval'].get('data', 'wikitext2:test')} "
        f"(sequences: {out['eval']['sequences']}, "
        f"{out['eval']['mc_samples']} MC samples, the same noise for every row); float {fp:.2f}. "
        f"Calibration: {out['calib']['nsamples']} C4 texts x {out['calib']['seq_len']} tokens, "
        "masked at stratified t. `calib s` of a FAIR-Calib row includes building FAIR-Calib's "
        "rows (sampler runs, instability scores) only where it is the first row of its "
        "weighting; later rows reuse them.",
        "",
    ]
    floats = out["rows"][0].get("ppl_by_data", {"ppl": fp})
    names = list(floats)
    lines += [
        "| scheme | method | "
        + " | ".join(f"{n} ppl | vs float" for n in names)
        + " | mean layer error | flip rate | calib s |",
        "|---|---|" + "---:|---:|" * len(names) + "---:|---:|---:|",
    ]
    for r in out["rows"][1:]:
        flip = f"{r['flip_rate']:.3f}" if "flip_rate" in r else "-"
        ppl = r.get("ppl_by_data", {"ppl": r["ppl"]})
        cells = " | ".join(f"{ppl[n]:.2f} | {100 * (ppl[n] / floats[n] - 1):+.1f}%" for n in names)
        lines.append(
            f"| {r['scheme']} | {r['method']} | {cells} | "
            f"{r['mean_layer_error']:.4f} | {flip} | {r['calib_s']:.1f} |"
        )
    if "a4_ablation" in out:
        ab = out["a4_ablation"]
        lines += [
            "",
            f"## Per-layer A4 ablation (float weights; KL(float || A4) per masked position, "
            f"{ab['masked_positions']} positions; all layers A4: {ab['all']:.4f})",
            "",
            "| layer | A4 on this layer only | A4 on all but this layer |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {r['layer']} | {r['only']:.4f} | {r.get('all_but', float('nan')):.4f} |"
            for r in ab["layers"]
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
