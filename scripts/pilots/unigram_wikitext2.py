"""The unigram floor of the seed table: perplexity and bits per byte on WikiText-2 test of the
add-0.5 unigram model of a training token file (the trainer's split: its last `val_fraction`
held out). A trained model whose bound is not below this reads nothing from its input.

    python scripts/pilots/unigram_wikitext2.py TOKENS.npy [--vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from tokenizers import Tokenizer

from faircalib.data.corpora import load_text, token_stream
from faircalib.training import TrainConfig

TOKENIZER = "src/faircalib/assets/tokenizers/wiki-bpe-8k.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tokens")
    p.add_argument("--vocab", type=int, default=8192)
    args = p.parse_args()
    stream = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    n_val = int(len(stream) * TrainConfig.val_fraction)  # as training.validation_tokens
    counts = torch.bincount(stream[:-n_val], minlength=args.vocab).double() + 0.5
    log_p = (counts / counts.sum()).log()
    ids = token_stream(Tokenizer.from_file(TOKENIZER), "wikitext2", "test").long()
    nats = -log_p[ids].sum().item()
    n_bytes = len(load_text("wikitext2", "test").encode())
    row = {"tokens_file": args.tokens, "training_tokens": len(stream) - n_val}
    row |= {"wikitext2_test_tokens": len(ids), "unigram_ppl": round(math.exp(nats / len(ids)), 2)}
    row["unigram_bits_per_byte"] = round(nats / n_bytes / math.log(2), 4)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
