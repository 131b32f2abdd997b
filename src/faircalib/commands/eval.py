"""`faircalib eval`: NELBO perplexity bound of a (quantized) dLLM on a shipped corpus."""

from __future__ import annotations

import argparse
import json
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="likelihood-bound perplexity (MDLM zero-shot protocol)")
    p.add_argument(
        "model", help="shipped name (mdlm-tiny, mdlm-small), model directory or hub id (owner/name)"
    )
    p.add_argument("--data", default="wikitext2", help="corpus name (see `faircalib data`)")
    p.add_argument("--split", default="test")
    p.add_argument("--seq-len", type=int, help="default: the model's training length")
    p.add_argument("--mc-samples", type=int, default=1, help="(t, mask) draws per sequence")
    p.add_argument(
        "--seed", type=int, default=0, help="noise seed: same seed = same noise for any model"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="evaluate only the first N sequences")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def evaluate(
    model_name: str,
    data: str,
    split: str,
    *,
    seq_len: int | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    from faircalib import hub
    from faircalib.data import eval_sequences
    from faircalib.eval import likelihood_bound

    model = hub.load(model_name, device=device)
    tokenizer = hub.load_tokenizer(model_name)
    sequences, n_bytes = eval_sequences(tokenizer, data, split, seq_len or model.seq_len)
    if limit is not None and limit < len(sequences):
        n_bytes = round(n_bytes * limit / len(sequences))  # bytes scale with the kept share
        sequences = sequences[:limit]
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
        "split": split,
        **result.to_dict(),
        "seconds": time.time() - start,
    }


def run(args: argparse.Namespace) -> int:
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
    )
    if args.json:
        print(json.dumps(out))
    else:
        lo, hi = out["ci95"]
        print(
            f"{out['model']} on {out['data']}/{out['split']}: ppl <= {out['ppl']:.3f} "
            f"(95% CI {lo:.3f}-{hi:.3f}), {out['bits_per_byte']:.4f} bits/byte, "
            f"{out['tokens']:,} tokens, {out['mc_samples']} MC sample(s), {out['seconds']:.0f}s"
        )
    return 0
