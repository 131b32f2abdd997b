"""CPU pilot: does a narrower embedding (embed_dim 16 or 32, as in the Diffusion-LM paper and
Plaid) let a small Diffusion-LM's held-out bound on real text drop below the unigram level
within a few CPU minutes, where embed_dim 128 (diffusionlm-base's) does not? The arms differ
only in embed_dim: same seed, data order, t/u draws and training wall time. Every `--every`
steps: the held-out bound (model.nelbo over fixed t's and noise on fixed held-out sequences,
nats/token) and its diffusion share; the unigram levels are printed once at the start (the
entropy of the training tokens, the unigram's cross-entropy on the held-out sequences) and,
at the end, the bound of the arm's own skip head plus the unigram (what a denoiser that
ignores context reaches with these embeddings).

    faircalib data assemble-tokens DIR --out tokens.npy --tokenizer TOK --manifest M
    OMP_NUM_THREADS=1 python scripts/pilots/diffusionlm_width.py --embed-dim 16 \
        --tokens tokens.npy --wall 360

(DIR: piece 0 of `.gpu/tokens` and its manifest.json; run the arms side by side, one core each.)
"""

import argparse
import json
import time

import numpy as np
import torch
from diffusionlm_diagnose import spread_windows

from faircalib.models.io import build_model
from faircalib.models.objective import stratified_times

VOCAB, N_VAL, N_T = 8192, 8, 16


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embed-dim", type=int, required=True)
    p.add_argument("--tokens", required=True, help="an int token .npy (assemble-tokens)")
    p.add_argument("--wall", type=float, default=360.0, help="training seconds (evals excluded)")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=50, help="steps between held-out bounds")
    p.add_argument("--bias", action="store_true", help="a learned per-token logit bias")
    p.add_argument("--seed", type=int, default=0, help="init and data order (not the eval)")
    return p.parse_args()


def build(args: argparse.Namespace):
    torch.manual_seed(args.seed)
    cfg = dict(family="diffusion_lm", vocab_size=VOCAB, mask_id=1, seq_len=args.length)
    cfg |= dict(embed_dim=args.embed_dim, hidden_dim=args.hidden, n_blocks=args.blocks)
    return build_model(cfg | dict(n_heads=4, mlp_ratio=4, final_norm=True))


@torch.no_grad()
def bound(model, xv: torch.Tensor, head_bias: torch.Tensor | None = None) -> dict:
    """Held-out bound and its diffusion term, nats/token, over N_T fixed midpoint t's with
    fixed noise. head_bias: the network's output zeroed and these log-probabilities added to
    the class's own head (the skip head plus a context-free prior, any --bias dropped)."""
    was_training, hook, saved = model.training, None, model.__dict__.get("head")
    model.eval()
    if head_bias is not None:
        hook = model.output_down_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        plain = type(model).head
        model.head = lambda h, c, x: torch.log_softmax(plain(model, h, c, x) + head_bias, -1)
    ts = (torch.arange(N_T) + 0.5) / N_T * (1 - 1e-3) + 1e-3
    total = diffusion = 0.0
    for i, t in enumerate(ts):
        u = torch.rand(*xv.shape, generator=torch.Generator().manual_seed(i))
        terms = model.bound_terms(xv, torch.full((len(xv),), float(t)), u)
        total += (terms["diffusion"] + terms["recon"] + terms["prior"]).mean().item()
        diffusion += terms["diffusion"].mean().item()
    if hook is not None:
        hook.remove()
        del model.head
        if saved is not None:
            model.head = saved
    model.train(was_training)
    per = xv.shape[1] * len(ts)
    return {"bound": round(total / per, 3), "diffusion": round(diffusion / per, 3)}


def add_bias(model, log_unigram: torch.Tensor) -> None:
    """--bias: a learned per-token logit bias, started at the training unigram (the rounding
    head upstream's tied nn.Linear keeps; the tied head here has none)."""
    model.out_bias = torch.nn.Parameter(log_unigram.clone())
    plain = type(model).head
    model.head = lambda h, c, x: torch.log_softmax(plain(model, h, c, x) + model.out_bias, -1)


def train(model, stream: torch.Tensor, xv: torch.Tensor, args: argparse.Namespace) -> int:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed)  # same batches and t/u draws in every arm
    trained, step, losses = 0.0, 0, []
    while trained < args.wall:
        start = time.time()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(stream) - args.length, (args.batch,), generator=gen)
        x0 = torch.stack([stream[i : i + args.length] for i in idx.tolist()])
        t, u = stratified_times(args.batch, gen), torch.rand(x0.shape, generator=gen)
        loss = model.training_loss(x0, t, u).mean() / args.length
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        trained += time.time() - start  # evals below are not charged to the arm's wall time
        losses.append(loss.item())
        step += 1
        if step % args.every == 0:
            row = {"d": args.embed_dim, "seed": args.seed, "step": step, "s": round(trained)}
            row |= {"loss": round(sum(losses) / len(losses), 3)} | bound(model, xv)
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
    head = {"d": args.embed_dim, "params": sum(q.numel() for q in model.parameters())}
    head["unigram_entropy"] = round(-(p[p > 0] * p[p > 0].log()).sum().item(), 3)
    head["unigram_ce_heldout"] = round(-log_unigram[xv].mean().item(), 3)
    if args.bias:
        add_bias(model, log_unigram)
    head["bias"] = args.bias
    print(json.dumps(head | {"step": 0} | bound(model, xv)), flush=True)
    steps = train(model, train_part, xv, args)
    final = {"d": args.embed_dim, "steps": steps, "net": bound(model, xv)["bound"]}
    final["skip_unigram"] = bound(model, xv, log_unigram)["bound"]
    print(json.dumps(final | {"unigram_ce_heldout": head["unigram_ce_heldout"]}), flush=True)


if __name__ == "__main__":
    main()
