"""CPU pilot: does training the Diffusion-LM on its own bound (VDM: `nelbo` = diffusion + recon +
prior) instead of CDCD's cross-entropy (`training_loss`) take the held-out bound below the
unigram level, where the CE-trained denoiser plateaus (diffusionlm_selfcond.py's plain arm)?
The model is that pilot's plain arm (4 blocks x 256, 4 heads, seq 64, embed_dim 128,
final_norm, --bias on). `--loss ce`: as now, t stratified-uniform. `--loss bound`: the nelbo
per token with t importance-sampled: a running mean of the diffusion integrand over N_BINS
equal t-bins, q(bin) = 1/2 its normalised histogram + 1/2 uniform, t drawn by inverting q's
CDF at the same stratified uniforms the ce arm uses as t (so the arms share every random
draw), and the diffusion term weighted by 1 / (N_BINS q(bin)) so the loss stays an unbiased
estimate of the bound. Every `--every` steps: the held-out bound (nats/token) and its
diffusion share, exactly as diffusionlm_selfcond.py computes them.

    OMP_NUM_THREADS=1 python scripts/pilots/diffusionlm_boundloss.py --loss {ce,bound} \
        --tokens tokens.npy --wall 900

(tokens: as for diffusionlm_selfcond.py, piece 0; run the arms side by side, one core each.)
"""

import argparse
import json
import time

import numpy as np
import torch
from diffusionlm_diagnose import spread_windows

from faircalib.models.io import build_model
from faircalib.models.objective import stratified_times

VOCAB, N_VAL, N_T, N_BINS, T_MIN = 8192, 8, 16, 32, 1e-3


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=("ce", "bound"), default="ce", help="the trained objective")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--tokens", required=True, help="an int token .npy (assemble-tokens)")
    p.add_argument("--wall", type=float, default=900.0, help="training seconds (evals excluded)")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=50, help="steps between held-out bounds")
    p.add_argument("--no-bias", dest="bias", action="store_false", help="drop the logit bias")
    p.add_argument("--seed", type=int, default=0, help="init and data order (not the eval)")
    return p.parse_args()


def build(args: argparse.Namespace):
    torch.manual_seed(args.seed)
    cfg = dict(family="diffusion_lm", vocab_size=VOCAB, mask_id=1, seq_len=args.length)
    cfg |= dict(embed_dim=args.embed_dim, hidden_dim=args.hidden, n_blocks=args.blocks)
    cfg |= dict(n_heads=4, mlp_ratio=4, final_norm=True)
    return build_model(cfg)


@torch.no_grad()
def bound(model, xv: torch.Tensor) -> dict:
    """Held-out bound and its diffusion term, nats/token, over N_T fixed midpoint t's with
    fixed noise (diffusionlm_selfcond.py's `bound`, without its head_bias option)."""
    was_training = model.training
    model.eval()
    ts = (torch.arange(N_T) + 0.5) / N_T * (1 - T_MIN) + T_MIN
    total = diffusion = 0.0
    for i, t in enumerate(ts):
        u = torch.rand(*xv.shape, generator=torch.Generator().manual_seed(i))
        terms = model.bound_terms(xv, torch.full((len(xv),), float(t)), u)
        total += (terms["diffusion"] + terms["recon"] + terms["prior"]).mean().item()
        diffusion += terms["diffusion"].mean().item()
    model.train(was_training)
    per = xv.shape[1] * len(ts)
    return {"bound": round(total / per, 3), "diffusion": round(diffusion / per, 3)}


def add_bias(model, log_unigram: torch.Tensor) -> None:
    """--bias: a learned per-token logit bias started at the training unigram (as the selfcond
    pilot)."""
    model.out_bias = torch.nn.Parameter(log_unigram.clone())
    plain = type(model).head
    model.head = lambda h, c, x: torch.log_softmax(plain(model, h, c, x) + model.out_bias, -1)


class TimeSampler:
    """Importance sampler over t: a running mean of the bound's diffusion integrand per t-bin,
    q = 1/2 histogram + 1/2 uniform (the uniform half keeps every bin visited and the weight
    1 / (N_BINS q) at most 2)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.hist, self.decay = torch.ones(N_BINS), decay  # flat start: q uniform at step 0

    def q(self) -> torch.Tensor:
        return 0.5 * self.hist / self.hist.sum() + 0.5 / N_BINS

    def draw(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """s: uniforms in [0, 1) (stratified) -> t, its bin, its weight 1 / (N_BINS q(bin))."""
        q = self.q()
        cdf = torch.cat([torch.zeros(1), q.cumsum(0)])
        b = (torch.searchsorted(cdf, s, right=True) - 1).clamp(0, N_BINS - 1)
        frac = ((s - cdf[b]) / q[b]).clamp(0, 1)  # uniform within the bin
        x = (b + frac) / N_BINS  # in [0, 1); t as stratified_times maps it
        return x * (1 - T_MIN) + T_MIN, b, 1.0 / (N_BINS * q[b])

    def update(self, b: torch.Tensor, integrand: torch.Tensor) -> None:
        for i, v in zip(b.tolist(), integrand.tolist(), strict=True):
            self.hist[i] = self.decay * self.hist[i] + (1 - self.decay) * v


def loss_of(model, x0, s, u, sampler: TimeSampler | None) -> torch.Tensor:
    """Per-token training loss; s: the stratified draws (the ce arm's t)."""
    if sampler is None:
        return model.training_loss(x0, s, u).mean() / x0.shape[1]
    t, b, w = sampler.draw((s - T_MIN) / (1 - T_MIN))
    terms = model.bound_terms(x0, t, u)
    sampler.update(b, terms["diffusion"].detach() / x0.shape[1])
    nelbo = w * terms["diffusion"] + terms["recon"] + terms["prior"]
    return nelbo.mean() / x0.shape[1]


def train(model, stream: torch.Tensor, xv: torch.Tensor, args: argparse.Namespace) -> int:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed)  # same batches and t/u draws in every arm
    sampler = TimeSampler() if args.loss == "bound" else None
    trained, step, losses = 0.0, 0, []
    while trained < args.wall:
        start = time.time()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(stream) - args.length, (args.batch,), generator=gen)
        x0 = torch.stack([stream[i : i + args.length] for i in idx.tolist()])
        s, u = stratified_times(args.batch, gen), torch.rand(x0.shape, generator=gen)
        loss = loss_of(model, x0, s, u, sampler)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        trained += time.time() - start  # evals below are not charged to the arm's wall time
        losses.append(loss.item())
        step += 1
        if step % args.every == 0:
            row = {"arm": args.loss, "seed": args.seed, "step": step, "s": round(trained)}
            row |= {"loss": round(sum(losses) / len(losses), 3)} | bound(model, xv)
            if sampler is not None:  # where q puts its mass: the top bin and its share
                q = sampler.q()
                row |= {"q_top_bin": int(q.argmax()), "q_top": round(q.max().item(), 3)}
            print(json.dumps(row), flush=True)
            losses = []
    return step


def main() -> None:
    args = parse()
    model = build(args)
    stream = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    train_part, val = stream[:-200_000], stream[-200_000:]
    xv = spread_windows(val, N_VAL, args.length)  # not the tail's first windows: a template passage
    counts = torch.bincount(train_part, minlength=VOCAB).float()
    p = counts / counts.sum()
    log_unigram = ((counts + 0.5) / (counts + 0.5).sum()).log()
    head = {"arm": args.loss, "params": sum(q.numel() for q in model.parameters())}
    head["unigram_entropy"] = round(-(p[p > 0] * p[p > 0].log()).sum().item(), 3)
    head["unigram_ce_heldout"] = round(-log_unigram[xv].mean().item(), 3)
    if args.bias:
        add_bias(model, log_unigram)
    head["bias"] = args.bias
    print(json.dumps(head | {"step": 0} | bound(model, xv)), flush=True)
    steps = train(model, train_part, xv, args)
    final = {"arm": args.loss, "steps": steps, "net": bound(model, xv)["bound"]}
    print(json.dumps(final | {"unigram_ce_heldout": head["unigram_ce_heldout"]}), flush=True)


if __name__ == "__main__":
    main()
