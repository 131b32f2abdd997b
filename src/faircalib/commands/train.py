"""`faircalib train`: train a reference MDLM on jsonl text shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from faircalib.commands import common
from faircalib.commands.argtypes import (
    finite_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a reference model: MDLM, Diffusion-LM or PLANNER (GPU; CPU for tiny runs)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        help="training text: jsonl(.xz|.gz) shards with a 'text' field (required unless "
        "--token-cache names an existing token file)",
    )
    common.hidden_alias(p, "--corpus", dest="data", nargs="+")
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer.json with <|endoftext|> and <|mask|>"
    )
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (one that is or holds an input is always refused)",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        choices=[
            "tiny",
            "small",
            "mdlm-base",
            "diffusionlm-tiny",
            "planner-tiny",
            "diffusionlm-base",
            "planner-small",
        ],
        help="model family and size (training.PRESETS): tiny/small/mdlm-base are MDLMs",
    )
    p.add_argument("--hidden-dim", type=positive_int, help="override the preset's width")
    p.add_argument("--n-blocks", type=positive_int, help="override the preset's depth")
    p.add_argument("--n-heads", type=positive_int, help="override the preset's attention heads")
    p.add_argument("--seq-len", type=positive_int, help="override the preset's sequence length")
    p.add_argument(
        "--independent-t",
        type=finite_float,
        help="Diffusion-LM presets: share (0-1) of training sequences in which every position "
        "gets its own noise level (docs/models.md, 'Per-position noise levels'; default: off)",
    )
    p.add_argument(
        "--time-warp",
        type=int,
        metavar="BINS",
        help="Diffusion-LM presets: draw training noise levels where the cross-entropy curve "
        "rises (CDCD's time warping over BINS bins of t, e.g. 64; docs/models.md; default: off)",
    )
    p.add_argument("--embed-dim", type=int, help="Diffusion-LM presets: word embedding width")
    p.add_argument(
        "--train-on-bound",
        action="store_true",
        default=None,
        help="Diffusion-LM presets: fit the bound's diffusion term (VDM/Plaid) instead of the "
        "cross-entropy of p(w | z_t) (docs/models.md, 'Training on the bound')",
    )
    p.add_argument(
        "--warp-on-bound",
        action="store_true",
        default=None,
        help="Diffusion-LM presets, with --time-warp: draw levels from the bound's "
        "variance-optimal density and weight them by 1/q (a learned schedule's shape; "
        "docs/models.md, 'Variance-optimal levels')",
    )
    p.add_argument(
        "--posterior-input",
        action="store_true",
        default=None,
        help="Diffusion-LM presets: the trunk also reads each position's posterior from its own "
        "noisy embedding, embedded by a learned table (docs/models.md, 'Posterior input')",
    )
    p.add_argument(
        "--untied-head",
        action="store_true",
        default=None,
        help="Diffusion-LM presets: the network's logits from a [V, hidden] output layer of its "
        "own instead of the tied word embeddings (docs/models.md, 'Untied head')",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="sequences per optimiser step"
    )
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument(
        "--warmup-steps", type=non_negative_int, default=200, help="linear warm-up steps"
    )
    p.add_argument("--max-steps", type=positive_int, default=2000, help="optimiser steps")
    p.add_argument(
        "--min-lr-ratio",
        type=finite_float,
        default=0.1,
        help="the cosine schedule's floor as a share of --lr; 1 keeps the rate constant after "
        "warm-up",
    )
    p.add_argument(
        "--time-budget",
        type=positive_float,
        help="seconds; the cosine schedule ends with the budget",
    )
    p.add_argument("--eval-every", type=positive_int, default=250, help="steps between validations")
    p.add_argument("--max-docs", type=positive_int, help="read at most this many documents (all)")
    p.add_argument("--seed", type=seed, default=0, help="initialisation and data-order seed")
    p.add_argument(
        "--token-cache",
        help=".npy token stream: read when it exists (e.g. assembled by `faircalib data "
        "assemble-tokens`), else the tokenised --data is written there",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument(
        "--fused-adam", action="store_true", help="fused AdamW on a GPU (default: the plain one)"
    )
    p.add_argument(
        "--device-draws",
        action="store_true",
        help="draw batches on the training device (default: a CPU generator, same on every device)",
    )
    g = p.add_argument_group("long runs (state kept in OUT.partial; docs/training.md)")
    g.add_argument(
        "--checkpoint-every", type=non_negative_int, default=0, metavar="STEPS",
        help="write the whole training state every STEPS steps (default: only when a limit "
        "below ends the run early)",
    )  # fmt: skip
    g.add_argument(
        "--stop-after", type=positive_float, metavar="SECONDS",
        help="end this invocation after SECONDS of training, keeping the state for --resume",
    )  # fmt: skip
    g.add_argument(
        "--stop-after-steps", type=positive_int, metavar="STEPS",
        help="end this invocation after STEPS steps, keeping the state for --resume",
    )  # fmt: skip
    g.add_argument(
        "--resume", action="store_true",
        help="continue from OUT.partial with the same settings and data (the same numbers as "
        "an uninterrupted run)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from faircalib.errors import ConfigError
    from faircalib.training import TrainConfig, train

    if not args.data and not (args.token_cache and Path(args.token_cache).exists()):
        raise ConfigError(
            "--data is required (the jsonl(.xz|.gz) shards to train on) unless --token-cache "
            "names an existing token file"
        )

    for flag, value in [
        ("--independent-t", args.independent_t),
        ("--time-warp", args.time_warp),
        ("--embed-dim", args.embed_dim),
        ("--train-on-bound", args.train_on_bound),
        ("--posterior-input", args.posterior_input),
        ("--untied-head", args.untied_head),
        ("--warp-on-bound", args.warp_on_bound),
    ]:
        if value is not None and not args.preset.startswith("diffusionlm"):
            raise ConfigError(
                f"{flag} is a Diffusion-LM training option; preset {args.preset} is not one"
            )
    if args.embed_dim is not None and args.embed_dim < 1:
        raise ConfigError(f"--embed-dim must be a positive width, got {args.embed_dim}")
    if args.time_warp is not None and not 2 <= args.time_warp <= 4096:
        raise ConfigError(f"--time-warp takes a number of bins in [2, 4096], got {args.time_warp}")
    if args.warp_on_bound and (args.time_warp is None or not args.train_on_bound):
        raise ConfigError(
            "--warp-on-bound shapes the time warp for a model trained on the bound: give "
            "--time-warp BINS and --train-on-bound too"
        )
    if args.checkpoint_every < 0:
        raise ConfigError(
            f"--checkpoint-every takes a number of steps >= 0, got {args.checkpoint_every}"
        )
    if args.stop_after is not None and args.stop_after <= 0:
        raise ConfigError(f"--stop-after takes seconds > 0, got {args.stop_after}")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise ConfigError(
            f"--stop-after-steps takes a number of steps >= 1, got {args.stop_after_steps}"
        )
    if not 0 <= args.min_lr_ratio <= 1:
        raise ConfigError(f"--min-lr-ratio must lie in [0, 1], got {args.min_lr_ratio}")
    if args.independent_t is not None and not 0 <= args.independent_t <= 1:
        raise ConfigError(f"--independent-t must lie in [0, 1], got {args.independent_t}")
    overrides = {
        k: v
        for k, v in {
            "hidden_dim": args.hidden_dim,
            "n_blocks": args.n_blocks,
            "n_heads": args.n_heads,
            "seq_len": args.seq_len,
            "independent_t": args.independent_t,
            "time_warp_bins": args.time_warp,
            "embed_dim": args.embed_dim,
            "train_on_bound": args.train_on_bound,
            "posterior_input": args.posterior_input,
            "untied_head": args.untied_head,
            "warp_on_bound": args.warp_on_bound,
        }.items()
        if v is not None
    }
    cfg = TrainConfig(
        corpus=args.data or [],
        tokenizer=args.tokenizer,
        out=args.out,
        preset=args.preset,
        model_overrides=overrides,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        max_steps=args.max_steps,
        time_budget_s=args.time_budget,
        eval_every=args.eval_every,
        max_docs=args.max_docs,
        seed=args.seed,
        compile=args.compile,
        fused_adam=args.fused_adam,
        device_draws=args.device_draws,
        token_cache=args.token_cache,
        checkpoint_every=args.checkpoint_every,
        stop_after_s=args.stop_after,
        stop_after_steps=args.stop_after_steps,
        resume=args.resume,
        overwrite=args.overwrite,
        **({"device": args.device} if args.device else {}),
    )
    train(cfg)
    return 0


if __name__ == "__main__":  # `python -m faircalib.commands.train ...` without the other commands
    import sys

    parser = argparse.ArgumentParser(prog="faircalib")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *sys.argv[1:]])
    sys.exit(args.func(args))
