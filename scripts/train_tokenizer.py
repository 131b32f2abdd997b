"""Train the reference models' byte-level BPE on the Wikipedia training corpus.

    python scripts/train_tokenizer.py ../shared/data/corpus/enwiki-2015.part0.jsonl.xz \
        --vocab-size 8192 --max-bytes 60000000 --out src/faircalib/assets/tokenizers/wiki-bpe-8k.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from faircalib.data.tokenizers import train_bpe
from faircalib.training import read_documents


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("corpus", nargs="+")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-bytes", type=int, default=60_000_000)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    def texts():
        n = 0
        for doc in read_documents(args.corpus):
            n += len(doc)
            yield doc
            if n >= args.max_bytes:
                return

    start = time.time()
    tok = train_bpe(texts(), args.vocab_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    print(f"trained {tok.get_vocab_size()} tokens in {time.time() - start:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
