"""CPU pilot: is decoding a token from its 128-d embedding what keeps the Diffusion-LM trunk
from reading context? An MDLM looks each visible token up in its own hidden-width table; the
Diffusion-LM trunk sees only e_w (or a noisy z near it) through `input_up_proj`, a small MLP,
so a neighbour's identity must be decoded from a random-looking 128-d vector before it can
inform a prediction.

Three arms, each diffusionlm_readz.py's arm with one change, a learned V x D input table `T`
(added to input_up_proj(z) before the stem's LayerNorm, N(0, 0.3^2) at start, an "embedding":
no weight decay):

* `mlm-table`: diffusionlm_mlm_check.py's masked-LM arm (60% clean flagged positions in half
  the sequences, targets only at log-SNR -9..-7.5) where the clean positions also get T[w]
  (their ids are known). A diagnostic, not a model: if its `clean` column drops below
  `noise`, decoding e_w is the bottleneck.
* `mlm-quiet`: `mlm-table` with the noisy positions' z zeroed on the way into input_up_proj
  (the skip term still sees it): their input is fixed, like an MDLM's mask token, so their
  attention queries carry no noise. If this one reads context where `mlm-table` does not,
  the noise in the targets' own inputs is what blocks it.
* `pert-post`: the pert arm (`independent_t` 0.5, the diffusionlm-base preset) where every
  position gets the soft lookup p(w | z_l) @ T, p the exact posterior of z_l under a uniform
  prior at the position's own level (the skip term's softmax): a clean or low-noise
  neighbour becomes its table row, a pure-noise one the table's mean. It needs no ids, so it
  is a model: the bound, the sampler and calibration would run it as they are.

    OMP_NUM_THREADS=1 python diffusionlm_input_table.py {mlm-table,mlm-quiet,pert-post} tokens.npy \
        WALL MAX_STEPS [readz flags, e.g. --device cuda --batch 256] > log
                                  # from scripts/pilots; tokens: piece 0 (assemble-tokens)

The same seed, batches and t/u draws as the logs it is compared with
(diffusionlm_mlm_check.log.gz, diffusionlm_readz-small-pert05-long.log.gz).
"""

import json
import sys
import time

import diffusionlm_readz as readz
import torch
from diffusionlm_diagnose import bound, diagnose, split_tokens, summary, train
from torch import nn

from faircalib.models.base import BlockContext
from faircalib.models.diffusion_lm import per_position
from faircalib.models.gaussian import time_features

SHOWN = ("gamma", "net_t_ce", "noise_ce", "shuf_ce", "clean_ce", "uni_ce", "clean_acc")


def table_stem(model, lookup, quiet=None) -> None:
    """stem with `lookup(z, t) -> [B, L, D]` added to input_up_proj(z) before the LayerNorm;
    `quiet(z)`, if given, is what input_up_proj reads instead of z (the head's skip term still
    sees z)."""
    dim = model.cfg.hidden_dim
    gen = torch.Generator().manual_seed(5151)  # own stream: the model's init stays plain's
    model.input_table = nn.Embedding(model.vocab_size, dim)
    with torch.no_grad():
        model.input_table.weight.copy_(0.3 * torch.randn(model.vocab_size, dim, generator=gen))

    def stem(x_t, t):
        b, seq = x_t.shape[:2]
        t = torch.full((b,), model.cfg.t_min) if t is None else t.float()
        t, z = t.to(x_t.device), x_t.float()  # the pilots feed noisy embeddings only
        z_in = z if quiet is None else quiet(z)
        h = model.input_up_proj(z_in) + model.position_embeddings[:seq] + lookup(z, t)
        h = model.LayerNorm(h + model.time_embed(time_features(per_position(t), dim)))
        return h, BlockContext({"batch_z": z, "batch_t": t})

    model.stem = stem


def posterior_lookup(model):
    """p(w | z_l) under a uniform prior at each position's level, times the table."""

    def lookup(z, t):
        emb, sch = model.embeddings(), model.schedule
        scale = per_position(sch.alpha(t) / sch.sigma(t) ** 2)[..., None]
        logits = scale * (z @ emb.T)
        logits[..., model.mask_id] = float("-inf")
        return torch.softmax(logits, -1) @ model.input_table.weight

    return lookup


def mlm_table(args, log_unigram, quiet: bool = False):
    """mlm_check's arm; its clean positions (the flag holder's mask) add T[w]. `quiet`: the
    noisy positions' z is zeroed on the way into input_up_proj (an MDLM's mask token: a fixed
    input), so their queries carry no noise."""
    model = readz.make(args, log_unigram)
    holder, ids = model.flag_holder, {"x0": None}
    loss = model.training_loss

    def lookup(z, t):
        clean = holder["clean"]
        if clean is None or ids["x0"] is None:
            return torch.zeros(*z.shape[:2], model.cfg.hidden_dim, device=z.device)
        return model.input_table(ids["x0"]) * clean[..., None]

    def training_loss(x0, t, u):
        ids["x0"] = x0
        try:
            return loss(x0, t, u)
        finally:
            ids["x0"] = None

    def zero_noisy(z):
        clean = holder["clean"]
        if clean is None:
            return torch.zeros_like(z)
        return z * clean[..., None]

    # replaces the flag arm's stem: the flag goes back on top
    table_stem(model, lookup, zero_noisy if quiet else None)
    table = model.stem

    def stem(x_t, t):
        h, ctx = table(x_t, t)
        clean = holder["clean"]
        if clean is None:
            clean = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        return h + model.flag_embedding(clean.long()), ctx

    model.stem, model.training_loss = stem, training_loss
    model.table_ids = ids  # the diagnosis' `clean` column sets the ids it makes clean
    return model


def main(arm: str, tokens: str, wall: str, max_steps: str, *extra: str) -> None:
    if arm.startswith("mlm"):
        argv = ["--arm", "cond", "--flag", "--flag-init", "0.5", "--cond-frac", "0.6"]
    else:
        argv = ["--arm", "pert", "--independent-t", "0.5"]
    argv += ["--tokens", tokens, "--blocks", "2", "--hidden", "128", "--batch", "16"]
    argv += ["--length", "64", "--wall", wall, "--every", "250", "--max-steps", max_steps]
    argv += list(extra)  # e.g. --device cuda --batch 256 --windows 64 (later flags win)
    args = readz.parse(argv)
    args.label = arm
    if arm.startswith("mlm"):
        args.band = "-9,-7.5"
    train_part, xv, xd, log_unigram = split_tokens(args)
    if arm.startswith("mlm"):
        model = mlm_table(args, log_unigram, quiet=arm == "mlm-quiet")
    else:
        model = readz.make(args, log_unigram)
        table_stem(model, posterior_lookup(model))
    model = model.to(args.device)  # the table is made after readz.make moved the model
    log_unigram, xv, xd = (x.to(args.device) for x in (log_unigram, xv, xd))
    print(json.dumps({"arm": arm, "params": sum(p.numel() for p in model.parameters())}))
    print(json.dumps({"arm": arm, "step": 0} | bound(model, xv)), flush=True)
    steps = train(model, train_part, xv, args)
    print(json.dumps({"arm": arm, "steps": steps} | bound(model, xv)), flush=True)
    start = time.time()
    if arm.startswith("mlm"):
        rows = diagnose_with_ids(model, xd, log_unigram, args)
    else:
        rows = diagnose(model, xd, log_unigram, args)
    for r in rows:
        print(json.dumps({k: r[k] for k in SHOWN}))
    s = summary(rows, arm) | {"unigram_ce_windows": round(-log_unigram[xd].mean().item(), 3)}
    print(json.dumps(s | readz.gaps(s) | {"diag_s": round(time.time() - start)}), flush=True)


def diagnose_with_ids(model, xd, log_unigram, args):
    """diagnose(), with the table's ids available to the `clean` column: clean_context flags the
    other positions clean through the holder; each of its rows is one (window, target) pair,
    so the ids are the window's tokens repeated per target."""
    import diffusionlm_diagnose as dd

    plain_clean = dd.clean_context

    def clean_context(model, z, t, x0, pos):
        n, k = pos.shape
        model.table_ids["x0"] = x0.repeat_interleave(k, dim=0)
        try:
            return plain_clean(model, z, t, x0, pos)
        finally:
            model.table_ids["x0"] = None

    dd.clean_context = clean_context
    try:
        return diagnose(model, xd, log_unigram, args)
    finally:
        dd.clean_context = plain_clean


if __name__ == "__main__":
    main(*sys.argv[1:])
