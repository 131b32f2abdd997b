"""CPU pilot behind `final_norm` (docs/models.md, "Why diffusionlm-base's denoiser added
nothing"): the same Diffusion-LM, with and without the LayerNorm before the head's tanh, trained
for the same wall time from the same seed; every 25 steps the rms of the head's input and the
share of tanh pre-activations beyond |3| (where sech^2 < 0.01 passes almost no gradient), then
held-out bounds (nats/token) of the network, the skip-only head, the skip head plus the
unigram, the model without its blocks, and the model with INT4 blocks.

    faircalib data assemble-tokens DIR --out tokens.npy --tokenizer TOK --manifest M
    python scripts/pilots/diffusionlm_final_norm.py --arm norm --tokens tokens.npy --wall 420

(DIR: one or more pieces of `.gpu/tokens`; the recorded run used piece 0, 4 M tokens.)
"""

import argparse
import json
import time

import numpy as np
import torch

from faircalib.models.io import build_model
from faircalib.models.objective import stratified_times

BATCH, LENGTH, VOCAB = 16, 128, 8192


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", choices=["norm", "plain"], required=True)
    p.add_argument("--tokens", required=True, help="an int token .npy (assemble-tokens)")
    p.add_argument("--wall", type=float, default=420.0, help="training seconds")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args()


def train(model, stream: torch.Tensor, args) -> int:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    seen = {}
    model.output_down_proj.register_forward_hook(
        lambda mod, i, o: seen.update(h=i[0].detach(), pre=mod[0](i[0]).detach())
    )
    start, step = time.time(), 0
    while time.time() - start < args.wall:
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(stream) - LENGTH, (BATCH,), generator=gen)
        x0 = torch.stack([stream[i : i + LENGTH] for i in idx.tolist()])
        t, u = stratified_times(BATCH, gen), torch.rand(BATCH, LENGTH, generator=gen)
        loss = model.training_loss(x0, t, u).mean() / LENGTH
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            h, pre = seen["h"], seen["pre"]
            row = {"arm": args.arm, "step": step, "s": round(time.time() - start)}
            row |= {"loss": round(loss.item(), 3), "rms_h": round(h.pow(2).mean().sqrt().item(), 2)}
            row["saturated"] = round((pre.abs() > 3).float().mean().item(), 3)
            print(json.dumps(row), flush=True)
        step += 1
    return step


@torch.no_grad()
def bound(model, xv: torch.Tensor, head_bias: torch.Tensor | None = None, skip=False) -> float:
    """Held-out bound, nats/token, on 40 fixed t's; skip: the network's output zeroed (the
    exact Gaussian likelihood alone), head_bias: log-probabilities added to the logits."""
    hook = None
    if skip:
        hook = model.output_down_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    if head_bias is not None:
        old = model.head
        model.head = lambda h, c, x: torch.log_softmax(old(h, c, x) + head_bias, -1)
    ts = torch.linspace(0, 1, 81)[1::2] * (1 - 1e-3) + 1e-3
    total = 0.0
    for i, t in enumerate(ts):
        u = torch.rand(*xv.shape, generator=torch.Generator().manual_seed(i))
        total += model.nelbo(xv, torch.full((len(xv),), float(t)), u).mean().item()
    if hook is not None:
        hook.remove()
    if head_bias is not None:
        del model.head
    return round(total / LENGTH / len(ts), 3)


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    cfg = dict(family="diffusion_lm", vocab_size=VOCAB, mask_id=1, seq_len=LENGTH, embed_dim=128)
    cfg |= dict(hidden_dim=128, n_blocks=args.blocks, n_heads=4, mlp_ratio=4)
    model = build_model({**cfg, "final_norm": args.arm == "norm"})
    stream = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    train_part, val = stream[:-200_000], stream[-200_000:]
    steps = train(model, train_part, args)
    model.eval()
    counts = torch.bincount(train_part, minlength=VOCAB).float() + 0.5
    log_unigram = (counts / counts.sum()).log()
    xv = val[: 8 * LENGTH].view(8, LENGTH)
    res = {"net": bound(model, xv), "skip": bound(model, xv, skip=True)}
    res["unigram"] = bound(model, xv, log_unigram, skip=True)
    blocks, model.blocks = model.blocks, torch.nn.ModuleList()  # the head reads the stem
    res["no_blocks"] = bound(model, xv)
    model.blocks = blocks
    with torch.no_grad():  # INT4 RTN (per-row abs-max) of every block linear
        for lin in (m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)):
            s = lin.weight.abs().amax(1, keepdim=True) / 7
            lin.weight.copy_((lin.weight / s).round().clamp(-8, 7) * s)
    res["int4_blocks"] = bound(model, xv)
    unigram_ce = round(-log_unigram[xv].mean().item(), 3)
    print(json.dumps({"arm": args.arm, "steps": steps, "final": res, "unigram_ce": unigram_ce}))


if __name__ == "__main__":
    main()
