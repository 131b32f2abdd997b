"""FAIR-Calib: frontier-aware, instability-weighted calibration (see FairCalibConfig).

The float model samples from calibration prompts with its own sampler; at the states it visits,
each frontier token is scored by how much its predictive distribution moves under quantization-
sized weight noise (KL(p_float || p_noisy)); those scores become per-row weights of the
calibration loss, so the quantizer spends its error budget away from the tokens whose decision
is closest to flipping - and a flipped frontier token is permanent in a dLLM.

Under torchrun the sampler runs (chunks of TRACK_BATCH prompts) and the instability scoring
(batches of states) are split across ranks and their results gathered, in an order that gives
every rank exactly the inputs and weights one process computes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from faircalib import distributed
from faircalib.calib.streaming import (
    NoiseFn,
    device_budget,
    on_device,
    plan_batch,
    quantization_noise,
)
from faircalib.config import FairCalibConfig, QuantConfig
from faircalib.frontier import SamplerConfig, generate, position_prior
from faircalib.models.base import DiffusionLM
from faircalib.quant import quantize_rtn

TRACK_BATCH = 32  # prompts per sampler run during frontier tracking (fewer if memory requires)
SCORE_BATCH = 16  # states per instability-scoring forward (fewer if memory requires)


@dataclass
class FrontierStates:
    x_t: torch.Tensor  # [N, L] states the sampler visited (one per prompt)
    t: torch.Tensor  # [N]
    frontier: torch.Tensor  # [N, L] bool: committed within `window` steps of the state


def tracking_sampler(cfg: FairCalibConfig, seq_len: int) -> tuple[int, SamplerConfig]:
    """(prompt length, sampler) of frontier tracking on calibration texts of `seq_len` tokens."""
    prefix = min(cfg.prefix_len, seq_len // 2)
    gen_length = seq_len - prefix
    steps = max(1, min(cfg.steps, gen_length))
    while gen_length % steps:  # the sampler needs steps | gen_length for an even schedule
        steps -= 1
    return prefix, SamplerConfig(sampler=cfg.sampler, steps=steps, gen_length=gen_length)


@torch.no_grad()
def track_frontier(
    model: DiffusionLM,
    tokens: torch.Tensor,
    cfg: FairCalibConfig,
    seed: int,
    device: str,
    views: int = 1,
    batch: int = TRACK_BATCH,
    progress: bool = False,
) -> FrontierStates:
    """Run the float model's sampler on prompts (prefix of `tokens`), `batch` prompts per run,
    and keep `views` visited states per prompt (seeded random steps, one from each of `views`
    equal runs of steps), with their frontiers. Row v * N + i is view v of prompt i, as in
    `masked_inputs`. The model runs where it is (see `streaming.on_device`)."""
    n, seq_len = tokens.shape
    prefix, scfg = tracking_sampler(cfg, seq_len)
    starts = list(range(0, n, batch))
    runs = {  # this rank's sampler runs, by first prompt
        start: generate(
            model,
            tokens[start : start + batch, :prefix].to(device),
            scfg,
            seed=seed + start,
            trace=False,
            record_states=True,
        )
        for start in tqdm(
            distributed.shard(starts),
            desc="FAIR-Calib frontier tracking",
            disable=not progress or not distributed.is_main(),
            file=sys.stderr,
        )
    }
    n_states = _merge({s: len(res.states) for s, res in runs.items()})
    rng = torch.Generator().manual_seed(seed)
    mine: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for start in starts:  # every rank draws every pick, so the stream matches one process
        count = min(batch, n - start)
        picks = [_pick(v, views, n_states[start], count, rng) for v in range(views)]
        if start in runs:
            res = runs.pop(start)
            mine[start] = [_visited(res, pick, cfg.window) for pick in picks]
    chunks = _merge(mine)
    xs, ts, fronts = (
        [chunks[start][v][part] for v in range(views) for start in starts] for part in range(3)
    )
    return FrontierStates(torch.cat(xs), torch.cat(ts), torch.cat(fronts))


def _pick(view: int, views: int, n_states: int, count: int, rng: torch.Generator) -> torch.Tensor:
    """[count] recorded steps for `view`: seeded, from the view-th of `views` equal runs."""
    low = view * n_states // views
    high = max((view + 1) * n_states // views, low + 1)
    return torch.randint(low, high, (count,), generator=rng)


def _visited(
    res, pick: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row i's state at step pick[i] of one sampler run: x [B, L], t [B], frontier [B, L] (the
    positions committed within `window` steps of the state), on the CPU."""
    xs, ts, fronts = [], [], []
    for row, k in enumerate(pick.tolist()):
        x_k, t_k = res.states[k]
        before = res.committed_before(k)[row]  # step 0: the prompt (every family)
        after = res.committed[min(k + window - 1, len(res.committed) - 1)][row]
        xs.append(x_k[row].cpu())
        ts.append(t_k[row].cpu())
        fronts.append((after & ~before).cpu())
    return torch.stack(xs), torch.stack(ts), torch.stack(fronts)


def _merge(part: dict) -> dict:
    """The union of every rank's dict (this rank's alone in one process)."""
    merged: dict = {}
    for p in distributed.all_gather_object(part):
        merged.update(p)
    return merged


def weight_noise(cfg: FairCalibConfig, seed: int) -> NoiseFn:
    """(block, linear index, weight) -> the weight plus quantization-sized noise: the RTN error
    of `cfg`'s scheme (noise 'rtn'), or Gaussian noise of the same norm ('random', seeded per
    layer so that it does not depend on the order layers are visited), times noise_scale."""
    base = QuantConfig(cfg.bits, cfg.group_size, cfg.symmetric)

    def noisy(block: int, index: int, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        delta = quantize_rtn(w, base).weight - w  # on the weight's device
        if cfg.noise == "random":
            gen = torch.Generator().manual_seed(seed * 1_000_003 + block * 1009 + index)
            rand = torch.randn(w.shape, generator=gen).to(w.device)
            delta = rand * (delta.norm() / rand.norm())
        return (w + cfg.noise_scale * delta).to(weight.dtype)

    return noisy


@torch.no_grad()
def token_scores(
    model: DiffusionLM,
    states: FrontierStates,
    noise: NoiseFn,
    batch: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(p_float || p_noisy) and 1 - (top1 - top2) margin. Both [N, L]. The noisy
    model is the same model with `noise` applied block by block (`streaming.quantization_noise`):
    never a second copy."""
    device = model.device
    starts = list(range(0, len(states.x_t), batch))
    mine = {}
    mine_starts = distributed.shard(starts)  # under torchrun each rank scores its share
    bar = not progress or not distributed.is_main()
    for i in tqdm(mine_starts, desc="FAIR-Calib instability scoring", disable=bar, file=sys.stderr):
        x = states.x_t[i : i + batch].to(device)
        t = states.t[i : i + batch].to(device)
        lp = model.log_probs(x, t)
        with quantization_noise(model, noise):
            lq = model.log_probs(x, t)
        p = lp.exp()
        kl = (p * (lp - lq).nan_to_num(0.0, posinf=0.0, neginf=0.0)).sum(-1).clamp(min=0)
        top2 = p.topk(2, dim=-1).values
        mine[i] = (kl.cpu(), (1 - (top2[..., 0] - top2[..., 1])).cpu())
        del lp, lq, p
    scores = _merge(mine)
    return torch.cat([scores[i][0] for i in starts]), torch.cat([scores[i][1] for i in starts])


def row_weights(
    states: FrontierStates,
    kl: torch.Tensor,
    margin: torch.Tensor,
    cfg: FairCalibConfig,
    mask_id: int,
) -> torch.Tensor:
    """[N, L] calibration-loss weights: floor everywhere, plus the score on selected tokens."""
    weights = torch.full(kl.shape, cfg.floor)
    if cfg.weighting == "uniform":
        return torch.ones_like(weights)
    selected = states.frontier if cfg.tokens == "frontier" else states.x_t == mask_id
    score = kl if cfg.weighting == "instability" else margin
    if not selected.any():
        return weights
    mean = score[selected].mean().clamp(min=1e-12)
    boost = (score / mean).pow(cfg.gamma).clamp(max=cfg.max_weight)
    return torch.where(selected, cfg.floor + boost, weights)


def prior_weights(
    model: DiffusionLM, tokens: torch.Tensor, cfg: FairCalibConfig, seed: int, device: str
) -> torch.Tensor:
    """[L] the paper's alternative to instability weights: 1 on prompt positions and the
    Stage-I position prior (frontier hits x masked-stage unreliability, mean 1; see
    faircalib.frontier.prior) on generated positions, capped at floor + max_weight."""
    prefix, scfg = tracking_sampler(cfg, tokens.shape[1])
    prior = position_prior(model, tokens[:, :prefix].to(device), scfg, seed)  # [G]
    prior = prior.cpu().clamp(max=cfg.floor + cfg.max_weight)
    return torch.cat([torch.ones(prefix), prior])


def fair_calibration_inputs(
    model: DiffusionLM,
    tokens: torch.Tensor,
    cfg: FairCalibConfig,
    seed: int,
    device: str,
    views: int = 1,
    *,
    stream: bool = False,
    max_device_gib: float | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """x_t [V * N, L], t [V * N], row weights [V * N, L] and timing/diagnostics for the engine.

    The float model runs on `device` whole if it fits `max_device_gib` (default: the device's
    memory) with one sequence's working set, else (or with `stream`) one block at a time; the
    sampler and scoring batches shrink to fit the budget (`streaming.plan_batch`). With the
    default batch, results are those of a run without any budget."""
    tick = time.time()
    where = torch.device(device)
    budget = device_budget(where, max_device_gib)
    probe_x = torch.zeros((1, tokens.shape[1]), dtype=torch.long)  # any ids: memory is the same
    placement = plan_batch(model, probe_x, torch.ones(1), where, budget, TRACK_BATCH, not stream)
    scoring_batch = max(1, min(SCORE_BATCH, placement.batch // 2))  # two models' log-probs
    with on_device(model, where, placement.stream):
        states = track_frontier(model, tokens, cfg, seed, device, views, placement.batch, progress)
        track_s = time.time() - tick
        tick = time.time()
        if cfg.weighting in ("uniform", "prior"):  # no instability scores needed
            kl = margin = torch.zeros(states.x_t.shape)
        else:
            noise = weight_noise(cfg, seed)
            kl, margin = token_scores(model, states, noise, scoring_batch, progress)
        if cfg.weighting == "prior":
            weights = prior_weights(model, tokens, cfg, seed, device).expand(states.x_t.shape)
        else:
            weights = row_weights(states, kl, margin, cfg, model.mask_id)
    info = {
        "placement": {**placement.to_dict(), "scoring_batch": scoring_batch},
        "frontier_tracking_s": track_s,
        "instability_scoring_s": time.time() - tick,
        "frontier_tokens": int(states.frontier.sum()),
        "mean_frontier_kl": float(kl[states.frontier].mean()) if states.frontier.any() else 0.0,
        "mean_kl": float(kl.mean()),
        "max_weight_used": float(weights.max()),
        "weight_share_on_frontier": float(weights[states.frontier].sum() / weights.sum()),
    }
    return states.x_t, states.t, weights, info
