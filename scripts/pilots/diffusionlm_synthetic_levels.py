"""CPU pilot: does training with per-position noise levels (`independent_t`, `level_jitter`)
teach the Diffusion-LM the synthetic `perm` language (V = 32, L = 16) faster or further than
the shipped one-level-a-sequence training? (docs/models.md, "Per-position noise levels")

Every arm is diffusionlm_synthetic.py's tiny shipped model and training loop (same seed, same
batches, same t and u draws); only model.cfg's level fields differ, which the model's own
`training_loss` reads. The bound printed every `--every` steps is the script's SHARED-level
bound (one t a sequence, 16 midpoint t's, fixed keyed noise), the one the sampler and the
calibration see; at the end, the per-t CE and diffusion integrand (net, exact posterior, skip).
`--time-warp BINS` turns on the model's time warping (docs/models.md, "Time warping") in any arm.

    OMP_NUM_THREADS=1 python scripts/pilots/diffusionlm_synthetic_levels.py --arm ind10 \
        --steps 12000 > benchmarks/results/pilots/diffusionlm_synthetic_levels-ind10.log
"""

import argparse
import json
import math

from diffusionlm_synthetic import V, per_t, tiny, train

# arm -> (independent_t, level_jitter)
ARMS = {
    "shipped": (0.0, 0.0),
    "ind05": (0.5, 0.0),
    "ind10": (1.0, 0.0),
    "jit1": (1.0, 1.0),
    "jit2": (1.0, 2.0),
}
KIND, LENGTH = "perm", 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", choices=sorted(ARMS), required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=250, help="steps between bound rows")
    ap.add_argument("--seed", type=int, default=0, help="0: the shipped script's draws")
    ap.add_argument("--no-per-t", action="store_true", help="skip the final per-t terms")
    ap.add_argument("--time-warp", type=int, default=0, help="time_warp_bins (0: off)")
    ap.add_argument("--bound", action="store_true", help="train_on_bound (the VDM term)")
    ap.add_argument(
        "--warp-on-bound",
        action="store_true",
        help="with --time-warp: the variance-optimal levels, 1/q-weighted (warp_on_bound)",
    )
    args = ap.parse_args()
    independent_t, level_jitter = ARMS[args.arm]
    model = tiny(LENGTH, seed=args.seed, warp=args.time_warp)
    model.cfg.train_on_bound = args.bound  # read per call, as the level fields
    model.cfg.warp_on_bound = args.warp_on_bound
    # Set after building: tiny() builds the shipped config; training_loss reads these per call.
    model.cfg.independent_t, model.cfg.level_jitter = independent_t, level_jitter
    head = {"arm": args.arm, "independent_t": independent_t, "level_jitter": level_jitter}
    head |= {
        "language": KIND,
        "L": LENGTH,
        "steps": args.steps,
        "seed": args.seed,
        "time_warp_bins": args.time_warp,
        "train_on_bound": args.bound,
        "warp_on_bound": args.warp_on_bound,
        "unigram": round(math.log(V), 3),
    }
    print(json.dumps(head), flush=True)
    xv = train(model, KIND, LENGTH, args.steps, args.every, seed=args.seed)
    if not args.no_per_t:
        per_t(model, KIND, LENGTH, xv)


if __name__ == "__main__":
    main()
