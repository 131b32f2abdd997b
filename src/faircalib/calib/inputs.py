"""Calibration inputs: what a dLLM sees at inference, built from clean token batches."""

from __future__ import annotations

import torch

from faircalib.config import CalibConfig
from faircalib.errors import DataError
from faircalib.models.base import DiffusionLM


def sampler_levels(steps: int) -> torch.Tensor:
    """[steps] noise levels k / steps, k = 1..steps: the t a `steps`-step sampler feeds its model.

    This is the grid of faircalib.frontier.samplers: 'ancestral' calls the model at
    t = 1 - k / steps for k = 0..steps-1, the same set; 'low_confidence' and 'random' pass the
    masked fraction of the generated region, which plan_transfers' even plan (gen_length / steps
    tokens committed per step, in any number of blocks) makes 1 - k / steps too. When steps does
    not divide gen_length the plan commits one extra token in early steps and their levels fall
    slightly below the grid (FAIR-Calib's tracking picks a dividing step count for that reason).
    """
    return torch.arange(1, steps + 1, dtype=torch.float32) / steps


def masked_inputs(
    model: DiffusionLM, tokens: torch.Tensor, cfg: CalibConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [N, L] -> (x_t [V * N, L], t [V * N]) with V = cfg.views masked views per text
    (row v * N + i is view v of text i; the stratified t levels spread over all V * N rows, so
    each text is seen at V different noise levels).

    'uniform': t stratified over [t_min, 1] (one seeded offset, then evenly spaced, so every noise
    level is covered even with few samples). 'sampler': t on the grid of `sampler_levels(
    sampler_steps)`, the levels a sampler feeds its model, spread evenly over the N sequences
    from a seeded starting level (each level gets floor or ceil of N / steps sequences, so every
    level appears once N >= steps; t_min does not apply). Both then mask each token with
    probability mask_prob(t) from a seeded generator. 'none': clean tokens at t = 0 (the
    autoregressive toolkits' habit).
    """
    if tokens.dim() != 2 or len(tokens) == 0:
        raise DataError(
            f"calibration tokens must be a non-empty [N, L] batch, got {tuple(tokens.shape)}"
        )
    tokens = tokens.repeat(cfg.views, 1)  # [views * N, L]: view v of text i is row v * N + i
    n = len(tokens)
    if cfg.masking == "none":
        return tokens.clone(), torch.zeros(n)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.masking == "sampler":
        steps = cfg.sampler_steps
        first = torch.randint(steps, (1,), generator=gen)
        t = sampler_levels(steps)[(first + torch.arange(n) * steps // n) % steps]  # [N]
    else:
        offset = torch.rand(1, generator=gen)
        t = cfg.t_min + (1 - cfg.t_min) * ((offset + torch.arange(n) / n) % 1.0)  # [N]
    u = torch.rand(tokens.shape, generator=gen)  # [N, L]
    masked = u < model.schedule.mask_prob(t)[:, None]
    return torch.where(masked, torch.full_like(tokens, model.mask_id), tokens), t


def calibration_inputs(
    model: DiffusionLM, tokens: torch.Tensor, cfg: CalibConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t [N, L], t [N], row_weights [N, L] = ones): the plain (unweighted) engine inputs."""
    x_t, t = masked_inputs(model, tokens, cfg)
    return x_t, t, torch.ones(x_t.shape)
