"""CPU pilot: does training with per-position noise levels (`independent_t`, `level_jitter`)
teach the Diffusion-LM the synthetic `perm` language (V = 32, L = 16) faster or further than
the shipped one-level-a-sequence training? (docs/models.md, "Per-position noise levels")

Every arm is diffusionlm_synthetic.py's tiny shipped model and training loop (same seed, same
batches, same t and u draws); only model.cfg's level fields differ, which the model's own
`training_loss` reads. The bound printed every `--every` steps is the script's SHARED-level
bound (one t a sequence, 16 midpoint t's, fixed keyed noise), the one the sampler and the
calibration see; at the end, the per-t CE and diffusion integrand (net, exact posterior, skip).

    OMP_NUM_THREADS=1 python scripts/pilots/diffusionlm_synthetic_levels.py --arm ind10 \
        --steps 12000 > benchmarks/results/pilots/diffusionlm_synthetic_levels-ind10.log
"""

import argparse
import json
import math
import time

import torch
from diffusionlm_synthetic import V, bound, language, per_t, tiny, train

from faircalib.models import build_model
from faircalib.models.objective import stratified_times

# arm -> (independent_t, level_jitter)
ARMS = {
    "shipped": (0.0, 0.0),
    "ind05": (0.5, 0.0),
    "ind10": (1.0, 0.0),
    "jit1": (1.0, 1.0),
    "jit2": (1.0, 2.0),
}
KIND, LENGTH = "perm", 16


def reseeded(seed: int) -> torch.nn.Module:
    """tiny()'s model with its initialisation drawn from `seed` (tiny() always uses 0)."""
    cfg = tiny(LENGTH).config_dict()
    torch.manual_seed(seed)
    return build_model(cfg)


def train_seeded(model: torch.nn.Module, seed: int, steps: int, every: int) -> torch.Tensor:
    """diffusionlm_synthetic.train with the batch, t and u draws from `seed` (same held-out xv,
    same optimiser and warm-up): a replicate of an arm on other data and initialisation."""
    gen = torch.Generator().manual_seed(seed)
    xv = language(KIND, 64, LENGTH, torch.Generator().manual_seed(999))
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
        x0 = language(KIND, 64, LENGTH, gen)
        t, u = stratified_times(64, gen), torch.rand(64, LENGTH, generator=gen)
        loss = model.training_loss(x0, t, u).mean() / LENGTH
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return xv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", choices=sorted(ARMS), required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=250, help="steps between bound rows")
    ap.add_argument("--seed", type=int, default=0, help="0: the shipped script's draws")
    ap.add_argument("--no-per-t", action="store_true", help="skip the final per-t terms")
    args = ap.parse_args()
    independent_t, level_jitter = ARMS[args.arm]
    model = tiny(LENGTH) if args.seed == 0 else reseeded(args.seed)
    # Set after building: tiny() builds the shipped config; training_loss reads these per call.
    model.cfg.independent_t, model.cfg.level_jitter = independent_t, level_jitter
    head = {"arm": args.arm, "independent_t": independent_t, "level_jitter": level_jitter}
    head |= {
        "language": KIND,
        "L": LENGTH,
        "steps": args.steps,
        "seed": args.seed,
        "unigram": round(math.log(V), 3),
    }
    print(json.dumps(head), flush=True)
    if args.seed == 0:
        xv = train(model, KIND, LENGTH, args.steps, args.every)
    else:
        xv = train_seeded(model, args.seed, args.steps, args.every)
    if not args.no_per_t:
        per_t(model, KIND, LENGTH, xv)


if __name__ == "__main__":
    main()
