"""`faircalib quantize`: calibrate and quantize a dLLM, write a model directory."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


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
    p.add_argument(
        "--calib",
        default="c4",
        help="calibration text: shipped corpus, .txt / .jsonl[.gz] / .parquet file, `datasets` "
        "save_to_disk directory or hub dataset id owner/name",
    )
    p.add_argument("--calib-split", help="default: train for c4; a `datasets` dataset's split")
    p.add_argument("--text-field", default="text", help="JSON Lines / Parquet / datasets field")
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last finished block (progress is kept in "
        "OUT.partial while a run is under way; the inputs must be the same)",
    )
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


def calib_source(args: argparse.Namespace):
    """The calibration text; records the split actually used in `args.calib_split`."""
    from faircalib.data.sources import DEFAULT_CALIB_SPLIT, load_source

    split = args.calib_split or DEFAULT_CALIB_SPLIT.get(args.calib)
    source = load_source(args.calib, split, args.text_field)
    args.calib_split = source.split
    return source


def calib_config(args: argparse.Namespace):
    from faircalib.config import CalibConfig

    return CalibConfig(
        source=args.calib,
        split=args.calib_split,
        n_samples=args.nsamples,
        seq_len=args.seq_len,
        seed=args.seed,
        masking=args.masking,
        sampler_steps=args.sampler_steps,
        views=args.views,
        device=args.device,
        offload=args.offload,
    )


def run(args: argparse.Namespace) -> int:
    from faircalib import distributed, hub
    from faircalib.bench import deterministic
    from faircalib.calib import quantize
    from faircalib.calib.engine import check_layers
    from faircalib.calib.fakequant_io import save_quantized
    from faircalib.calib.progress import PartialRun, fingerprint, partial_dir
    from faircalib.data import calibration_batch
    from faircalib.errors import ConfigError
    from faircalib.models.io import check_output_dir

    config = method_config(args)  # refuses bad bits / group sizes first
    if args.format == "packed":  # refuse AWQ / SmoothQuant now, not after calibrating
        from faircalib.formats.packed import check_packable_method

        check_packable_method(config)
    calib_data = calib_source(args)  # the user's text is checked before any model loads
    calib = calib_config(args)  # and bad calibration flags, before anything is loaded
    hub.check_device(args.device)
    # torchrun: progress files hold one process's block-input cache, and each rank holds a
    # share of it (faircalib.distributed): resumable runs are single-process for now
    if distributed.active() and args.resume:
        raise ConfigError("--resume is not supported under torchrun; resume in one process")
    out = Path(args.out)
    check_output_dir(out, args.overwrite)  # an unwritable --out fails now, not after hours
    PartialRun.check(partial_dir(out), resume=args.resume, overwrite=args.overwrite)
    source = hub.resolve(args.model)
    model = hub.load(args.model, device="cpu" if args.offload else args.device)
    check_layers(model, config)
    tokenizer = hub.load_tokenizer(args.model)
    seq_len = args.seq_len or model.seq_len
    tokens = calibration_batch(tokenizer, calib_data, None, args.nsamples, seq_len, args.seed)
    calib = dataclasses.replace(calib, seq_len=seq_len)
    partial = None
    if not distributed.active():
        fp = fingerprint(model, config.to_dict(), calib.to_dict(), tokens)
        partial = PartialRun.open(
            partial_dir(out), fp, resume=args.resume, overwrite=args.overwrite
        )
    resumed_from = partial.finished if partial is not None else 0
    try:
        report = quantize(
            model, config, tokens, calib, progress=not args.json, partial=partial
        ).to_dict()
    except KeyboardInterrupt as exc:  # SIGINT: say what survives (a SIGKILL keeps it too)
        if partial is None:
            raise
        raise KeyboardInterrupt(
            f"{partial.finished} block(s) finished; progress kept in {partial.directory}: "
            "rerun the same command with --resume to continue"
        ) from exc
    record = {
        "source_model": str(args.model),
        "command": " ".join(["faircalib", *sys.argv[1:]]),
        "calib_data": calib_data.record(),
        "resumed_from_block": resumed_from if args.resume else None,
        "deterministic": deterministic(args.device),
    }
    if distributed.is_main():  # torchrun: every rank holds the same model; rank 0 writes it
        save_quantized(
            model,
            report,
            out,
            source / "tokenizer.json",
            args.overwrite,
            fmt=args.format,
            record=record,
        )
    if partial is not None:
        partial.remove()  # the output is complete: its progress is no longer needed
    summary = {
        "out": str(out),
        "method": report["method"],
        "calib_data": calib_data.record(),
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
