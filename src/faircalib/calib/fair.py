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

import copy
import time
from dataclasses import dataclass

import torch

from faircalib import distributed
from faircalib.config import FairCalibConfig, QuantConfig
from faircalib.frontier import SamplerConfig, generate, position_prior
from faircalib.models.base import DiffusionLM
from faircalib.quant import quantize_rtn

TRACK_BATCH = 32  # prompts per sampler run during frontier tracking


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
) -> FrontierStates:
    """Run the float model's sampler on prompts (prefix of `tokens`) and keep `views` visited
    states per prompt (seeded random steps, one from each of `views` equal runs of steps), with
    their frontiers. Row v * N + i is view v of prompt i, as in `masked_inputs`."""
    n, seq_len = tokens.shape
    prefix, scfg = tracking_sampler(cfg, seq_len)
    starts = list(range(0, n, TRACK_BATCH))
    runs = {  # this rank's sampler runs, by first prompt
        start: generate(
            model,
            tokens[start : start + TRACK_BATCH, :prefix].to(device),
            scfg,
            seed=seed + start,
            trace=False,
            record_states=True,
        )
        for start in distributed.shard(starts)
    }
    n_states = _merge({s: len(res.states) for s, res in runs.items()})
    rng = torch.Generator().manual_seed(seed)
    mine: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for start in starts:  # every rank draws every pick, so the stream matches one process
        count = min(TRACK_BATCH, n - start)
        picks = [_pick(v, views, n_states[start], count, rng) for v in range(views)]
        if start in runs:
            res = runs.pop(start)
            mine[start] = [_visited(res, pick, cfg.window, model.mask_id) for pick in picks]
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
    res, pick: torch.Tensor, window: int, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row i's state at step pick[i] of one sampler run: x [B, L], t [B], frontier [B, L] (the
    positions committed within `window` steps of the state), on the CPU."""
    xs, ts, fronts = [], [], []
    for row, k in enumerate(pick.tolist()):
        x_k, t_k = res.states[k]
        before = res.committed[k - 1][row] if k > 0 else (x_k[row] != mask_id)
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


@torch.no_grad()
def noisy_copy(model: DiffusionLM, cfg: FairCalibConfig, seed: int) -> DiffusionLM:
    """The model with quantization-sized noise on every quantizable weight."""
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    base = QuantConfig(cfg.bits, cfg.group_size, cfg.symmetric)
    for block in noisy.blocks:
        for _, linear in noisy.quantizable_linears(block):
            w = linear.weight.float()
            delta = quantize_rtn(w, base).weight - w  # on the weight's device
            if cfg.noise == "random":
                rand = torch.randn(w.shape, generator=gen).to(w.device)
                delta = rand * (delta.norm() / rand.norm())
            linear.weight.copy_((w + cfg.noise_scale * delta).to(linear.weight.dtype))
    return noisy


@torch.no_grad()
def token_scores(
    model: DiffusionLM, noisy: DiffusionLM, states: FrontierStates, batch: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(p_float || p_noisy) and 1 - (top1 - top2) margin. Both [N, L]."""
    device = model.device
    starts = list(range(0, len(states.x_t), batch))
    mine = {}
    for i in distributed.shard(starts):  # under torchrun each rank scores its share
        x = states.x_t[i : i + batch].to(device)
        t = states.t[i : i + batch].to(device)
        lp = model.log_probs(x, t)
        lq = noisy.log_probs(x, t)
        p = lp.exp()
        kl = (p * (lp - lq).nan_to_num(0.0, posinf=0.0, neginf=0.0)).sum(-1).clamp(min=0)
        top2 = p.topk(2, dim=-1).values
        mine[i] = (kl.cpu(), (1 - (top2[..., 0] - top2[..., 1])).cpu())
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """x_t [V * N, L], t [V * N], row weights [V * N, L] and timing/diagnostics for the engine."""
    tick = time.time()
    states = track_frontier(model, tokens, cfg, seed, device, views)
    track_s = time.time() - tick
    tick = time.time()
    if cfg.weighting in ("uniform", "prior"):  # no instability scores needed
        kl = margin = torch.zeros(states.x_t.shape)
    else:
        noisy = noisy_copy(model, cfg, seed)
        kl, margin = token_scores(model, noisy, states)
        del noisy
    if cfg.weighting == "prior":
        weights = prior_weights(model, tokens, cfg, seed, device).expand(states.x_t.shape)
    else:
        weights = row_weights(states, kl, margin, cfg, model.mask_id)
    info = {
        "frontier_tracking_s": track_s,
        "instability_scoring_s": time.time() - tick,
        "frontier_tokens": int(states.frontier.sum()),
        "mean_frontier_kl": float(kl[states.frontier].mean()) if states.frontier.any() else 0.0,
        "mean_kl": float(kl.mean()),
        "max_weight_used": float(weights.max()),
        "weight_share_on_frontier": float(weights[states.frontier].sum() / weights.sum()),
    }
    return states.x_t, states.t, weights, info
