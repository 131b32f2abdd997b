"""CPU pilot: the readz cond arm (60% of positions clean and flagged, in half the sequences)
trained only on near-pure-noise targets (log-SNR -9..-7.5): a masked LM in all but name. Does
the trunk learn to read clean context? The diagnosis' `clean` column against `noise` says.

    OMP_NUM_THREADS=1 python diffusionlm_mlm_check.py 1500 tokens.npy [zero-out]   # scripts/pilots

Training stops at 612 steps (the first run's count in 420 s) or at the wall, whichever first.

`zero-out`: the output projection's last layer starts at zero, so the untrained network adds
nothing to the skip term and the bias (MDLM's final layer starts so), where the default init
adds random logits of std ~3 (diffusionlm_init_sensitivity.py).
"""

import json
import sys

import diffusionlm_readz as readz
import torch
from diffusionlm_diagnose import bound, diagnose, split_tokens, summary, train

SHOWN = ("gamma", "net_t_ce", "noise_ce", "clean_ce", "uni_ce", "clean_acc", "noise_acc")


def main(wall: str, tokens: str, variant: str = "") -> None:
    args = readz.parse(
        ["--arm", "cond", "--flag", "--flag-init", "0.5", "--cond-frac", "0.6", "--tokens", tokens,
         "--blocks", "2", "--hidden", "128", "--batch", "16", "--length", "64", "--wall", wall,
         "--every", "400", "--max-steps", "612"]
    )  # fmt: skip
    args.band, args.label = "-9,-7.5", "cond flag band -9,-7.5"
    train_part, xv, xd, log_unigram = split_tokens(args)
    model = readz.make(args, log_unigram)
    if variant == "zero-out":
        torch.nn.init.zeros_(model.output_down_proj[-1].weight)
        torch.nn.init.zeros_(model.output_down_proj[-1].bias)
        args.label += " zero-out"
    steps = train(model, train_part, xv, args)
    print(json.dumps({"steps": steps} | bound(model, xv)), flush=True)
    rows = diagnose(model, xd, log_unigram, args)
    for r in rows[-6:]:
        print(json.dumps({k: r[k] for k in SHOWN}))
    s = summary(rows, args.label)
    print(json.dumps(s | readz.gaps(s)))


if __name__ == "__main__":
    main(*sys.argv[1:4])
