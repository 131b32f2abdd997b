"""The shipped reference models under both perplexity protocols: ours (`faircalib`: articles +
end-of-text, rows of the model's length) and MDLM's zero-shot protocol (`mdlm`: detokenized
lines, end-of-text per line, BOS + L-2 + EOS rows; faircalib.eval.protocols). Every number is
`faircalib eval MODEL --data CORPUS --split SPLIT --protocol P` (the same function).

    python benchmarks/protocols.py --out benchmarks/results/reference            # CPU
    python benchmarks/protocols.py --smoke --out /tmp/protocols                  # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from faircalib.bench import record_lines, run_record
from faircalib.commands.eval import evaluate

SETS = "wikitext2:test,wikitext2:validation"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="mdlm-tiny,mdlm-small")
    p.add_argument("--sets", default=SETS, help="comma list of corpus:split")
    p.add_argument("--protocols", default="faircalib,mdlm")
    p.add_argument("--mc-samples", type=int, default=1)
    p.add_argument("--limit", type=int, help="first N rows of every set (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="mdlm-tiny, WikiText-2 test, 4 rows")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.sets, args.limit = "mdlm-tiny", "wikitext2:test", 4
    argv = sys.argv[1:] if argv is None else argv
    out = {"record": run_record(["python", "benchmarks/protocols.py", *argv]), "results": []}
    for model in args.models.split(","):
        for spec in args.sets.split(","):
            corpus, split = spec.split(":")
            for protocol in args.protocols.split(","):
                res = evaluate(
                    model,
                    corpus,
                    split,
                    mc_samples=args.mc_samples,
                    limit=args.limit,
                    device=args.device,
                    progress=False,
                    protocol=protocol,
                )
                out["results"].append(res)
                print(f"{model} {spec} {protocol}: ppl {res['ppl']:.2f}", file=sys.stderr)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "protocols.json").write_text(json.dumps(out, indent=1))
    (dest / "protocols.md").write_text(markdown(out))
    return out


def markdown(out: dict) -> str:
    lines = [
        "# Reference models under two perplexity protocols",
        "",
        *record_lines(out["record"]),
        "",
        "NELBO perplexity bound (lower is better). `faircalib`: WikiText articles, end-of-text "
        "after each, rows of the model's length. `mdlm`: MDLM's zero-shot protocol "
        "(`faircalib.eval.protocols`): MDLM's WikiText detokenizer on every line, end-of-text "
        "after every line, rows of BOS + (L - 2) tokens + EOS, remainders dropped per 1,000 "
        "lines. MDLM reports WikiText-2 on its raw validation split, which is not shipped: "
        "`validation` here is WikiText-103's tokenized rows of the same articles "
        "(0.77% `<unk>`); `test` is the exact raw test text.",
        "",
        "| model | data | protocol | rows x length | MC samples | ppl bound | 95% CI | bits/byte |",
        "|---|---|---|---|---:|---:|---|---:|",
    ]
    for r in out["results"]:
        seq_len = r["tokens"] // r["sequences"]
        lines.append(
            f"| {r['model']} | {r['data']}:{r['split']} | {r['protocol']} | "
            f"{r['sequences']:,} x {seq_len} | {r['mc_samples']} | {r['ppl']:.2f} | "
            f"{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f} | {r['bits_per_byte']:.4f} |"
        )
    notes = sorted({r["split_note"] for r in out["results"] if r.get("split_note")})
    lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
