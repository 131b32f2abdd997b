"""The floor a trained model must beat: a unigram model (add-one smoothed, fitted on the
reference models' training corpus) on the same tokenizer, scored on the evaluation sets as
perplexity and bits per byte.

    python benchmarks/unigram_floor.py ../shared/data/corpus/enwiki-2015.part0.jsonl.xz \
        --docs 3000 --out benchmarks/results/reference

`--tokens FILE.npy` fits it on a token file instead (e.g. the one a seed-table model trained
on, assembled from the carried pieces), without the trainer's validation tail, as
`faircalib train` splits it:

    python benchmarks/unigram_floor.py --tokens tokens03.npy --out DIR
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
from faircalib.training import (
    TrainConfig,
    read_documents,
    read_token_cache,
    tokenize_stream,
    unigram_log_probs,
)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("corpus", nargs="?", help="jsonl(.xz|.gz) text shard to fit on")
    source.add_argument("--tokens", help="a token .npy to fit on (its validation tail left out)")
    p.add_argument("--docs", type=int, default=3000, help="documents of CORPUS to read")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tok = hub.load_tokenizer("mdlm-small")
    fitted_on = training_tokens(args, tok)
    logp = unigram_log_probs(fitted_on, tok.get_vocab_size())
    rows: dict = {"training tokens": len(fitted_on)}
    bits: dict = {}
    for corpus, split in (("wikitext2", "validation"), ("wikitext2", "test"), ("c4", "validation")):
        seqs, n_bytes = eval_sequences(tok, corpus, split, 512)
        nats = -logp[seqs.flatten()].sum().item()
        rows[f"{corpus}:{split}"] = math.exp(nats / seqs.numel())
        bits[f"{corpus}:{split}"] = nats / n_bytes / math.log(2)
    out = {
        "record": run_record(["python", "benchmarks/unigram_floor.py", *(argv or sys.argv[1:])]),
        "fitted_on": args.tokens or args.corpus,
        "unigram_ppl": rows,
        "unigram_bits_per_byte": bits,
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.write_json(dest / "unigram.json", out, **atomic.COMPACT)
    print(json.dumps(out["unigram_ppl"]))
    return out


def training_tokens(args: argparse.Namespace, tok) -> torch.Tensor:
    """The ids the unigram model is fitted on: the corpus' first --docs documents, or a token
    file without the validation tail `faircalib train` would hold out of it."""
    if args.tokens is None:
        eos = tok.token_to_id(EOS)
        return torch.from_numpy(
            tokenize_stream(tok, read_documents([args.corpus], args.docs), eos)
        ).long()
    stream = read_token_cache(Path(args.tokens), tok.get_vocab_size())
    n_val = int(len(stream) * TrainConfig.val_fraction)  # as training.validation_tokens
    return torch.from_numpy(stream[: len(stream) - n_val].astype("int64"))


if __name__ == "__main__":
    main()
