"""Quality of the shipped reference models: NELBO perplexity bounds side by side, and a
unigram model on the same tokenizer as the floor any trained model must beat.

    python benchmarks/reference_models.py --device cuda --mc-samples 1,8 \
        --train-corpus .gpu/enwiki-2015.part0.jsonl.xz --out benchmarks/results/reference_models
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from faircalib import atomic, hub
from faircalib.bench import run_record
from faircalib.data import eval_sequences
from faircalib.data.tokenizers import EOS
from faircalib.eval import likelihood_bound
from faircalib.training import read_documents, tokenize_stream

SETS = [("wikitext2", "validation"), ("wikitext2", "test"), ("c4", "validation")]


def unigram_ppl(train_ids: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0  # add-one smoothing
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[test.flatten()].mean().item())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="mdlm-tiny,mdlm-small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mc-samples", default="1", help="comma list; each is a full evaluation")
    p.add_argument("--train-corpus", help="jsonl.xz shard: also report the bound on training text")
    p.add_argument("--train-docs", type=int, default=300)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = {
        "record": run_record(["python", "benchmarks/reference_models.py", *(argv or sys.argv[1:])]),
        "models": {},
    }
    for name in args.models.split(","):
        model = hub.load(name, device=args.device)
        tok = hub.load_tokenizer(name)
        sets = {f"{c}:{s}": eval_sequences(tok, c, s, model.seq_len) for c, s in SETS}
        train_ids = None
        if args.train_corpus:
            stream = torch.from_numpy(
                tokenize_stream(
                    tok, read_documents([args.train_corpus], args.train_docs), tok.token_to_id(EOS)
                )
            ).long()
            n = len(stream) // model.seq_len
            chunks = stream[: n * model.seq_len].view(n, model.seq_len)[:256]
            text_bytes = sum(
                len(d.encode()) for d in read_documents([args.train_corpus], args.train_docs)
            )
            sets["wikipedia:train"] = (chunks, round(text_bytes * len(chunks) / n))
            train_ids = stream
        rows = {}
        for spec, (seqs, n_bytes) in sets.items():
            for mc in (int(m) for m in args.mc_samples.split(",")):
                res = likelihood_bound(model, seqs, n_bytes, mc_samples=mc, seed=0, progress=False)
                rows[f"{spec}@mc{mc}"] = res.to_dict()
                print(
                    f"{name} {spec} mc={mc}: ppl {res.ppl:.2f} [{res.ci95[0]:.2f}, {res.ci95[1]:.2f}] "
                    f"bpb {res.bits_per_byte:.4f} ({res.tokens} tokens)",
                    flush=True,
                )
            if train_ids is not None:
                rows[f"{spec}@unigram"] = {"ppl": unigram_ppl(train_ids, seqs, model.vocab_size)}
        out["models"][name] = {"parameters": model.num_parameters(), "results": rows}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.write_json(dest / "reference_models.json", out, **atomic.COMPACT)
    lines = [
        "# Reference models: NELBO perplexity bounds",
        "",
        f"Command: `{out['record']['command']}`  ",
        f"Commit: `{out['record']['git_commit']}`, device: {out['record']['device']}, "
        f"date: {out['record']['date']}",
        "",
        "| model | data | MC samples | ppl bound | 95% CI | bits/byte | tokens | unigram ppl |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, info in out["models"].items():
        for key, r in info["results"].items():
            if key.endswith("@unigram"):
                continue
            spec, mc = key.split("@mc")
            uni = info["results"].get(f"{spec}@unigram", {}).get("ppl")
            lines.append(
                f"| {name} | {spec} | {mc} | {r['ppl']:.2f} | {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f} | "
                f"{r['bits_per_byte']:.4f} | {r['tokens']:,} | {f'{uni:.1f}' if uni else '-'} |"
            )
    atomic.write_text(dest / "reference_models.md", "\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
