"""How much of a Diffusion-LM training step is the noise draw? One model (the diffusionlm-base
preset at --blocks x --hidden), one batch shape, training steps timed side by side with the
bound's keyed CPU draw (`keyed_normal`, one CPU generator a row) and training's vectorised draw
(`hashed_normal`, on the device), alternating so both see the same machine state.

    python scripts/pilots/diffusionlm_noise_speed.py --device cuda [--blocks 4 --hidden 256]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from faircalib.models.diffusion_lm import BOUND_STREAM, TRAIN_STREAM
from faircalib.models.gaussian import hashed_normal, keyed_normal, row_keys
from faircalib.models.io import build_model as build_from_config
from faircalib.training import PRESETS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    cfg = PRESETS["diffusionlm-base"] | {"vocab_size": 8192, "mask_id": 1}
    cfg |= {"n_blocks": args.blocks, "hidden_dim": args.hidden, "n_heads": args.hidden // 64}
    torch.manual_seed(0)
    model = build_from_config(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    length, dim = cfg["seq_len"], cfg["embed_dim"]
    draws = {
        "keyed_cpu": lambda u: keyed_normal(row_keys(u), BOUND_STREAM, (length, dim)),
        "hashed_device": lambda u: hashed_normal(row_keys(u), TRAIN_STREAM, (length, dim)),
    }
    kind = args.device.split(":")[0]
    seconds = dict.fromkeys(draws, 0.0)
    for step in range(2 * args.steps + 4):
        name = list(draws)[step % 2]
        x0 = torch.randint(2, 8192, (args.batch, length), device=args.device)
        t = torch.rand(args.batch, device=args.device)
        u = torch.rand(args.batch, length, device=args.device)
        if kind == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(kind, torch.bfloat16, enabled=kind != "cpu"):
            eps = draws[name](u)
            terms = model.bound_terms(x0, t, u, eps=eps)
            loss = (terms["ce"] + terms["recon"] + terms["prior"]).mean() / length
        opt.zero_grad()
        loss.backward()
        opt.step()
        if kind == "cuda":
            torch.cuda.synchronize()
        if step >= 4:  # the first two of each are warm-up
            seconds[name] += time.perf_counter() - start
    ms = {k: round(1000 * v / args.steps, 2) for k, v in seconds.items()}
    row = {"device": args.device, "blocks": args.blocks, "hidden": args.hidden}
    row |= {"batch": args.batch, "seq_len": length, "ms_per_step": ms}
    row["speedup_hashed_vs_keyed"] = round(ms["keyed_cpu"] / ms["hashed_device"], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
