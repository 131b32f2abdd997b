"""FAIR-Calib Stage I: a position prior over the generated region from the float model's own
sampler runs (the "teacher"), combining frontier hits and masked-stage reliability.

For generated position p, over runs r (prompt rows) with commit steps c_{r,p} and the states
x_{r,k} the sampler fed at steps k = 0..c_{r,p} (p still masked in all of them):

    frontier-hit rate    phi_p = sum_r 1 / sum_r (c_{r,p} + 1)
    reliability          rho_p = sum_r sum_{k <= c_{r,p}} P_teacher(y_{r,p} | x_{r,k}) / sum_r (c_{r,p} + 1)
    fragility            f_p   = phi_p * (1 - rho_p)
    prior                pi_p  = floor + (1 - floor) * G * softmax_p(log f_p / temperature)

y_{r,p} is the token finally committed at p. phi_p is the share of p's masked steps at which it
is written (every run writes p once, so a plain per-run count would be 1 everywhere; per masked
step it is high for positions written early, with the least context, whose decisions every
later step then conditions on). rho_p is the teacher's mean probability, while p is masked, of
what p finally becomes: low when the decision is borderline or settles late. pi has mean
exactly 1 over the G positions and is >= floor; temperature -> infinity gives uniform weights,
temperature 1 weights proportional to f, < 1 sharpens. docs/fair-calib.md explains the choice.
"""

from __future__ import annotations

import torch

from faircalib.errors import ConfigError
from faircalib.frontier.beliefs import commit_steps, masked_stage
from faircalib.frontier.samplers import SamplerConfig, generate
from faircalib.models.base import DiffusionLM


def frontier_reliability(
    model: DiffusionLM,
    prompt_ids: torch.Tensor,
    cfg: SamplerConfig,
    seed: int,
    *,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi, rho), each [G = cfg.gen_length], from `model`'s runs on `prompt_ids` [N, P].

    Prompts run `batch_size` at a time; batch i uses seed `seed + i * batch_size` (as FAIR-Calib's
    frontier tracking does). Cost: two passes of the sampler's forwards (generation, then the
    masked stage), i.e. 2 * steps forwards of [batch_size, P + G] per batch.
    """
    hits = torch.zeros(cfg.gen_length)
    masked_steps = torch.zeros(cfg.gen_length)
    prob_sum = torch.zeros(cfg.gen_length)
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        res = generate(model, prompts, cfg, seed + start, trace=False, record_states=True)
        stage = masked_stage(model, res)
        masked = stage.masked.float()  # [K, B, G]
        hits += (commit_steps(res) < cfg.steps).float().sum(dim=0)
        masked_steps += masked.sum(dim=(0, 1))
        prob_sum += (stage.final_prob * masked).sum(dim=(0, 1))
    if not bool((masked_steps > 0).all()):
        raise ConfigError("position_prior needs at least one prompt")
    return hits / masked_steps, prob_sum / masked_steps


def combine_prior(
    phi: torch.Tensor, rho: torch.Tensor, *, temperature: float = 1.0, floor: float = 0.1
) -> torch.Tensor:
    """pi = floor + (1 - floor) * G * softmax(log(phi * (1 - rho)) / temperature): [G], mean 1.
    All-reliable positions (fragility 0 everywhere) give uniform ones."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= floor <= 1.0:
        raise ConfigError(f"floor must be in [0, 1], got {floor}")
    fragility = (phi * (1.0 - rho)).clamp(min=0.0)
    if float(fragility.sum()) == 0.0:
        return torch.ones_like(fragility)
    share = torch.softmax(fragility.log() / temperature, dim=0)  # log 0 = -inf: share 0
    return floor + (1.0 - floor) * len(fragility) * share


def position_prior(
    model: DiffusionLM,
    prompt_ids: torch.Tensor,
    cfg: SamplerConfig,
    seed: int,
    *,
    temperature: float = 1.0,
    floor: float = 0.1,
    batch_size: int = 32,
) -> torch.Tensor:
    """FAIR-Calib's Stage-I position prior pi [G] (module docstring: the formula).

    model: the float model (the teacher); prompt_ids [N, P]: calibration prompts; cfg: the
    sampler whose frontier is tracked (gen_length G, steps K); seed: sampler noise.
    temperature > 0 and floor in [0, 1] shape the weights (see combine_prior).
    As calibration weights: a row laid out as prompt + generated region takes pi on its G
    generated positions (weights for the P prompt positions are the caller's choice, e.g. 1).
    """
    phi, rho = frontier_reliability(model, prompt_ids, cfg, seed, batch_size=batch_size)
    return combine_prior(phi, rho, temperature=temperature, floor=floor)
