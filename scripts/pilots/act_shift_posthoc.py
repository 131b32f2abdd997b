"""CPU pilot behind the learned transforms' input shift (docs/activation-quant.md, "The input
shift"): calibrate mdlm-small at W4A4 with a learned-transform method (no shift), then
subtract, after each linear's online transform, a per-layer mean of its transformed inputs
before the activation quantizer and add its exact share back after the GEMM. Modes: `none`
(the calibrated model through the same code path), `all` (one mean per layer), `mask` (the
[MASK] rows' mean on [MASK] rows only), `kind` (a mean for [MASK] rows and one for clean rows:
the masked/unmasked split, which needs each row's kind at inference). Means come from the
calibration rows; C4 validation bounds (first 64 sequences, 1 MC sample, same noise).

    python scripts/pilots/act_shift_posthoc.py --method flatquant-gptq --modes none,all,mask,kind
"""

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from faircalib import hub
from faircalib.calib.activations import ActCalibConfig, ActQuantLinear, quantize_activations_model
from faircalib.calib.inputs import masked_inputs
from faircalib.config import CalibConfig
from faircalib.data import calibration_batch, eval_sequences
from faircalib.eval import likelihood_bound
from faircalib.quant.activations import fake_quantize_activations
from faircalib.quant.flatquant import FlatQuantConfig


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="flatquant-gptq")
    p.add_argument("--steps", type=int, default=60, help="per-layer learned-transform steps")
    p.add_argument("--modes", default="none,all,mask,kind")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--eval-limit", type=int, default=64)
    return p.parse_args()


class RowKinds:
    """The [MASK]-row indicator of the current forward: set from x_t, read by the linears."""

    def __init__(self, model) -> None:
        self.current: torch.Tensor | None = None
        log_probs = model.log_probs  # what the bound and forward call

        def tracked(x_t: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
            self.current = (x_t == model.mask_id).long()
            return log_probs(x_t, t)

        model.log_probs = tracked


def layer_means(q, kinds: RowKinds, x_t, t) -> None:
    """Per ActQuantLinear: mean of its transformed inputs per row kind and over all rows."""
    mods = [m for m in q.modules() if isinstance(m, ActQuantLinear)]
    sums = {id(m): torch.zeros(2, m.in_features, dtype=torch.float64) for m in mods}
    counts = {id(m): torch.zeros(2, dtype=torch.float64) for m in mods}

    def hook(m, args):
        rows = m.transform_input(args[0]).reshape(-1, m.in_features).double()
        k = kinds.current.reshape(-1)
        sums[id(m)].index_add_(0, k, rows)
        counts[id(m)] += torch.bincount(k, minlength=2).double()

    handles = [m.register_forward_pre_hook(hook) for m in mods]
    with torch.no_grad():
        for i in range(0, len(x_t), 8):
            q(x_t[i : i + 8], t[i : i + 8])
    for h in handles:
        h.remove()
    for m in mods:
        m.mean_kind = (sums[id(m)] / counts[id(m)].clamp(min=1)[:, None]).float()
        m.mean_all = (sums[id(m)].sum(0) / counts[id(m)].sum()).float()


def shifted_forward(kinds: RowKinds, mode: dict):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = self.transform_input(x)
        k = kinds.current
        if mode["m"] == "kind":
            mu = self.mean_kind[k]
        elif mode["m"] == "mask":
            mu = self.mean_kind[1] * k[..., None]
        elif mode["m"] == "all":
            mu = self.mean_all.expand_as(xt)
        else:
            mu = torch.zeros_like(xt)
        w = self.weight.to(xt.dtype)
        y = F.linear(fake_quantize_activations(xt - mu, self.act, self.act_scale), w) + mu @ w.T
        return y if self.bias is None else y + self.bias.to(y.dtype)

    return forward


def main() -> None:
    args = parse()
    model = hub.load("mdlm-small", device="cpu")
    tok = hub.load_tokenizer("mdlm-small")
    tokens = calibration_batch(tok, "c4", "train", args.nsamples, 512, seed=0)
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=args.nsamples, seed=0))
    seqs, n_bytes = eval_sequences(tok, "c4", "validation", 512)
    n_bytes, seqs = round(n_bytes * args.eval_limit / len(seqs)), seqs[: args.eval_limit]

    def score(m) -> float:
        return likelihood_bound(m, seqs, n_bytes, mc_samples=1, progress=False, batch_size=8).ppl

    start = time.time()
    q = copy.deepcopy(model)
    flat = FlatQuantConfig(steps=args.steps, shift="none")
    quantize_activations_model(q, x_t, t, ActCalibConfig("w4a4", args.method, flat=flat))
    res = {"method": args.method, "calib_s": round(time.time() - start, 1)}
    res |= {"float": score(model), "calibrated": score(q)}
    kinds, mode = RowKinds(q), {"m": "none"}
    layer_means(q, kinds, x_t, t)
    ActQuantLinear.forward = shifted_forward(kinds, mode)  # this process only
    for name in args.modes.split(","):
        mode["m"] = name
        res[name] = score(q)
        print(json.dumps({name: res[name]}), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
