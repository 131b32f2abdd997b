"""CPU diagnostic: can the Diffusion-LM denoiser beat the unigram bound on a synthetic language
whose tokens are fixed by context? (docs/models.md, "Diffusion-LM on a synthetic language")

Languages over V = 32 tokens: `perm` (x_0 uniform, x_{i+1} = perm[x_{i}]) and `copy` (every
token equals x_0); both have entropy log(V) / L nats a token against a unigram log V. Printed:

* the bound of the exact-posterior denoiser (p(w | z) over the V paths) against log(V) / L:
  checks the bound's weights on correlated tokens;
* the bound of windowed exact posteriors (each position sees z within +-k): what a denoiser
  that uses k neighbours could reach;
* the tiny model trained with its own `training_loss` (arms: as shipped; an untied D -> V
  output layer; a zero-initialised head read against unit-norm embeddings), and per-t terms.

    OMP_NUM_THREADS=1 python scripts/pilots/diffusionlm_synthetic.py
"""

import json
import math
import time
import types

import torch
from torch import nn

from faircalib.models import build_model
from faircalib.models.objective import stratified_times

V = 32
torch.set_num_threads(1)


def language(kind: str, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[n, length] ids 1..V (0 is the mask id)."""
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(123))
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=gen)
    for i in range(1, length):
        x[:, i] = x[:, i - 1] if kind == "copy" else perm[x[:, i - 1]]
    return x + 1


def tiny(length: int, embed_dim: int = 16, arm: str = "shipped", seed: int = 0, warp: int = 0):
    """`warp`: the config's time_warp_bins (0 off; the weights' init does not depend on it)."""
    torch.manual_seed(seed)
    cfg = dict(family="diffusion_lm", vocab_size=V + 1, mask_id=0, seq_len=length)
    cfg |= dict(embed_dim=embed_dim, hidden_dim=64, n_blocks=2, n_heads=4, final_norm=True)
    cfg |= dict(time_warp_bins=warp)
    model = build_model(cfg)
    if arm != "shipped":
        model.head = types.MethodType(_head(model, arm), model)
    return model


def _head(model, arm: str):
    if arm == "untied":
        model.lm_head = nn.Linear(model.cfg.hidden_dim, model.vocab_size)
    else:  # unit: zero-initialised net logits against unit-norm embeddings
        with torch.no_grad():
            model.output_down_proj[2].weight.zero_()
            model.output_down_proj[2].bias.zero_()

    def head(self, h, ctx, x_t):
        emb = self.embeddings()
        z, t = ctx.tensors["batch_z"], ctx.tensors["batch_t"]
        scale = (self.schedule.alpha(t) / self.schedule.sigma(t) ** 2)[:, None, None]
        h = self.norm_f(h)
        unit = emb.T / math.sqrt(emb.shape[1])
        net = self.lm_head(h) if arm == "untied" else self.output_down_proj(h) @ unit
        logits = net + scale * (z @ emb.T)
        logits[..., self.mask_id] = float("-inf")
        return torch.log_softmax(logits, -1)

    return head


def windowed_oracle(model, kind: str, length: int, k: int):
    """Exact p(w_l | z_{l-k..l+k}) for the language (x_0 uniform)."""
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(123))
    if kind == "copy":
        perm = torch.arange(V)
    inv = torch.argsort(perm)

    def shift(steps: int) -> torch.Tensor:  # token at l + steps when w_l = w
        m = torch.arange(V)
        for _ in range(abs(steps)):
            m = perm[m] if steps > 0 else inv[m]
        return m

    maps = {s: shift(s) for s in range(-length, length + 1)}

    def log_probs(z, t):
        emb, sch = model.embeddings()[1:], model.schedule
        ll = (sch.alpha(t) / sch.sigma(t) ** 2)[:, None, None] * (z @ emb.T)
        out = torch.full((z.shape[0], length, V + 1), -1e30)
        for pos in range(length):
            acc = torch.zeros(z.shape[0], V)
            for j in range(max(0, pos - k), min(length, pos + k + 1)):
                acc += ll[:, j, maps[j - pos]]
            out[:, pos, 1:] = acc.log_softmax(-1)
        return out

    return log_probs


@torch.no_grad()
def bound(model, xv: torch.Tensor, n_t: int = 32) -> dict:
    """Terms per token, averaged over n_t midpoint t's (each with fixed keyed noise)."""
    model.eval()
    tot: dict[str, float] = {}
    for i in range(n_t):
        t = torch.full((len(xv),), (i + 0.5) / n_t * (1 - 1e-3) + 1e-3)
        u = torch.rand(xv.shape, generator=torch.Generator().manual_seed(10_000 + i))
        for key, v in model.bound_terms(xv, t, u).items():
            tot[key] = tot.get(key, 0.0) + v.mean().item() / xv.shape[1] / n_t
    model.train()
    tot["nelbo"] = tot["diffusion"] + tot["recon"] + tot["prior"]
    return {key: round(v, 3) for key, v in tot.items() if key in ("nelbo", "ce")}


def train(model, kind: str, length: int, steps: int, every: int, seed: int = 0) -> torch.Tensor:
    """`seed` draws the batches and t/u (the held-out xv stays fixed): 0 is the recorded log's."""
    gen = torch.Generator().manual_seed(seed)
    xv = language(kind, 64, length, torch.Generator().manual_seed(999))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)
    start = time.time()
    for step in range(steps + 1):
        if step % every == 0:
            row = {"step": step, "s": round(time.time() - start, 1), **bound(model, xv, 16)}
            print(json.dumps(row), flush=True)
        if step == steps:
            break
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        x0 = language(kind, 64, length, gen)
        t, u = stratified_times(64, gen), torch.rand(64, length, generator=gen)
        loss = model.training_loss(x0, t, u).mean() / length
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return xv


@torch.no_grad()
def per_t(model, kind: str, length: int, xv: torch.Tensor) -> None:
    """CE and diffusion integrand per token at fixed t: trained net, exact posterior, skip only."""
    oracle = windowed_oracle(model, kind, length, length)
    model.eval()
    for t in [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]:
        tt, u = torch.full((len(xv),), t), torch.rand(xv.shape, generator=torch.Generator())
        net = model.bound_terms(xv, tt, u)
        model.log_probs = oracle
        exact = model.bound_terms(xv, tt, u)
        del model.log_probs
        hook = model.output_down_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        skip = model.bound_terms(xv, tt, u)
        hook.remove()
        row = {"t": t, "gamma": round(model.schedule.gamma(torch.tensor(t)).item(), 1)}
        for name, terms in (("net", net), ("exact", exact), ("skip", skip)):
            row[name] = [round(terms[k].mean().item() / length, 3) for k in ("ce", "diffusion")]
        print(json.dumps(row), flush=True)
    model.train()


def main() -> None:
    print(json.dumps({"unigram": round(math.log(V), 3)}))
    for kind, length in (("perm", 16), ("perm", 2), ("copy", 16)):
        model = tiny(length)
        xv = language(kind, 64, length, torch.Generator().manual_seed(999))
        ladder = {}
        for k in sorted({0, 1, 2, 4, length - 1}):
            model.log_probs = windowed_oracle(model, kind, length, min(k, length - 1))
            ladder[f"window{k}"] = bound(model, xv)["nelbo"]
        del model.log_probs
        entropy = round(math.log(V) / length, 3)
        print(json.dumps({"language": kind, "L": length, "entropy": entropy, **ladder}))
    runs = [("copy", 16, "shipped", 1000), ("perm", 16, "shipped", 1500)]
    runs += [("perm", 2, arm, 3000) for arm in ("shipped", "untied", "unit")]
    for kind, length, arm, steps in runs:
        print(json.dumps({"train": kind, "L": length, "arm": arm}), flush=True)
        model = tiny(length, arm=arm)
        xv = train(model, kind, length, steps, steps // 4)
        if arm == "shipped" and kind == "perm" and length == 2:
            per_t(model, kind, length, xv)
    print(json.dumps({"train": "perm", "L": 2, "arm": "shipped", "embed_dim": 128}), flush=True)
    train(tiny(2, embed_dim=128), "perm", 2, 2000, 500)


if __name__ == "__main__":
    main()
