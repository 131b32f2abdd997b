"""CPU pilot: does the Diffusion-LM read context on *real text* with the bound as its loss and
variance-optimal levels (`warp_on_bound`), where the cross-entropy objective does not?
(docs/models.md, "Variance-optimal levels")

The 8 k-token vocabulary makes a real-text step ~3.5 s on this CPU (the head is [B, L, V]), so
this pilot shrinks the vocabulary instead: characters of Wikipedia text (the 95 most frequent,
the rest folded into one id; id 0 is the unused mask). Training windows come from the first
documents of corpus part 0, held-out windows spread evenly over later documents (no copy-prone
passage decides it). Every arm is the same model, seed and batches; only the objective differs:

* `ce`: the shipped objective (cross-entropy of p(w | z_t) + rounding + prior), one level a
  sequence;
* `bound`: the bound's own diffusion term (`train_on_bound`);
* `vopt`: the bound with variance-optimal levels (`time_warp_bins` 32, `warp_on_bound`).

Printed every `--every` steps: the held-out bound (one level a sequence, 8 passes of stratified
t, fixed noise) in nats a character, beside the unigram model of the training characters.

    OMP_NUM_THREADS=1 python scripts/pilots/diffusionlm_chars.py --arm vopt --wall 600
"""

import argparse
import collections
import json
import lzma
import time
from pathlib import Path

import torch

from faircalib.models import build_model
from faircalib.models.objective import stratified_times

CORPUS = Path(__file__).resolve().parents[3] / "shared/data/corpus/enwiki-2015.part0.jsonl.xz"
N_CHARS, LENGTH, BATCH = 95, 64, 64
TRAIN_CHARS, HELD_OUT_WINDOWS = 4_000_000, 64
ARMS = {
    "ce": {},
    "bound": {"train_on_bound": True},
    "vopt": {"train_on_bound": True, "time_warp_bins": 32, "warp_on_bound": True},
}
torch.set_num_threads(1)
torch.set_flush_denormal(True)  # the lowest levels' softmax underflows: denormals halved a step


def read_text(limit: int) -> tuple[str, str]:
    """(training text, held-out text): documents in file order until `limit` characters, then
    the next documents up to a quarter of that."""
    train, held, size = [], [], 0
    with lzma.open(CORPUS, "rt") as f:
        for line in f:
            text = json.loads(line)["text"]
            (train if size < limit else held).append(text)
            size += len(text)
            if size >= limit * 1.25:
                break
    return "\n".join(train), "\n".join(held)


def encode(text: str, table: dict[str, int]) -> torch.Tensor:
    other = N_CHARS + 1  # ids 1..N_CHARS the frequent characters, N_CHARS + 1 the rest
    return torch.tensor([table.get(c, other) for c in text], dtype=torch.long)


def windows(stream: torch.Tensor, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """n windows of LENGTH: random starts (gen), or evenly spread over the stream (None)."""
    last = len(stream) - LENGTH
    spread = gen is None
    starts = (
        torch.linspace(0, last, n).long() if spread else torch.randint(0, last, (n,), generator=gen)
    )
    return torch.stack([stream[s : s + LENGTH] for s in starts.tolist()])


def unigram_nats(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train, minlength=vocab).double() + 1
    log_p = (counts / counts.sum()).log()
    return -log_p[held].mean().item()


@torch.no_grad()
def held_out_bound(model: torch.nn.Module, xv: torch.Tensor, passes: int = 8) -> float:
    """Mean per-character bound: `passes` passes over the windows, each with stratified
    levels over [t_min, 1) (`stratified_times`, as the trainer's validation draws them) from
    a fixed generator, and fixed keyed noise."""
    model.eval()
    gen, total = torch.Generator().manual_seed(1234), 0.0
    for _ in range(passes):
        t = stratified_times(len(xv), gen)
        u = torch.rand(xv.shape, generator=gen)
        total += model.nelbo(xv, t, u).mean().item() / LENGTH
    model.train()
    return total / passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", choices=sorted(ARMS), required=True)
    ap.add_argument("--wall", type=float, default=600, help="seconds of training")
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak rate (100 warm-up steps)")
    args = ap.parse_args()
    train_text, held_text = read_text(TRAIN_CHARS)
    common = collections.Counter(train_text).most_common(N_CHARS)
    table = {c: i + 1 for i, (c, _) in enumerate(common)}
    train, held = encode(train_text, table), encode(held_text, table)
    vocab = N_CHARS + 2
    xv = windows(held, HELD_OUT_WINDOWS, None)
    torch.manual_seed(args.seed)
    cfg = dict(family="diffusion_lm", vocab_size=vocab, mask_id=0, seq_len=LENGTH, embed_dim=16)
    cfg |= dict(hidden_dim=args.hidden, n_blocks=args.blocks, n_heads=args.hidden // 32)
    model = build_model({**cfg, "final_norm": True, **ARMS[args.arm]})
    head = {"arm": args.arm, **ARMS[args.arm], "seed": args.seed, "hidden": args.hidden}
    head |= {"blocks": args.blocks, "lr": args.lr, "train_chars": len(train)}
    head["held_out_chars"] = len(held)
    head["unigram"] = round(unigram_nats(train, xv.flatten(), vocab), 4)
    print(json.dumps(head), flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    start, step = time.time(), 0
    while True:
        elapsed = time.time() - start
        if step % args.every == 0 or elapsed > args.wall:
            row = {
                "step": step,
                "s": round(elapsed, 1),
                "bound": round(held_out_bound(model, xv), 4),
            }
            print(json.dumps(row), flush=True)
        if elapsed > args.wall:
            break
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100)
        x0 = windows(train, BATCH, gen)
        t, u = stratified_times(BATCH, gen), torch.rand(BATCH, LENGTH, generator=gen)
        loss = model.training_loss(x0, t, u).mean() / LENGTH
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1


if __name__ == "__main__":
    main()
