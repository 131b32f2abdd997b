"""Perplexity from the NELBO, MDLM's zero-shot protocol, with common random numbers.

Each sequence's bound is a Monte Carlo estimate over (t, mask) draws. The draws are a pure
function of (seed, sequence index, sample index): t is stratified over the whole evaluation
(one offset from the seed, then evenly spaced - MDLM's low-discrepancy sampler) and the mask
uniforms come from a generator seeded by the indices. Two models evaluated with one seed see
identical noise, so a small gap between a float and a quantized model is not estimator noise.

Under torchrun the batches are split across ranks (faircalib.distributed); a sequence's bound
depends only on its own batch and noise, so the gathered per-sequence values - and the result -
are bit-identical to one process's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from faircalib import distributed
from faircalib.errors import DataError
from faircalib.models.base import DiffusionLM
from faircalib.models.objective import nelbo_per_sequence

T_MIN = 1e-3


@dataclass
class BoundResult:
    ppl: float  # exp(NELBO per token): an upper bound on the model's token perplexity
    nll_per_token: float  # nats
    bits_per_byte: float  # tokenizer-independent
    tokens: int
    bytes: int
    sequences: int
    mc_samples: int
    ci95: tuple[float, float] | None  # 95% interval of the perplexity (over sequences; None: one)
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def draw_noise(
    seed: int, indices: list[int], sample: int, mc_samples: int, n_sequences: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """t: [B], u: [B, L] for sequences `indices` and Monte Carlo draw `sample`."""
    offset = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
    slots = n_sequences * mc_samples
    ts, us = [], []
    for i in indices:
        slot = sample * n_sequences + i  # draws of one sample index cover [0, 1) evenly
        ts.append(((offset + slot / slots) % 1.0) * (1 - T_MIN) + T_MIN)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + i) * 1_009 + sample)
        us.append(torch.rand(seq_len, generator=gen))
    return torch.tensor(ts), torch.stack(us)


@torch.no_grad()
def likelihood_bound(
    model: DiffusionLM,
    sequences: torch.Tensor,
    n_bytes: int,
    *,
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> BoundResult:
    """sequences: [N, L] clean token ids -> the NELBO perplexity bound and its interval."""
    model.eval()
    device = model.device
    n, seq_len = sequences.shape
    per_seq = torch.zeros(n, dtype=torch.float64)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    batches = distributed.shard(batches)  # this rank's share (all of them in one process)
    bar = tqdm(total=len(batches) * mc_samples, desc="eval", disable=not progress, mininterval=2)
    for k in range(mc_samples):
        for idx in batches:
            t, u = draw_noise(seed, idx, k, mc_samples, n, seq_len)
            x0 = sequences[idx].to(device)
            per_seq[idx] += nelbo_per_sequence(model, x0, t.to(device), u.to(device)).double().cpu()
            bar.update()
    bar.close()
    # each sequence was summed on one rank, zeros elsewhere: the all-reduce is exact
    per_seq = distributed.all_reduce_sum(per_seq)
    per_seq /= mc_samples
    per_token = per_seq / seq_len  # [N]
    mean = per_token.mean().item()
    if not math.isfinite(mean):  # e.g. a [MASK] id among the clean tokens: no bound at all
        raise DataError(
            "the likelihood bound is not finite: some evaluation token has zero probability "
            "under the model (is the mask token, or a token past the model's vocabulary, in "
            "the data?)"
        )
    if n_bytes <= 0:
        raise DataError("the evaluated text covers no bytes: the data holds no text")
    # one sequence has no spread to estimate: no interval (None, not an infinite one)
    half = 1.96 * per_token.std().item() / math.sqrt(n) if n > 1 else None
    return BoundResult(
        ppl=math.exp(mean),
        nll_per_token=mean,
        bits_per_byte=per_seq.sum().item() / (math.log(2) * n_bytes),
        tokens=n * seq_len,
        bytes=n_bytes,
        sequences=n,
        mc_samples=mc_samples,
        ci95=(math.exp(mean - half), math.exp(mean + half)) if half is not None else None,
        seed=seed,
    )
