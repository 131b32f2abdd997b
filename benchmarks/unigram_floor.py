"""The floor a trained model must beat: a unigram model (add-one smoothed, fitted on the
reference models' training corpus) on the same tokenizer, scored on the evaluation sets.

    python benchmarks/unigram_floor.py ../shared/data/corpus/enwiki-2015.part0.jsonl.xz \
        --docs 3000 --out benchmarks/results/reference
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from faircalib import atomic, hub
from faircalib.bench import run_record
from faircalib.data import eval_sequences
from faircalib.data.tokenizers import EOS
from faircalib.training import read_documents, tokenize_stream


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("corpus")
    p.add_argument("--docs", type=int, default=3000)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tok = hub.load_tokenizer("mdlm-small")
    train = torch.from_numpy(
        tokenize_stream(tok, read_documents([args.corpus], args.docs), tok.token_to_id(EOS))
    ).long()
    counts = torch.bincount(train, minlength=tok.get_vocab_size()).double() + 1.0
    logp = torch.log(counts / counts.sum())
    rows = {"training tokens": len(train)}
    for corpus, split in (("wikitext2", "validation"), ("wikitext2", "test"), ("c4", "validation")):
        seqs, _ = eval_sequences(tok, corpus, split, 512)
        rows[f"{corpus}:{split}"] = math.exp(-logp[seqs.flatten()].mean().item())
    out = {
        "record": run_record(["python", "benchmarks/unigram_floor.py", *(argv or sys.argv[1:])]),
        "unigram_ppl": rows,
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.write_json(dest / "unigram.json", out, indent=1)
    print(json.dumps(out["unigram_ppl"]))
    return out


if __name__ == "__main__":
    main()
