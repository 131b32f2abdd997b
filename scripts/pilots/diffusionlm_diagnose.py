"""CPU pilot: where does a small Diffusion-LM's held-out bound on real text sit against the
unigram level, per noise level, and does an untied D -> V output layer (Plaid) change that?

The model is diffusionlm_selfcond.py's plain arm (4 blocks x 256, 4 heads, seq 64, embed_dim
128, final_norm, the log-unigram logit bias `--bias`), trained the same way (same seed, batches
and t/u draws). `--arm untied`: the logits come from a separate bias-free nn.Linear(D, V),
zero-initialised, on the final (normed) hidden state, plus the same Gaussian skip term and bias,
instead of output_down_proj -> tied embeddings. Every `--every` steps: the held-out bound
(nats/token) and its diffusion share, exactly as diffusionlm_selfcond.py computes them.

After training, `--diag-log` gets one line per log-SNR bin (`--bins` equal bins of t, i.e. of
gamma, over the schedule), averaged over `--t-per-bin` t's and fixed noise on held-out windows:
the bound's diffusion integrand (gamma_max - gamma_min)/2 SNR ||e_w - x_hat||^2 (nats/token;
the bound's diffusion term is its mean over bins), the cross-entropy -log p(w | z_t) and argmax
accuracy of p(w | z_t), for these denoisers of the same z_t:

* `net`: the trained model;
* `uni`: the exact posterior under the unigram prior from z_t,l alone (skip term + log
  unigram, no network): the level the bound plateaus at;
* `skipb`: the model's head with the network's logits zeroed (skip term + learned bias);
* `blind`: the network fed pure N(0, I) noise at every position, its own included (only the
  skip term sees z_t): if net ~ blind, the network reads nothing of z_t, only t;
* `noise`: the trained net with every other position's z replaced by pure N(0, I) noise
  (one pass per target position, `--targets` of them per window);
* `shuf`: the same, but the other positions hold another held-out window's z at the same t
  (in distribution, wrong context).
* `clean`: the same, but the other positions hold their own clean embeddings (flagged clean
  where the arm has a clean/noisy flag): the case CDCD's conditioning positions train; if
  clean < noise, the network reads clean context.

`net` is also scored on the same target positions (`net_t`) so the last three compare on equal
tokens. If net ~ noise ~ shuf, the network's output does not depend on context.

    OMP_NUM_THREADS=1 python scripts/pilots/diffusionlm_diagnose.py --arm {plain,untied} \
        --tokens tokens.npy --wall 480 --diag-log diag.log

`--band lo,hi` trains only on t's whose log-SNR lies in [lo, hi] (the same draws, mapped
linearly); `--save` keeps the trained state_dict for later probes.

`--device cuda` puts the model, batches and eval tensors on the GPU; every random draw is still
made on the CPU generators and then moved, so a CPU run is unchanged and a GPU run sees the same
batches, t's and noise. `--blocks`/`--hidden` size the network (defaults: the 4 x 256 of the
recorded logs); `--max-steps` stops training after that many steps whatever the wall.

(tokens: as for diffusionlm_selfcond.py, piece 0; run the arms side by side, one core each.)
"""

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from faircalib.models.base import BlockContext
from faircalib.models.io import build_model
from faircalib.models.objective import stratified_times
from faircalib.training import random_windows

VOCAB, N_VAL, N_T = 8192, 32, 16
NAMES = (
    "net",
    "uni",
    "skipb",
    "blind",
    "net_t",
    "noise",
    "shuf",
    "clean",
)  # the diagnosis' denoisers


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", choices=("plain", "untied"), default="plain")
    add_run_args(p, wall=480.0)
    p.add_argument("--save", default=None, help="state_dict path after training")
    p.add_argument("--band", default=None, help="'lo,hi': train only on t with gamma in it")
    p.add_argument("--diag-log", default=None, help="where the per-bin diagnosis goes")
    args = p.parse_args()
    if args.no_bias and args.arm == "untied":
        p.error("--no-bias: the untied head adds the bias; use --arm plain")
    return args


def add_run_args(p: argparse.ArgumentParser, wall: float) -> None:
    """Options shared with diffusionlm_readz.py: data, training, the diagnosis, and the
    device / network size / step cap."""
    p.add_argument("--tokens", required=True, help="an int token .npy (assemble-tokens)")
    p.add_argument("--wall", type=float, default=wall, help="training seconds (evals excluded)")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=50, help="steps between held-out bounds")
    p.add_argument("--seed", type=int, default=0, help="init and data order (not the eval)")
    p.add_argument("--bins", type=int, default=15, help="equal t bins: 1 nat of gamma each")
    p.add_argument("--t-per-bin", type=int, default=2)
    p.add_argument("--windows", type=int, default=16, help="held-out windows in the diagnosis")
    p.add_argument("--targets", type=int, default=8, help="context-free targets per window")
    p.add_argument(
        "--no-bias", action="store_true", help="no log-unigram logit bias (as faircalib train)"
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in training (as the trainer)")
    p.add_argument("--fused", action="store_true", help="fused AdamW (as the trainer on a GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss (as --compile)")
    p.add_argument(
        "--trainer-draws",
        action="store_true",
        help="batches, t and u drawn by the trainer's code on the device's generator",
    )
    add_scale_args(p)


def add_scale_args(p: argparse.ArgumentParser) -> None:
    """Device, network size and a step cap."""
    p.add_argument("--device", default="cpu", help="cpu or cuda; random draws stay on the CPU")
    p.add_argument("--blocks", type=int, default=4, help="transformer blocks")
    p.add_argument("--hidden", type=int, default=256, help="hidden width (4 heads)")
    p.add_argument("--max-steps", type=int, default=None, help="stop training after N steps")
    p.add_argument("--embed-dim", type=int, default=128, help="word-embedding width d")


# --- model ------------------------------------------------------------------------------------
def build(args: argparse.Namespace, log_unigram: torch.Tensor):
    """The selfcond pilot's plain arm with --bias; `untied` swaps the head."""
    torch.manual_seed(args.seed)
    cfg = dict(family="diffusion_lm", vocab_size=VOCAB, mask_id=1, seq_len=args.length)
    width = dict(embed_dim=getattr(args, "embed_dim", 128), hidden_dim=args.hidden)
    cfg |= width | dict(n_blocks=args.blocks, n_heads=4, mlp_ratio=4)
    model = build_model(cfg | dict(final_norm=True))
    if getattr(args, "no_bias", False):  # the model as `faircalib train` builds it
        return model
    model.out_bias = nn.Parameter(log_unigram.clone())  # the selfcond pilot's --bias
    model.head = untied_head(model) if args.arm == "untied" else biased_head(model)
    return model


def biased_head(model):
    plain = type(model).head
    return lambda h, c, x: torch.log_softmax(plain(model, h, c, x) + model.out_bias, -1)


def untied_head(model):
    """Logits = lm_head(norm_f(h)) + the Gaussian skip + bias; lm_head starts at zero, so the
    untrained model is the skip head plus the log-unigram bias."""
    model.lm_head = nn.Linear(model.cfg.hidden_dim, model.vocab_size, bias=False)
    nn.init.zeros_(model.lm_head.weight)

    def head(h, ctx, x_t):
        emb, sch = model.embeddings(), model.schedule
        z, t = ctx.tensors["batch_z"], ctx.tensors["batch_t"]
        scale = (sch.alpha(t) / sch.sigma(t) ** 2)[:, None, None]
        logits = model.lm_head(model.norm_f(h)).float() + scale * (z @ emb.T) + model.out_bias
        logits[..., model.mask_id] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    return head


# --- training and the held-out bound (as diffusionlm_selfcond.py) --------------------------------
@torch.no_grad()
def bound(model, xv: torch.Tensor) -> dict:
    """Held-out bound and its diffusion term, nats/token, over N_T fixed midpoint t's."""
    was_training = model.training
    model.eval()
    dev = xv.device
    ts = (torch.arange(N_T) + 0.5) / N_T * (1 - 1e-3) + 1e-3
    total = diffusion = 0.0
    for i, t in enumerate(ts):
        u = torch.rand(*xv.shape, generator=torch.Generator().manual_seed(i)).to(dev)
        terms = model.bound_terms(xv, torch.full((len(xv),), float(t), device=dev), u)
        total += (terms["diffusion"] + terms["recon"] + terms["prior"]).mean().item()
        diffusion += terms["diffusion"].mean().item()
    model.train(was_training)
    per = xv.shape[1] * len(ts)
    return {"bound": round(total / per, 3), "diffusion": round(diffusion / per, 3)}


def band_times(model, t: torch.Tensor, band: str) -> torch.Tensor:
    """Map t in (t_min, 1) linearly onto the t's whose gamma lies in band 'lo,hi'."""
    lo, hi = (float(v) for v in band.split(","))
    sch = model.schedule
    span = sch.gamma_max - sch.gamma_min
    t_lo, t_hi = (sch.gamma_max - hi) / span, (sch.gamma_max - lo) / span
    return t_lo + (t_hi - t_lo) * (t - 1e-3) / (1 - 1e-3)


def train(model, stream: torch.Tensor, xv: torch.Tensor, args: argparse.Namespace) -> int:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    # --fused / --compile / --trainer-draws: one piece of `faircalib train`'s loop each
    # (training.train), to find which of them keeps the trainer on the unigram plateau
    fused = getattr(args, "fused", False)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), fused=fused or None)
    gen = torch.Generator().manual_seed(args.seed)  # same batches and t/u draws in every arm

    def loss_fn(x0, t, u):
        return model.training_loss(x0, t, u).mean() / args.length

    if getattr(args, "compile", False):
        loss_fn = torch.compile(loss_fn)
    trainer_draws = getattr(args, "trainer_draws", False)
    if trainer_draws:  # the stream and the generator on the device, as training.train has them
        stream = stream.to(torch.int32).to(args.device)
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
    trained, step, losses = 0.0, 0, []
    while trained < args.wall and (args.max_steps is None or step < args.max_steps):
        start = time.time()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        if trainer_draws:
            x0 = random_windows(stream, args.batch, args.length, gen)
            t = stratified_times(args.batch, gen)
            u = torch.rand(x0.shape, generator=gen, device=args.device)
        else:
            idx = torch.randint(0, len(stream) - args.length, (args.batch,), generator=gen)
            x0 = torch.stack([stream[i : i + args.length] for i in idx.tolist()])
            t, u = stratified_times(args.batch, gen), torch.rand(x0.shape, generator=gen)
            x0, t, u = x0.to(args.device), t.to(args.device), u.to(args.device)  # CPU draws
        if args.band:  # the same draws, squeezed into the band's t interval
            t = band_times(model, t, args.band)
        # --bf16: the trainer's autocast (training.autocast) around the loss, nothing else
        with torch.autocast("cuda", torch.bfloat16, enabled=getattr(args, "bf16", False)):
            loss = loss_fn(x0, t, u)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())  # waits for the queued GPU step, so the wall below counts it
        trained += time.time() - start  # evals are not charged to the arm's wall time
        step += 1
        if step % args.every == 0:
            row = {"arm": args.label, "seed": args.seed, "step": step, "s": round(trained)}
            row |= {"loss": round(sum(losses) / len(losses), 3)} | bound(model, xv)
            print(json.dumps(row), flush=True)
            losses = []
    return step


# --- the per-bin diagnosis ---------------------------------------------------------------------
def scores(model, log_p: torch.Tensor, x0: torch.Tensor, t: float) -> torch.Tensor:
    """[..., V] log p(w | z_t) and true ids [...] -> [..., 3]: integrand, CE, argmax hit."""
    emb = model.embeddings()
    weight = model.schedule.diffusion_weight() * model.schedule.snr(torch.tensor(t)).item()
    integrand = weight * (emb[x0] - log_p.exp() @ emb).pow(2).sum(-1)
    ce = -log_p.gather(-1, x0[..., None]).squeeze(-1)
    hit = (log_p.argmax(-1) == x0).float()
    return torch.stack([integrand, ce, hit], dim=-1)


def unigram_posterior(model, z: torch.Tensor, t: float, log_unigram: torch.Tensor):
    """Exact p(w | z_t,l) under the unigram prior: the skip logits + log unigram."""
    emb, sch, tt = model.embeddings(), model.schedule, torch.tensor(t)
    logits = (sch.alpha(tt) / sch.sigma(tt) ** 2) * (z @ emb.T) + log_unigram
    logits[..., model.mask_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def at_positions(model, z: torch.Tensor, t: float, pos: torch.Tensor) -> torch.Tensor:
    """The net's log p(w_l | z) at one position per row: z [R, L, d], pos [R] -> [R, V]."""
    tt = torch.full((len(z),), t, device=z.device)
    h, ctx = model.stem(z, tt)
    for block in model.blocks:
        h = block(h, ctx)
    rows = torch.arange(len(z), device=z.device)
    one = BlockContext({"batch_z": z[rows, pos][:, None], "batch_t": tt})
    return model.head(h[rows, pos][:, None], one, None)[:, 0]


def net_zeroed(model, z: torch.Tensor, t: float) -> torch.Tensor:
    """The model's head with the network's logits zeroed: skip term + the learned bias."""
    layer = model.lm_head if hasattr(model, "lm_head") else model.output_down_proj
    hook = layer.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        return model.log_probs(z, torch.full((len(z),), t, device=z.device))
    finally:
        hook.remove()


def blind(model, z: torch.Tensor, t: float, fill: torch.Tensor) -> torch.Tensor:
    """The network fed `fill` at every position (its own too); only the skip sees z."""
    tt = torch.full((len(z),), t, device=z.device)
    h, ctx = model.stem(fill, tt)
    for block in model.blocks:
        h = block(h, ctx)
    return model.head(h, BlockContext({"batch_z": z, "batch_t": tt}), None)


def context_free(model, z, t, x0, pos, fill) -> torch.Tensor:
    """Scores at (window b, pos[b, k]) when every other position holds `fill` [N, L, d]."""
    n, k = pos.shape
    b = torch.arange(n, device=z.device).repeat_interleave(k)
    p = pos.reshape(-1)
    zz = fill[b].clone()
    zz[torch.arange(len(b), device=z.device), p] = z[b, p]
    return scores(model, at_positions(model, zz, t, p), x0[b, p], t)


def clean_context(model, z, t, x0, pos) -> torch.Tensor:
    """`context_free` with every other position at its clean embedding; an arm with a flag
    (`model.flag_holder`, diffusionlm_readz's cond arm) sees those positions flagged clean."""
    n, k = pos.shape
    b = torch.arange(n, device=z.device).repeat_interleave(k)
    p = pos.reshape(-1)
    zz = model.embeddings()[x0[b]].clone()
    rows = torch.arange(len(b), device=z.device)
    zz[rows, p] = z[b, p]
    holder = getattr(model, "flag_holder", None)
    if holder is not None:
        clean = torch.ones(zz.shape[:2], dtype=torch.bool, device=z.device)
        clean[rows, p] = False
        holder["clean"] = clean
    try:
        return scores(model, at_positions(model, zz, t, p), x0[b, p], t)
    finally:
        if holder is not None:
            holder["clean"] = None


@torch.no_grad()
def diagnose(model, xd: torch.Tensor, log_unigram: torch.Tensor, args) -> list[dict]:
    model.eval()
    n, length = xd.shape
    dev = xd.device  # the draws below stay on the CPU generator and are moved
    gen = torch.Generator().manual_seed(1234)  # fixed: both arms see the same noise
    pos = torch.stack([torch.randperm(length, generator=gen)[: args.targets] for _ in range(n)])
    pos = pos.to(dev)
    shift = torch.roll(torch.arange(n, device=dev), 1)  # another window for `shuf`
    rows = []
    for k in range(args.bins):
        acc = {name: [] for name in NAMES}
        for j in range(args.t_per_bin):
            t = 1e-3 + (1 - 1e-3) * (k + (j + 0.5) / args.t_per_bin) / args.bins
            eps = torch.randn(n, length, model.cfg.embed_dim, generator=gen).to(dev)
            tt = torch.full((n,), t, device=dev)
            z = model.noised(xd, tt, eps)
            net = scores(model, model.log_probs(z, tt), xd, t)
            acc["net"].append(net.reshape(-1, 3))
            acc["uni"].append(scores(model, unigram_posterior(model, z, t, log_unigram), xd, t))
            acc["uni"][-1] = acc["uni"][-1].reshape(-1, 3)
            acc["skipb"].append(scores(model, net_zeroed(model, z, t), xd, t).reshape(-1, 3))
            noise = torch.randn(z.shape, generator=gen).to(dev)
            acc["blind"].append(scores(model, blind(model, z, t, noise), xd, t).reshape(-1, 3))
            acc["net_t"].append(net[torch.arange(n, device=dev)[:, None], pos].reshape(-1, 3))
            noise = torch.randn(z.shape, generator=gen).to(dev)
            acc["noise"].append(context_free(model, z, t, xd, pos, noise))
            acc["shuf"].append(context_free(model, z, t, xd, pos, z[shift]))
            acc["clean"].append(clean_context(model, z, t, xd, pos))
        gamma = model.schedule.gamma(torch.tensor(1e-3 + (1 - 1e-3) * (k + 0.5) / args.bins))
        row = {"arm": args.label, "bin": k, "gamma": round(gamma.item(), 2)}
        for name, parts in acc.items():
            mean = torch.cat(parts).mean(0).tolist()
            row |= {f"{name}_I": round(mean[0], 3), f"{name}_ce": round(mean[1], 3)}
            row[f"{name}_acc"] = round(mean[2], 3)
        rows.append(row)
    return rows


def summary(rows: list[dict], arm: str) -> dict:
    """Diffusion term per denoiser: the integrand's mean over the equal-width t bins."""
    out = {"arm": arm, "summary": "diffusion term (nats/token) = mean integrand over bins"}
    for name in NAMES:
        out[name] = round(sum(r[f"{name}_I"] for r in rows) / len(rows), 3)
    return out


def spread_windows(val: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n windows of `length` at evenly spaced starts across `val`. Until 2026-11-30 (thirteenth
    session) the pilots took contiguous windows from the held-out tail's start; in piece 0
    those are a passage of unexpanded wiki-template markup whose repeats a model learns to copy,
    so "reading context" there was copying (benchmarks/results/pilots/README.md,
    thirteenth-session section)."""
    stride = (len(val) - length) // n
    return torch.stack([val[k * stride : k * stride + length] for k in range(n)])


def split_tokens(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """The token file -> (training stream, N_VAL bound windows, `--windows` diagnosis windows,
    log-unigram of the training stream, add-0.5 smoothed); the last 200k tokens are held out.
    One spread of N_VAL + windows starts over them is dealt into the two sets (every
    total/N_VAL-th start to the bound): both cover the whole tail and never share a window."""
    stream = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    train_part, val = stream[:-200_000], stream[-200_000:]
    total = N_VAL + args.windows
    windows = spread_windows(val, total, args.length)
    to_bound = torch.zeros(total, dtype=torch.bool)
    to_bound[(torch.arange(N_VAL) * total) // N_VAL] = True
    xv, xd = windows[to_bound], windows[~to_bound]
    counts = torch.bincount(train_part, minlength=VOCAB).float()
    return train_part, xv, xd, ((counts + 0.5) / (counts + 0.5).sum()).log()


def main() -> None:
    args = parse()
    args.label = args.arm + (f" band {args.band}" if args.band else "")
    train_part, xv, xd, log_unigram = split_tokens(args)
    model = build(args, log_unigram).to(args.device)
    head = {"arm": args.label, "params": sum(q.numel() for q in model.parameters())}
    head["unigram_ce_heldout"] = round(-log_unigram[xv].mean().item(), 3)
    log_unigram, xv, xd = (x.to(args.device) for x in (log_unigram, xv, xd))
    print(json.dumps(head | {"step": 0} | bound(model, xv)), flush=True)
    steps = train(model, train_part, xv, args)
    print(json.dumps({"arm": args.label, "steps": steps} | bound(model, xv)), flush=True)
    if args.save:
        torch.save(model.state_dict(), args.save)
    if args.diag_log:
        start = time.time()
        rows = diagnose(model, xd, log_unigram, args)
        # the unigram denoiser's diffusion term should match this (its bound is -log pi(w))
        check = {"unigram_ce_windows": round(-log_unigram[xd].mean().item(), 3)}
        lines = rows + [summary(rows, args.label) | check | {"diag_s": round(time.time() - start)}]
        with open(args.diag_log, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)


if __name__ == "__main__":
    main()
