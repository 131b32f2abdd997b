"""`faircalib bench`: the comparison tables (float, RTN, GPTQ, AWQ, SmoothQuant, FAIR-Calib)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from faircalib.commands import argtypes, common
from faircalib.commands.argtypes import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="compare quantization methods on one model",
        description="Quantize one model with several methods and schemes and compare them on "
        "one evaluator (same calibration draw, same Monte Carlo noise).",
    )
    common.add_model(p, default="mdlm-tiny")
    common.hidden_alias(p, "--model", dest="model")
    p.add_argument(
        "--methods",
        default="rtn,gptq,fair",
        help="comma list of rtn,gptq,awq,smoothquant,recon,fair; with the activation schemes: "
        "rtn,gptq,smoothquant,quarot-rtn,quarot,flatquant,flatquant-gptq,fair,fair-gptq",
    )
    p.add_argument(
        "--schemes",
        default="w4g128",
        help="comma list of w4g128,w4pc,w3g128,w3pc,w2g64,w8pc (weight-only) or "
        "w8a8,w8a8fp8,w4a8,w4a8fp8,w4a8fp8-e8m0,w4a4 (weights and activations; "
        "docs/activation-quant.md)",
    )
    p.add_argument(
        "--calib-seeds",
        type=argtypes.seed_list,
        default=[0],
        help="comma list: one calibration draw per seed",
    )
    p.add_argument(
        "--seeded-schemes",
        default="w4g128",
        help="schemes that get every calibration seed (others get the first)",
    )
    common.add_nsamples(p)
    common.add_seq_len(p)
    p.add_argument(
        "--data",
        default="wikitext2:test,c4:validation",
        help="evaluation text, a comma list: shipped corpus[:split], file, `datasets` "
        "directory[:split] or hub dataset id",
    )
    common.hidden_alias(p, "--eval-data", dest="data")
    p.add_argument("--split", help="split for the --data entries that name none")
    p.add_argument(
        "--protocol",
        default="faircalib",
        choices=["faircalib", "mdlm"],
        help="perplexity protocol (see `faircalib eval --help`)",
    )
    common.add_calib(p)
    common.add_text_field(p)
    p.add_argument(
        "--task",
        help="JSON Lines of multiple-choice items {context, choices, answer}: an accuracy column "
        "(LLaDA's log-likelihood)",
    )
    p.add_argument(
        "--task-mc-samples",
        type=positive_int,
        default=16,
        help="Monte Carlo draws per --task choice (not --mc-samples, the bound's draws)",
    )
    common.add_mc_samples(p)
    common.hidden_alias(p, "--eval-mc-samples", dest="mc_samples", type=positive_int)
    common.add_limit(p)
    common.hidden_alias(p, "--eval-limit", dest="limit", type=positive_int)
    p.add_argument(
        "--flip-prompts",
        type=positive_int,
        default=8,
        help="prompts of the frontier flip-rate generations",
    )
    p.add_argument(
        "--flip-gen-length",
        type=positive_int,
        default=32,
        help="tokens generated per flip-rate prompt",
    )
    p.add_argument(
        "--flip-steps",
        type=positive_int,
        default=32,
        help="sampler steps of the flip-rate generations (as `generate --steps`)",
    )
    common.add_device(p)
    p.add_argument(
        "--offload",
        action="store_true",
        help="models wait on the CPU: calibration keeps one block on --device, evaluation moves "
        "the evaluated models there",
    )
    p.add_argument(
        "--fair-preset", choices=["full", "fast"], default="full", help="fair/recon preset"
    )
    p.add_argument(
        "--recon-steps",
        type=argtypes.non_negative_int,
        help="fair/recon: block-reconstruction optimiser steps per block (default: 200)",
    )
    p.add_argument(
        "--e2e-steps",
        type=argtypes.non_negative_int,
        help="fair/recon: end-to-end scale steps (default: 600)",
    )
    p.add_argument(
        "--flat-steps",
        type=int,
        help="activation schemes: learned-transform steps per linear of flatquant, "
        "flatquant-gptq, fair (default: 200)",
    )
    p.add_argument(
        "--clip-search",
        action="store_true",
        help="activation schemes: search activation clip ratios for the methods without a "
        "learned transform",
    )
    p.add_argument("--out", help="write bench.json, bench.md and plots here")
    common.add_json(p)
    p.set_defaults(func=run)


def eval_specs(data: str, split: str | None) -> list[str]:
    """--data's comma list, `--split` appended to the entries that name no split of their own.
    A comma inside an existing file or directory name does not split it."""
    from faircalib.eval.protocols import split_spec

    specs = _comma_list(data, lambda spec: Path(split_spec(spec)[0]).expanduser().exists())
    if not specs:
        from faircalib.errors import ConfigError

        raise ConfigError(
            f"--data {data!r} names no evaluation data; pass one, e.g. --data wikitext2"
        )
    if split is None:
        return specs
    return [s if split_spec(s)[1] is not None else f"{s}:{split}" for s in specs]


def _comma_list(value: str, is_path: Callable[[str], bool]) -> list[str]:
    """`value` split at commas, except that the longest run of pieces that names an existing
    path stays whole."""
    pieces, specs, i = value.split(","), [], 0
    while i < len(pieces):
        end = next(
            (j for j in range(len(pieces), i + 1, -1) if is_path(",".join(pieces[i:j]))), i + 1
        )
        specs.append(",".join(pieces[i:end]))
        i = end
    return [spec for spec in specs if spec]


def act_knobs(args: argparse.Namespace) -> dict | None:
    """--flat-steps / --clip-search as BenchConfig.act (None when neither is given)."""
    knobs = {}
    if args.flat_steps is not None:
        knobs["flat_steps"] = args.flat_steps
    if args.clip_search:
        knobs["clip_search"] = True
    return knobs or None


def run(args: argparse.Namespace) -> int:
    from faircalib import hub
    from faircalib.bench import BenchConfig, markdown_tables, run_bench

    hub.check_device(args.device)  # one line before any model is loaded

    cfg = BenchConfig(
        model=args.model,
        methods=args.methods.split(","),
        schemes=args.schemes.split(","),
        calib_seeds=args.calib_seeds,
        seeded_schemes=args.seeded_schemes.split(","),
        nsamples=args.nsamples,
        seq_len=args.seq_len,
        eval_data=eval_specs(args.data, args.split),
        eval_mc_samples=args.mc_samples,
        eval_limit=args.limit,
        protocol=args.protocol,
        calib=args.calib,
        calib_split=args.calib_split,
        text_field=args.text_field,
        task=args.task,
        task_mc_samples=args.task_mc_samples,
        flip_prompts=args.flip_prompts,
        flip_gen_length=args.flip_gen_length,
        flip_steps=args.flip_steps,
        device=args.device,
        offload=args.offload,
        out=args.out,
        act=act_knobs(args),
        stage2={
            "preset": args.fair_preset,
            **({"steps": args.recon_steps} if args.recon_steps is not None else {}),
            **({"e2e_steps": args.e2e_steps} if args.e2e_steps is not None else {}),
        },
    )
    result = run_bench(cfg, argv=["faircalib", *sys.argv[1:]])
    if args.json:
        print(json.dumps(result, default=float))
    else:
        print(markdown_tables(result))
    return 0
