"""CPU pilot: does the Diffusion-LM *trunk* learn to read context when nothing Gaussian is left?

diffusionlm_input_table.py's `mlm-table` arm gave clean positions their ids through an MDLM-style
table and still read no context: so decoding e_w is not what blocks it. This pilot bisects the
rest. It builds the small pilot model (2 blocks x 128, embed_dim 128, final_norm) and trains it
as a plain masked LM on the mlm arm's masking (in half the sequences 60% of positions visible,
the rest hidden; the loss only at hidden positions), with no noise at all:

* input: a visible position gets table[w] (V x D), a hidden one a learned mask vector; plus the
  model's position embeddings, through the stem's LayerNorm (no time features: nothing is noised);
* the model's own `blocks` and `norm_f`;
* head `linear`: an untied nn.Linear(D, V) with its bias at the log-unigram;
  head `tied`: the Diffusion-LM's head without the skip term: output_down_proj(h) @ the
  normalised embeddings (norm sqrt(d)) + the log-unigram bias;
* arm `mdlm`, the control: the toolkit's MDLM of the same width, depth and heads (its own
  embedding, adaLN blocks with rotary positions, output layer), hidden positions fed as its
  mask token, its time input fixed at t = 0.4 (the hidden share); same data, masks, optimiser.

Every `--every` steps: cross-entropy at hidden positions of held-out windows with 60% visible
(`ctx`) and with nothing visible (`blind`); ctx < blind means the trunk reads context.

    OMP_NUM_THREADS=1 python diffusionlm_trunk_mlm.py {linear,tied,mdlm} tokens.npy STEPS \
        [LR [BATCH [DEVICE [WINDOWS]]]] > log

LR: the peak learning rate (default 1e-3, the pilots'; 50 warm-up steps, then constant);
BATCH: sequences a step (16); DEVICE: cpu or cuda (the draws stay on the CPU generators);
WINDOWS: held-out diagnosis windows (16; the eval adds the 8 bound windows). At batch 16 on
the CPU the eval moves by up to 0.3 nats between evaluations (a few hundred hidden tokens):
gains below ~0.05 are noise there; the GPU runs use 256 windows.
"""

import json
import sys
import time

import diffusionlm_readz as readz
import torch
from diffusionlm_diagnose import split_tokens
from torch import nn

LENGTH, VISIBLE = 64, 0.6


class TrunkMLM(nn.Module):
    def __init__(self, model, head: str, log_unigram: torch.Tensor) -> None:
        super().__init__()
        dim = model.cfg.hidden_dim
        self.m, self.head_kind = model, head
        gen = torch.Generator().manual_seed(5151)
        self.table = nn.Embedding(model.vocab_size, dim)
        with torch.no_grad():
            self.table.weight.copy_(0.3 * torch.randn(model.vocab_size, dim, generator=gen))
        self.mask_vec = nn.Parameter(0.3 * torch.randn(dim, generator=gen))
        self.bias = nn.Parameter(log_unigram.clone())
        if head == "linear":
            self.lm_head = nn.Linear(dim, model.vocab_size, bias=False)
            nn.init.zeros_(self.lm_head.weight)

    def log_probs(self, x0: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        m = self.m
        h = torch.where(visible[..., None], self.table(x0), self.mask_vec)
        h = m.LayerNorm(h + m.position_embeddings[: x0.shape[1]])
        ctx = None
        for block in m.blocks:
            h = block(h, ctx)
        h = m.norm_f(h)
        if self.head_kind == "linear":
            return torch.log_softmax(self.lm_head(h) + self.bias, -1)
        logits = m.output_down_proj(h) @ m.embeddings().T
        return torch.log_softmax(logits + self.bias, -1)


class MDLMControl(nn.Module):
    """The MDLM of the same size as a masked LM: hidden positions get its mask token."""

    def __init__(self, log_unigram: torch.Tensor) -> None:
        super().__init__()
        from faircalib.models.io import build_model

        torch.manual_seed(0)
        cfg = dict(
            family="mdlm", vocab_size=log_unigram.numel(), mask_id=1, seq_len=LENGTH, hidden_dim=128
        )
        self.m = build_model(cfg | dict(n_heads=4, n_blocks=2, cond_dim=32))

    def log_probs(self, x0: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x_in = torch.where(visible, x0, torch.full_like(x0, self.m.mask_id))
        return self.m.log_probs(x_in, torch.full((len(x0),), 0.4, device=x0.device))


def build(head: str, args, log_unigram: torch.Tensor) -> nn.Module:
    if head == "mdlm":
        return MDLMControl(log_unigram)
    return TrunkMLM(readz.make(args, log_unigram), head, log_unigram)


def draw_visible(b: int, gen: torch.Generator) -> torch.Tensor:
    """The mlm arm's pattern: in half the sequences 60% of positions visible, else none."""
    seqs = torch.rand(b, 1, generator=gen) < 0.5
    return seqs & (torch.rand(b, LENGTH, generator=gen) < VISIBLE)


@torch.no_grad()
def evaluate(net: TrunkMLM, xd: torch.Tensor) -> dict:
    gen = torch.Generator().manual_seed(99)
    visible = (torch.rand(xd.shape, generator=gen) < VISIBLE).to(xd.device)
    out = {}
    for name, vis in (("ctx", visible), ("blind", torch.zeros_like(visible))):
        ce = -net.log_probs(xd, vis).gather(-1, xd[..., None]).squeeze(-1)
        out[name] = round(ce[~visible].mean().item(), 4)  # the same hidden positions in both
    out["gain"] = round(out["blind"] - out["ctx"], 4)
    return out


def main(
    head: str,
    tokens: str,
    steps: str,
    lr: str = "1e-3",
    batch: str = "16",
    device: str = "cpu",
    windows: str = "16",
) -> None:
    size, dev = int(batch), torch.device(device)
    argv = ["--arm", "plain", "--tokens", tokens, "--blocks", "2", "--hidden", "128"]
    args = readz.parse(argv + ["--batch", batch, "--length", str(LENGTH), "--windows", windows])
    train_part, xv, xd, log_unigram = split_tokens(args)
    net = build(head, args, log_unigram)
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2 and "embed" not in n]
    decay = [p for p in decay if p is not getattr(net, "table", nn.Embedding(1, 1)).weight]
    ids = {id(p) for p in decay}
    rest = [p for p in net.parameters() if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    peak = float(lr)
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.98))
    gen, vgen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(7919)
    net, xd = net.to(dev), torch.cat([xv, xd]).to(dev)
    print(json.dumps({"head": head, "lr": peak, "step": 0} | evaluate(net, xd)), flush=True)
    start = time.time()
    for step in range(1, int(steps) + 1):
        for g in opt.param_groups:
            g["lr"] = peak * min(1.0, step / 50)
        idx = torch.randint(0, len(train_part) - LENGTH, (size,), generator=gen)
        x0 = torch.stack([train_part[i : i + LENGTH] for i in idx.tolist()])
        visible = draw_visible(size, vgen)
        x0, visible = x0.to(dev), visible.to(dev)
        ce = -net.log_probs(x0, visible).gather(-1, x0[..., None]).squeeze(-1)
        loss = (ce * ~visible).sum() / (~visible).sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            row = {"head": head, "step": step, "s": round(time.time() - start)}
            row["loss"] = round(loss.item(), 4)
            print(json.dumps(row | evaluate(net, xd)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
