"""`faircalib eval`: NELBO perplexity bound of a (quantized) dLLM on a shipped corpus or the
user's own text, under our protocol or MDLM's (faircalib.eval.protocols)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from faircalib.commands import argtypes, common
from faircalib.commands.argtypes import positive_int
from faircalib.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="likelihood-bound perplexity (our or MDLM's protocol)",
        description="NELBO perplexity bound of a float, fake-quant or packed model.",
    )
    common.add_model(p)
    common.add_data(
        p,
        split_help="split of --data (default: the protocol's split for a shipped corpus - "
        "faircalib: WikiText-2 test, mdlm: validation; for a `datasets` dataset, its split)",
    )
    common.add_text_field(p)
    p.add_argument(
        "--protocol",
        default="faircalib",
        choices=["faircalib", "mdlm"],
        help="faircalib: documents + end-of-text, rows of the model's length; mdlm: MDLM's "
        "zero-shot protocol (detokenized lines, end-of-text per line, BOS + L-2 + EOS rows)",
    )
    p.add_argument(
        "--detokenizer",
        default="auto",
        choices=["auto", "none", "wikitext", "ptb", "lm1b", "lambada"],
        help="--protocol mdlm: MDLM's detokenizer (auto: the shipped corpus's, none for files)",
    )
    common.add_seq_len(p)
    common.add_mc_samples(p)
    p.add_argument(
        "--seed",
        type=argtypes.seed,
        default=0,
        help="noise seed: same seed = same noise for any model",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    common.add_limit(p)
    common.add_device(p)
    common.add_json(p)
    p.set_defaults(func=run)


def evaluate(
    model_name: str,
    data: str,
    split: str | None = None,
    *,
    seq_len: int | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    protocol: str = "faircalib",
    text_field: str = "text",
    detokenizer: str | None = "auto",
    model_obj=None,
    tokenizer=None,
) -> dict:
    """The bound of `model_name` (loaded here) or of `model_obj` with `tokenizer` (a model
    already in memory, e.g. just quantized; `model_name` then only names it in the result)."""
    from faircalib import hub
    from faircalib.data.sources import load_source
    from faircalib.errors import ConfigError
    from faircalib.eval import likelihood_bound
    from faircalib.eval.protocols import default_split, protocol_sequences
    from faircalib.models.base import seq_len_warning
    from faircalib.provenance import run_record

    hub.check_device(device)  # before any data or weights are read
    if protocol != "mdlm" and detokenizer not in (None, "auto", "none"):
        raise ConfigError(f"--detokenizer {detokenizer} applies to --protocol mdlm only")
    source = load_source(data, split or default_split(protocol, data), text_field)
    if model_obj is None:
        model = hub.load(model_name, device=device)
        tokenizer = hub.load_tokenizer(model_name)
    else:
        model = model_obj.to(device).eval()
        if tokenizer is None:
            raise ConfigError("evaluating a model object needs its tokenizer")
    risk = "the bound is not comparable with one at its own length"
    warning = seq_len_warning(model, seq_len, model_name, risk)
    if warning:
        print(f"faircalib eval: warning: {warning}", file=sys.stderr)
    batch = protocol_sequences(
        tokenizer, source, protocol, seq_len or model.seq_len, detokenizer, limit=limit
    )
    sequences, n_bytes = batch.sequences, batch.n_bytes
    start = time.time()
    result = likelihood_bound(
        model,
        sequences,
        n_bytes,
        mc_samples=mc_samples,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    return {
        "model": str(model_name),
        "data": data,
        "split": source.split,
        "protocol": protocol,
        "detokenizer": batch.detokenizer,
        "split_note": batch.note,
        "data_source": source.record(),
        **result.to_dict(),
        "seconds": time.time() - start,
        "record": run_record(device=device),
    }


def run(args: argparse.Namespace) -> int:
    if args.seq_len is not None and args.seq_len < 1:  # 0 would fall back to the model's
        raise ConfigError(f"--seq-len must be at least 1, got {args.seq_len}")
    out = evaluate(
        args.model,
        args.data,
        args.split,
        seq_len=args.seq_len,
        mc_samples=args.mc_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        protocol=args.protocol,
        text_field=args.text_field,
        detokenizer=args.detokenizer,
    )
    if args.json:
        print(json.dumps(out))
    else:
        ci = "95% CI {:.3f}-{:.3f}".format(*out["ci95"]) if out["ci95"] else "one sequence: no CI"
        where = f"{out['data']}/{out['split']}" if out["split"] else out["data"]
        print(
            f"{out['model']} on {where} ({out['protocol']} protocol): ppl <= {out['ppl']:.3f} "
            f"({ci}), {out['bits_per_byte']:.4f} bits/byte, "
            f"{out['tokens']:,} tokens, {out['mc_samples']} MC sample(s), {out['seconds']:.0f}s"
        )
    return 0
