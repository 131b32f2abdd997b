"""`faircalib quantize`: calibrate and quantize a dLLM, write a model directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from faircalib.errors import CheckpointError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a dLLM (RTN, GPTQ, AWQ, SmoothQuant, FAIR-Calib)")
    p.add_argument("model", help="shipped name (mdlm-tiny, mdlm-small) or model directory")
    p.add_argument(
        "--method",
        required=True,
        choices=["rtn", "gptq", "awq", "smoothquant", "recon", "fair"],
        help="recon: FAIR-Calib's optimiser with every token weight 1 (attribution baseline)",
    )
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128 or -1 (per-channel)")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--calib", default="c4", help="calibration corpus")
    p.add_argument("--calib-split", default="train")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seq-len", type=int, help="default: the model's training length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--masking",
        default="uniform",
        choices=["uniform", "sampler", "none"],
        help="mask calibration inputs as the dLLM sees them: 'uniform' t over [0.05, 1], "
        "'sampler' t on a sampler's step grid k/steps, 'none' clean text",
    )
    p.add_argument(
        "--sampler-steps",
        type=int,
        default=64,
        help="--masking sampler: the step count whose grid k/steps (k = 1..steps) t is taken from",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--offload",
        action="store_true",
        help="large models: load on the CPU and keep only the stem/head and one block on --device "
        "(FAIR-Calib's frontier tracking still needs the whole float model there once)",
    )
    p.add_argument(
        "--format",
        default="fake",
        choices=["fake", "packed"],
        help="fake: dequantized float weights; packed: compressed-tensors INT4/INT8",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("method knobs")
    g.add_argument("--damp", type=float, help="GPTQ / FAIR(gptq) Hessian damping")
    g.add_argument("--no-act-order", action="store_true", help="GPTQ: natural column order")
    g.add_argument("--alpha", type=float, help="SmoothQuant migration strength")
    g.add_argument("--fair-base", choices=["gptq", "awq", "rtn"], help="FAIR-Calib base method")
    g.add_argument("--fair-weighting", choices=["instability", "margin", "prior", "uniform"])
    g.add_argument("--fair-tokens", choices=["frontier", "all"])
    g.add_argument("--fair-steps", type=int, help="sampler steps for frontier tracking")
    g.add_argument("--fair-prefix-len", type=int, help="prompt tokens kept for frontier tracking")
    g.add_argument("--fair-noise", choices=["rtn", "random"], help="instability noise model")
    g.add_argument("--fair-inputs", choices=["mixed", "states"], help="calibration sequences")
    g.add_argument("--fair-gamma", type=float, help="exponent on normalised instability")
    g.add_argument("--fair-floor", type=float, help="row weight of non-frontier tokens")
    g.add_argument("--fair-max-weight", type=float, help="cap on a frontier row's extra weight")
    g.add_argument(
        "--fair-preset",
        choices=["full", "fast"],
        help="FAIR-Calib: full (weighted GPTQ + block reconstruction + end-to-end scales, the "
        "default) or fast (weighted GPTQ only)",
    )
    g.add_argument("--recon-steps", type=int, help="fair/recon: optimiser steps per block")
    g.add_argument("--e2e-steps", type=int, help="fair/recon: end-to-end scale steps (0: off)")
    g.add_argument(
        "--views", type=int, default=1, help="masked views per calibration text (noise levels)"
    )
    p.set_defaults(func=run)


def method_config(args: argparse.Namespace):
    from faircalib.calib import METHOD_CONFIGS

    kwargs = {"bits": args.bits, "group_size": args.group_size, "symmetric": args.symmetric}
    knobs = {"damp": args.damp, "alpha": args.alpha}
    if args.format == "packed":  # codes chosen for the bf16 scales the checkpoint stores
        knobs["scale_dtype"] = "bfloat16"  # kept only once the config has this field
    if args.method in ("gptq", "fair", "recon") and args.no_act_order:
        knobs["act_order"] = False
    if args.method in ("fair", "recon"):
        from faircalib.config import ReconConfig

        stage2 = {"steps": args.recon_steps, "e2e_steps": args.e2e_steps}
        knobs["recon"] = ReconConfig(**{k: v for k, v in stage2.items() if v is not None})
        knobs["preset"] = args.fair_preset
    if args.method in ("fair", "recon"):
        knobs.update(
            base=args.fair_base,
            weighting=args.fair_weighting,
            tokens=args.fair_tokens,
            steps=args.fair_steps,
            prefix_len=args.fair_prefix_len,
            noise=args.fair_noise,
            inputs=args.fair_inputs,
            gamma=args.fair_gamma,
            floor=args.fair_floor,
            max_weight=args.fair_max_weight,
            n_prompts=args.nsamples,
        )
    cls = METHOD_CONFIGS[args.method]
    fields = cls.__dataclass_fields__
    kwargs.update({k: v for k, v in knobs.items() if v is not None and k in fields})
    return cls(**kwargs)


def run(args: argparse.Namespace) -> int:
    from faircalib import hub
    from faircalib.calib import quantize
    from faircalib.calib.engine import check_layers
    from faircalib.calib.fakequant_io import save_quantized
    from faircalib.config import CalibConfig
    from faircalib.data import calibration_batch

    config = method_config(args)  # refuses bad bits / group sizes first
    if args.format == "packed":  # refuse AWQ / SmoothQuant now, not after calibrating
        from faircalib.formats.packed import check_packable_method

        check_packable_method(config)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
    source = hub.resolve(args.model)
    model = hub.load(args.model, device="cpu" if args.offload else args.device)
    check_layers(model, config)
    tokenizer = hub.load_tokenizer(args.model)
    seq_len = args.seq_len or model.seq_len
    tokens = calibration_batch(
        tokenizer, args.calib, args.calib_split, args.nsamples, seq_len, args.seed
    )
    calib = CalibConfig(
        source=args.calib,
        split=args.calib_split,
        n_samples=args.nsamples,
        seq_len=seq_len,
        seed=args.seed,
        masking=args.masking,
        sampler_steps=args.sampler_steps,
        views=args.views,
        device=args.device,
        offload=args.offload,
    )
    report = quantize(model, config, tokens, calib, progress=not args.json).to_dict()
    record = {
        "source_model": str(args.model),
        "command": " ".join(["faircalib", *sys.argv[1:]]),
    }
    save_quantized(
        model,
        report,
        out,
        source / "tokenizer.json",
        args.overwrite,
        fmt=args.format,
        record=record,
    )
    summary = {
        "out": str(out),
        "method": report["method"],
        "timings": report["timings"],
        "layers": report["layers"],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for row in report["layers"]:
            print(
                f"{row['layer']:<22} rel. output error {row['rel_error']:.2e} (RTN {row['rtn_rel_error']:.2e})"
            )
        print(f"wrote {out} in {report['timings']['wall_s']:.1f}s")
    return 0
