"""`faircalib data`: list the shipped corpora with document, byte and token counts."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list the shipped corpora")
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help="'gpt2' (shipped) or a tokenizer.json path, for token counts",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def corpus_table(tokenizer_arg: str = "gpt2") -> dict:
    from faircalib.data import CORPORA, gpt2_tokenizer, load_texts, load_tokenizer
    from faircalib.data.corpora import tokenized_docs

    tok = gpt2_tokenizer() if tokenizer_arg == "gpt2" else load_tokenizer(tokenizer_arg)
    rows = []
    for corpus, splits in CORPORA.items():
        for split, (fname, _, _) in splits.items():
            docs = load_texts(corpus, split)
            ids, doc_bytes = tokenized_docs(tok, corpus, split)
            rows.append(
                {
                    "corpus": corpus,
                    "split": split,
                    "file": fname,
                    "documents": len(docs),
                    "bytes": sum(doc_bytes),
                    "tokens": sum(len(d) for d in ids),
                }
            )
    return {"tokenizer": tokenizer_arg, "corpora": rows}


def run(args: argparse.Namespace) -> int:
    table = corpus_table(args.tokenizer)
    if args.json:
        print(json.dumps(table))
        return 0
    print(
        f"{'corpus':<10} {'split':<11} {'documents':>9} {'bytes':>11} {'tokens':>10}  ({table['tokenizer']})"
    )
    for r in table["corpora"]:
        print(
            f"{r['corpus']:<10} {r['split']:<11} {r['documents']:>9,} {r['bytes']:>11,} {r['tokens']:>10,}"
        )
    return 0
