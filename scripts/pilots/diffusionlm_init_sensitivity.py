"""CPU check: how much the freshly initialised network's logits at position 0 move when the
neighbours' z, or its own, are replaced by noise (the readz pilots' plain arm, 2 x 128).

    python diffusionlm_init_sensitivity.py tokens.npy   # in scripts/pilots
"""

import sys

import diffusionlm_readz as readz
import torch
from diffusionlm_diagnose import split_tokens


def net_logits(model, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network's logits alone (no skip term, no bias)."""
    h, ctx = model.stem(z, t)
    for block in model.blocks:
        h = block(h, ctx)
    if model.norm_f is not None:
        h = model.norm_f(h)
    return model.output_down_proj(h).float() @ model.embeddings().T


def main(tokens: str) -> None:
    args = readz.parse(["--arm", "plain", "--tokens", tokens, "--blocks", "2", "--hidden", "128"])
    args.batch, args.length = 16, 64
    _, _, xd, log_unigram = split_tokens(args)
    model = readz.make(args, log_unigram).eval()
    x = xd[:4, :64]
    with torch.no_grad():
        for level in (0.05, 0.5, 0.9):
            t = torch.full((4,), level)
            z = model.noised(x, t, torch.randn(4, 64, model.cfg.embed_dim))
            base = net_logits(model, z, t)[:, 0]
            others = z.clone()
            others[:, 1:] = torch.randn_like(others[:, 1:])
            own = z.clone()
            own[:, 0] = torch.randn_like(own[:, 0])
            print(
                f"t {level}: logit std {base.std():.3f}, change when the neighbours are noise "
                f"{(base - net_logits(model, others, t)[:, 0]).std():.3f}, when its own z is "
                f"{(base - net_logits(model, own, t)[:, 0]).std():.3f}"
            )


if __name__ == "__main__":
    main(sys.argv[1])
