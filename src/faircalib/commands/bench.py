"""`faircalib bench`: the comparison tables (float, RTN, GPTQ, AWQ, SmoothQuant, FAIR-Calib)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare quantization methods on one model")
    p.add_argument("--model", default="mdlm-tiny")
    p.add_argument(
        "--methods",
        default="rtn,gptq,fair",
        help="comma list of rtn,gptq,awq,smoothquant,recon,fair",
    )
    p.add_argument(
        "--schemes", default="w4g128", help="comma list of w4g128,w4pc,w3g128,w3pc,w2g64,w8pc"
    )
    p.add_argument("--calib-seeds", default="0", help="comma list: one calibration draw per seed")
    p.add_argument(
        "--seeded-schemes",
        default="w4g128",
        help="schemes that get every calibration seed (others get the first)",
    )
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seq-len", type=int)
    p.add_argument(
        "--eval-data",
        default="wikitext2:test,c4:validation",
        help="comma list of corpus:split or the user's data (file, datasets dir[:split])",
    )
    p.add_argument(
        "--protocol",
        default="faircalib",
        choices=["faircalib", "mdlm"],
        help="perplexity protocol (see `faircalib eval --help`)",
    )
    p.add_argument(
        "--calib",
        default="c4",
        help="calibration text: shipped corpus, .txt / .jsonl[.gz] / .parquet file, `datasets` "
        "directory or hub id",
    )
    p.add_argument("--calib-split", help="default: train for c4; a `datasets` dataset's split")
    p.add_argument("--text-field", default="text", help="JSON Lines / Parquet / datasets field")
    p.add_argument(
        "--task",
        help="JSON Lines of multiple-choice items {context, choices, answer}: an accuracy column "
        "(LLaDA's log-likelihood)",
    )
    p.add_argument(
        "--task-mc-samples", type=int, default=16, help="Monte Carlo draws per task choice"
    )
    p.add_argument("--eval-mc-samples", type=int, default=1)
    p.add_argument("--eval-limit", type=int, help="first N evaluation sequences only")
    p.add_argument("--flip-prompts", type=int, default=8)
    p.add_argument("--flip-gen-length", type=int, default=32)
    p.add_argument("--flip-steps", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--offload",
        action="store_true",
        help="models wait on the CPU: calibration keeps one block on --device, evaluation moves "
        "the evaluated models there",
    )
    p.add_argument(
        "--fair-preset", choices=["full", "fast"], default="full", help="fair/recon preset"
    )
    p.add_argument("--recon-steps", type=int, help="fair/recon: block optimiser steps (200)")
    p.add_argument("--e2e-steps", type=int, help="fair/recon: end-to-end scale steps (600)")
    p.add_argument("--out", help="write bench.json, bench.md and plots here")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from faircalib.bench import BenchConfig, markdown_tables, run_bench

    cfg = BenchConfig(
        model=args.model,
        methods=args.methods.split(","),
        schemes=args.schemes.split(","),
        calib_seeds=[int(s) for s in args.calib_seeds.split(",")],
        seeded_schemes=args.seeded_schemes.split(","),
        nsamples=args.nsamples,
        seq_len=args.seq_len,
        eval_data=args.eval_data.split(","),
        eval_mc_samples=args.eval_mc_samples,
        eval_limit=args.eval_limit,
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
