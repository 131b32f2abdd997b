"""`faircalib data`: list the shipped corpora with document, byte and token counts;
`faircalib data pack-tokens / assemble-tokens`: the pre-tokenised training-corpus transport."""

from __future__ import annotations

import argparse
import json

from faircalib.commands.argtypes import positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="list the shipped corpora; pack-tokens / assemble-tokens: a tokenized training corpus",
    )
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help="'gpt2' (shipped) or a tokenizer.json path, for token counts",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    # the pre-tokenised transport of a training corpus (faircalib.data.token_pieces)
    actions = p.add_subparsers(
        dest="data_command",
        metavar="{pack-tokens,assemble-tokens}",
        help="tokenized corpus pieces for a GPU machine (none: list the shipped corpora)",
    )
    pack = actions.add_parser(
        "pack-tokens", help="tokenise jsonl shards into xz pieces of at most N MiB + manifest"
    )
    pack.add_argument("shards", nargs="+", help="jsonl(.xz|.gz) shards with a 'text' field")
    pack.add_argument(
        "--tokenizer", dest="pack_tokenizer", required=True, help="the training tokenizer.json"
    )
    pack.add_argument("--out", required=True, help="directory for the pieces and manifest.json")
    pack.add_argument("--max-piece-mib", type=positive_float, default=3.9, help="piece size limit")
    pack.add_argument("--max-tokens", type=positive_int, help="stop after this many tokens (all)")
    pack.set_defaults(func=run_pack)
    join = actions.add_parser(
        "assemble-tokens", help="join the verified pieces present into a --token-cache .npy"
    )
    join.add_argument("pieces", help="directory holding the pieces")
    join.add_argument("--out", required=True, help="the .npy token file to write")
    join.add_argument("--manifest", help="manifest.json (default: PIECES/manifest.json)")
    join.add_argument("--require-all", action="store_true", help="fail if a piece is missing")
    join.add_argument(
        "--tokenizer", dest="assemble_tokenizer", help="refuse pieces made with another tokenizer"
    )
    join.set_defaults(func=run_assemble)


def run_pack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from faircalib.data.token_pieces import sha256_bytes, tokenize_shards, write_pieces

    stream, vocab = tokenize_shards(args.shards, args.pack_tokenizer, args.max_tokens)
    source = {
        "shards": [Path(s).name for s in args.shards],
        "tokenizer": Path(args.pack_tokenizer).name,
        "tokenizer_sha256": sha256_bytes(Path(args.pack_tokenizer).read_bytes()),
    }
    manifest = write_pieces(
        stream, args.out, max_piece_mib=args.max_piece_mib, vocab_size=vocab, source=source
    )
    total = sum(p["bytes"] for p in manifest["pieces"])
    print(
        f"{manifest['tokens']:,} tokens in {len(manifest['pieces'])} pieces, {total / 2**20:.1f} "
        f"MiB ({total / manifest['tokens']:.3f} bytes/token) -> {args.out}"
    )
    return 0


def run_assemble(args: argparse.Namespace) -> int:
    from faircalib.data.token_pieces import assemble

    result = assemble(
        args.pieces,
        args.out,
        manifest_path=args.manifest,
        require_all=args.require_all,
        tokenizer=args.assemble_tokenizer,
    )
    print(json.dumps(result))
    return 0


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
