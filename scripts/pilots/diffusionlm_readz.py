"""CPU pilot: can a small Diffusion-LM be made to read z_t (its own position and its context)
instead of collapsing to a t-dependent logit bias on top of the Gaussian skip term?

Every arm is diffusionlm_diagnose.py's plain arm (4 blocks x 256, embed_dim 128, final_norm,
the log-unigram logit bias, same seed, lr, batches and t/u draws), changed in one place:

* `plain`: unchanged (a same-contention baseline);
* `noskip`: the head drops the Gaussian skip term in training AND in the bound,
  log p = log_softmax(net logits + bias): the network must read z_t to score at all;
* `znorm`: a LayerNorm on input_up_proj(z) before the positions are added, and the time
  embedding added after the stem LayerNorm, scaled by a learned scalar gain initialised to
  0.1, so z's content is not swamped by t in the stem's normalisation (skip term kept);
* `cond`: CDCD-style conditioning in training only: for half of the sequences (drawn per
  batch) a random 30% of positions are given clean (z = e_w) and left out of the loss; the
  bound is computed as in every arm (every position noisy). Skip term kept. The cond draws
  come from their own generator, so the batches and t/u draws stay those of `plain`.
  `--flag` (cond only, off in the recorded log) adds a learned clean/noisy embedding
  (2 x hidden, zero-initialised) to the stem's output at every position: "clean" only at the
  clean positions of training's conditioned sequences, "noisy" everywhere else, the bound and
  the diagnosis included, so the net can tell e_w from a noisy z_t that lies near it.
  `--flag-init STD` starts it at N(0, STD^2) instead (the zero start trained too slowly on CPU).
* `pert`: the model's own `independent_t` (models/diffusion_lm.py): in a share
  (`--independent-t`, default 0.5) of the training sequences every position draws its own
  noise level, so some neighbours are nearly clean; the bound and the diagnosis keep one level
  a sequence. Skip term kept; batches and t/u draws are `plain`'s.

Prints the held-out bound every `--every` steps, then diffusionlm_diagnose.py's per-bin
diagnosis and its summary, plus the gaps (nats/token of diffusion term) that say whether the
net reads z (blind - net) and context (noise - net_t, shuf - net_t).

    OMP_NUM_THREADS=1 python scripts/pilots/diffusionlm_readz.py --arm {plain,noskip,znorm,cond} \
        --tokens tokens.npy --wall 420 > log

`--device`, `--blocks`, `--hidden`, `--max-steps`: as in diffusionlm_diagnose.py (random draws
stay on the CPU generators, so a CPU run repeats the recorded logs bit for bit).
"""

import argparse
import json
import time

import torch
from diffusionlm_diagnose import (
    add_run_args,
    bound,
    build,
    diagnose,
    split_tokens,
    summary,
    train,
)
from torch import nn

from faircalib.models.base import BlockContext
from faircalib.models.diffusion_lm import BOUND_STREAM
from faircalib.models.gaussian import keyed_normal, row_keys, time_features

ARMS = ("plain", "noskip", "znorm", "cond", "pert")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", choices=ARMS, default="plain")
    add_run_args(p, wall=420.0)
    p.add_argument("--cond-frac", type=float, default=0.3, help="cond: clean share of positions")
    p.add_argument("--flag", action="store_true", help="cond: a learned clean/noisy embedding")
    p.add_argument("--flag-init", type=float, default=0.0, help="flag: init std (0: zeros)")
    p.add_argument("--independent-t", type=float, default=0.5, help="pert: share of sequences")
    p.add_argument("--jitter", type=float, default=0.0, help="pert: log-SNR jitter (0: uniform)")
    args = p.parse_args(argv)
    if args.flag_init and not args.flag:
        p.error("--flag-init belongs to --flag")
    if args.flag and args.arm != "cond":
        p.error("--flag belongs to --arm cond (only its training feeds clean positions)")
    if args.no_bias and args.arm != "pert":
        p.error("--no-bias belongs to --arm pert (the other arms' heads add the bias)")
    args.band = None  # diagnose.train reads it
    return args


# --- the arms' changes (instance attributes override the class's methods) ---------------------
def noskip_head(model) -> None:
    """log p = log_softmax(output_down_proj(norm_f(h)) @ emb.T + bias): no Gaussian skip."""

    def head(h, ctx, x_t):
        emb = model.embeddings()
        logits = model.output_down_proj(model.norm_f(h)).float() @ emb.T + model.out_bias
        logits[..., model.mask_id] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    model.head = head


def znorm_stem(model) -> None:
    """LN(LN_z(up(z)) + pos) + gain * time_embed(t), gain a learned scalar starting at 0.1."""
    dim = model.cfg.hidden_dim
    model.z_norm = nn.LayerNorm(dim)
    model.t_gain = nn.Parameter(torch.tensor(0.1))

    def stem(x_t, t):
        b, seq = x_t.shape[:2]
        t = torch.full((b,), model.cfg.t_min) if t is None else t.float()
        t = t.to(x_t.device)
        z = x_t.float()  # the pilot only feeds noisy embeddings, never token ids
        h = model.LayerNorm(model.z_norm(model.input_up_proj(z)) + model.position_embeddings[:seq])
        h = h + model.t_gain * model.time_embed(time_features(t, dim))[:, None]
        return h, BlockContext({"batch_z": z, "batch_t": t})

    model.stem = stem


def flag_stem(model, init_std: float = 0.0) -> dict:
    """Stem output + flag_embedding[clean]: returns the holder through which cond's loss marks the
    clean positions for one forward; with the holder empty every position is flagged noisy."""
    model.flag_embedding = nn.Embedding(2, model.cfg.hidden_dim)  # "embedding": no weight decay
    nn.init.zeros_(model.flag_embedding.weight)  # starts as the unflagged cond arm
    if init_std > 0:  # its own generator: the model's and the data's draws stay plain's
        gen = torch.Generator().manual_seed(4242)
        with torch.no_grad():
            model.flag_embedding.weight.copy_(
                init_std * torch.randn(2, model.cfg.hidden_dim, generator=gen)
            )
    plain_stem, holder = model.stem, {"clean": None}

    def stem(x_t, t):
        h, ctx = plain_stem(x_t, t)
        clean = holder["clean"]
        if clean is None:  # the bound, the diagnosis, unconditioned training
            clean = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        return h + model.flag_embedding(clean.long()), ctx

    model.stem = stem
    model.flag_holder = holder  # the diagnosis' `clean` column flags its clean positions
    return holder


def cond_loss(model, seed: int, frac: float, holder: dict | None = None) -> None:
    """Training loss with half the sequences partly clean: bound_terms' noise draw (keyed by u),
    then a random `frac` of positions set to e_w and dropped from every per-position term.
    `holder` (from flag_stem): where the clean mask goes for the stem's flag."""
    gen = torch.Generator().manual_seed(seed + 7919)  # own stream: plain's draws unchanged

    def loss(x0, t, u):
        emb = model.embeddings()
        e = emb[x0]
        eps = keyed_normal(row_keys(u), BOUND_STREAM, tuple(e.shape[1:]))
        z = model.noised(x0, t, eps)
        b, length = x0.shape
        seqs = torch.rand(b, 1, generator=gen) < 0.5
        clean = (seqs & (torch.rand(b, length, generator=gen) < frac)).to(x0.device)
        z = torch.where(clean[..., None], e, z)
        if holder is not None:
            holder["clean"] = clean
        try:
            log_probs = model.log_probs(z, t)
        finally:
            if holder is not None:
                holder["clean"] = None
        ce = -log_probs.gather(-1, x0[..., None]).squeeze(-1)
        t0 = torch.full_like(t, model.cfg.t_min)
        z0 = model.noised(x0, t0, eps)
        scale0 = model.schedule.alpha(t0) / model.schedule.sigma(t0) ** 2
        logits0 = scale0[:, None, None] * (z0 @ emb.T)
        logits0[..., model.mask_id] = float("-inf")
        recon = -torch.log_softmax(logits0, -1).gather(-1, x0[..., None]).squeeze(-1)
        per_pos = ce + recon + model.schedule.prior_kl(e)  # [B, L]
        return (per_pos * (~clean)).sum(-1)

    model.training_loss = loss


def make(args: argparse.Namespace, log_unigram: torch.Tensor):
    base = argparse.Namespace(**vars(args) | {"arm": "plain"})
    model = build(base, log_unigram)  # same init as diagnose's plain arm; new modules after
    if args.arm == "noskip":
        noskip_head(model)
    elif args.arm == "znorm":
        znorm_stem(model)
    elif args.arm == "cond":
        holder = flag_stem(model, args.flag_init) if args.flag else None
        cond_loss(model, args.seed, args.cond_frac, holder)
    elif args.arm == "pert":
        model.cfg.independent_t, model.cfg.level_jitter = args.independent_t, args.jitter
    return model.to(args.device)


def gaps(s: dict) -> dict:
    """Positive = the net does better than with that input removed (nats/token)."""
    return {
        "reads_z_blind_minus_net": round(s["blind"] - s["net"], 3),
        "reads_ctx_noise_minus_net_t": round(s["noise"] - s["net_t"], 3),
        "reads_ctx_shuf_minus_net_t": round(s["shuf"] - s["net_t"], 3),
        "reads_clean_ctx_noise_minus_clean": round(s["noise"] - s["clean"], 3),
        "net_minus_uni": round(s["net"] - s["uni"], 3),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.label = args.arm + (" flag" if args.flag else "")
    if args.arm == "pert":
        args.label += f" {args.independent_t}" + (f" jitter {args.jitter}" if args.jitter else "")
    train_part, xv, xd, log_unigram = split_tokens(args)
    model = make(args, log_unigram)
    head = {"arm": args.label, "params": sum(q.numel() for q in model.parameters())}
    head["unigram_ce_heldout"] = round(-log_unigram[xv].mean().item(), 3)
    log_unigram, xv, xd = (x.to(args.device) for x in (log_unigram, xv, xd))
    print(json.dumps(head | {"step": 0} | bound(model, xv)), flush=True)
    steps = train(model, train_part, xv, args)
    print(json.dumps({"arm": args.label, "steps": steps} | bound(model, xv)), flush=True)
    if hasattr(model, "t_gain"):
        print(json.dumps({"arm": args.label, "t_gain": round(model.t_gain.item(), 4)}), flush=True)
    start = time.time()
    rows = diagnose(model, xd, log_unigram, args)
    s = summary(rows, args.label) | {"unigram_ce_windows": round(-log_unigram[xd].mean().item(), 3)}
    s |= gaps(s) | {"diag_s": round(time.time() - start)}
    for r in rows + [s]:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
