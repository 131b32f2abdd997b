"""FAIR-Calib stage 2 (reconstruction) variants, side by side with their base methods.

    python benchmarks/recon_sweep.py --model mdlm-small --device cuda --schemes w3g128,w4pc \
        --variants gptq,recon,fair --out benchmarks/results/recon-sweep
    python benchmarks/recon_sweep.py --smoke --out /tmp/sweep        # CPU, tiny, seconds

A variant is a method plus config overrides (`recon.<field>` reaches ReconConfig); `--spec
FILE.json` adds variants ({"name": ["method", {overrides}]}). Every row calibrates on the same C4
draw per seed and is scored with the same evaluation noise (2 MC samples) on WikiText-2 test and
C4 validation; calibration time is measured in the same run as GPTQ's.
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
from faircalib.bench import SCHEMES, record_lines, run_record
from faircalib.calib import METHOD_CONFIGS, quantize
from faircalib.config import CalibConfig, FairCalibConfig, ReconConfig
from faircalib.data import calibration_batch, eval_sequences
from faircalib.eval import likelihood_bound

VARIANTS: dict[str, tuple[str, dict]] = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "awq": ("awq", {}),
    "fair-fast": ("fair", {"preset": "fast"}),
    "recon": ("recon", {}),
    "fair": ("fair", {}),
    "recon-scales-only": ("recon", {"recon.rounding": False}),
    "recon-quant-input": ("recon", {"recon.target": "quant_input"}),
    "recon-rtn-init": ("recon", {"base": "rtn"}),
    "recon-e2e": ("recon", {"recon.e2e_steps": 200}),
    "fair-e2e": ("fair", {"recon.e2e_steps": 200}),
    "fair-tempered": ("fair", {"gamma": 0.5, "max_weight": 4.0}),
    "fair-prior": ("fair", {"weighting": "prior"}),
    "fair-fast-prior": ("fair", {"preset": "fast", "weighting": "prior"}),
    "fair-fast-uniform": ("fair", {"preset": "fast", "weighting": "uniform"}),
    "gptq-views4": ("gptq", {"calib.views": 4}),
    "recon-views4": ("recon", {"calib.views": 4}),
    "fair-views4": ("fair", {"calib.views": 4}),
    "recon-e2e-long": ("recon", {"recon.e2e_steps": 600, "recon.e2e_lr": 2e-3}),
    "fair-e2e-long": ("fair", {"recon.e2e_steps": 600, "recon.e2e_lr": 2e-3}),
    "fair-views4-e2e": ("fair", {"calib.views": 4, "recon.e2e_steps": 400, "recon.e2e_lr": 2e-3}),
    "recon-views4-e2e": (
        "recon",
        {"calib.views": 4, "recon.e2e_steps": 400, "recon.e2e_lr": 2e-3},
    ),
    "e2e-only": ("fair", {"recon.steps": 0, "recon.e2e_steps": 600, "recon.e2e_lr": 2e-3}),
    "fair-e2e-round": (
        "fair",
        {"recon.e2e_steps": 400, "recon.e2e_lr": 2e-3, "recon.e2e_rounding": True},
    ),
    "fair-e2e-fixed-masks": (
        "fair",
        {"recon.e2e_steps": 600, "recon.e2e_lr": 2e-3, "recon.e2e_fresh_masks": False},
    ),
    "recon-long": ("recon", {"recon.steps": 600, "recon.lr_round": 2e-3, "recon.lr_scale": 1e-3}),
    "recon-hi-lr": ("recon", {"recon.lr_scale": 1e-2, "recon.lr_round": 1e-2}),
}


def build_config(method: str, overrides: dict, bits: int, group_size: int | None, n: int):
    cls = METHOD_CONFIGS[method]
    plain = {k: v for k, v in overrides.items() if not k.startswith(("recon.", "calib."))}
    nested = {k.removeprefix("recon."): v for k, v in overrides.items() if k.startswith("recon.")}
    if issubclass(cls, FairCalibConfig):
        plain.setdefault("n_prompts", n)
        plain["recon"] = ReconConfig(**nested)
    elif nested:
        raise SystemExit(f"{method} has no reconstruction stage: {sorted(nested)}")
    return cls(bits=bits, group_size=group_size, **plain)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="mdlm-small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--schemes", default="w3g128")
    p.add_argument("--variants", default="gptq,recon,fair")
    p.add_argument("--spec", help="JSON file of extra variants")
    p.add_argument("--seeds", default="0", help="calibration seeds")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--smoke", action="store_true", help="mdlm-tiny, few rows, CPU (a test runs it)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    variants = dict(VARIANTS)
    if args.spec:
        variants.update({k: tuple(v) for k, v in json.loads(Path(args.spec).read_text()).items()})
    if args.smoke:
        args.model, args.nsamples, args.eval_limit = "mdlm-tiny", 8, 4
        args.schemes = "w4g64"
    model = hub.load(args.model, device=args.device)
    tok = hub.load_tokenizer(args.model)
    seq_len = 64 if args.smoke else model.seq_len
    sets = {}
    for spec in ("wikitext2:test", "c4:validation"):
        seqs, n_bytes = eval_sequences(tok, *spec.split(":"), seq_len)
        if args.eval_limit:
            n_bytes, seqs = round(n_bytes * args.eval_limit / len(seqs)), seqs[: args.eval_limit]
        sets[spec] = (seqs, n_bytes)

    def score(m) -> dict[str, float]:
        batch = 64 if args.device != "cpu" else 8
        return {
            spec: likelihood_bound(m, s, b, mc_samples=2, progress=False, batch_size=batch).ppl
            for spec, (s, b) in sets.items()
        }

    rows = [{"scheme": "bf16", "variant": "float", "ppl": score(model)}]
    for scheme in args.schemes.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            tokens = calibration_batch(tok, "c4", "train", args.nsamples, seq_len, seed=seed)
            for name in args.variants.split(","):
                method, overrides = variants[name]
                if args.smoke and method in ("fair", "recon"):
                    overrides = {"steps": 4, "prefix_len": 16, "recon.steps": 4, **overrides}
                    if "recon.e2e_steps" in overrides:
                        overrides["recon.e2e_steps"] = 2
                cfg = build_config(method, overrides, **_scheme(scheme), n=args.nsamples)
                calib_knobs = {
                    k.removeprefix("calib."): v
                    for k, v in overrides.items()
                    if k.startswith("calib.")
                }
                calib = CalibConfig(
                    n_samples=args.nsamples, seed=seed, device=args.device, **calib_knobs
                )
                q = copy.deepcopy(model)
                start = time.time()
                report = quantize(q, cfg, tokens, calib, progress=False)
                seconds = time.time() - start
                rows.append(
                    {
                        "scheme": scheme,
                        "variant": name,
                        "method": method,
                        "overrides": overrides,
                        "seed": seed,
                        "ppl": score(q),
                        "calib_s": seconds,
                        "recon": [
                            {k: r[k] for k in ("block", "initial_val", "best_val", "best_step")}
                            for r in report.recon
                        ],
                    }
                )
                if not args.smoke:  # rows so far survive an interrupted run
                    partial = Path(args.out) / "recon_sweep.partial.json"
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    atomic.write_json(partial, {"rows": rows}, indent=1)
                print(
                    json.dumps(
                        {k: rows[-1][k] for k in ("scheme", "variant", "seed", "ppl", "calib_s")}
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    out = {
        "record": run_record(["python", "benchmarks/recon_sweep.py", *(argv or sys.argv[1:])]),
        "model": args.model,
        "rows": rows,
        "summary": summarize(rows),
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.write_json(dest / "recon_sweep.json", out, **atomic.COMPACT)
    atomic.write_text(dest / "recon_sweep.md", markdown(out))
    (dest / "recon_sweep.partial.json").unlink(missing_ok=True)
    print(markdown(out))
    return out


def _scheme(name: str) -> dict:
    if name not in SCHEMES:
        raise SystemExit(f"unknown scheme {name}; choose from {sorted(SCHEMES)}")
    return SCHEMES[name]


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (scheme, variant); time relative to GPTQ of the scheme."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows[1:]:
        groups.setdefault((r["scheme"], r["variant"]), []).append(r)
    out = []
    for (scheme, variant), g in groups.items():
        entry = {"scheme": scheme, "variant": variant, "n": len(g)}
        for spec in g[0]["ppl"]:
            vals = [r["ppl"][spec] for r in g]
            entry[spec] = statistics.mean(vals)
            entry[f"{spec}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        entry["calib_s"] = statistics.mean(r["calib_s"] for r in g)
        gptq = groups.get((scheme, "gptq"))
        if gptq:
            entry["time_vs_gptq"] = entry["calib_s"] / statistics.mean(r["calib_s"] for r in gptq)
        out.append(entry)
    return out


def markdown(out: dict) -> str:
    fp = out["rows"][0]["ppl"]
    lines = [
        f"# Reconstruction variants: {out['model']}",
        "",
        *record_lines(out["record"]),
        "",
        "Bound perplexity, 2 MC samples, the same noise for every row; mean +- std over "
        "calibration seeds; degradation vs float "
        + ", ".join(f"{k} {v:.2f}" for k, v in fp.items())
        + ".",
        "",
        "| scheme | variant | seeds | WikiText-2 | degr. | C4 val | degr. | calib s | vs GPTQ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in out["summary"]:
        w, c = e["wikitext2:test"], e["c4:validation"]
        # no GPTQ row in the run: nothing to divide by
        vs = f"{e['time_vs_gptq']:.2f}x" if "time_vs_gptq" in e else "-"
        lines.append(
            f"| {e['scheme']} | {e['variant']} | {e['n']} | {w:.2f} +- "
            f"{e['wikitext2:test_std']:.2f} | {100 * (w / fp['wikitext2:test'] - 1):+.2f}% | "
            f"{c:.2f} | {100 * (c / fp['c4:validation'] - 1):+.2f}% | {e['calib_s']:.1f} | "
            f"{vs} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
