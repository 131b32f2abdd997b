"""Calibration inputs: what a dLLM sees at inference, built from clean token batches."""

from __future__ import annotations

import torch

from faircalib.config import CalibConfig
from faircalib.errors import DataError
from faircalib.models.base import DiffusionLM


def masked_inputs(
    model: DiffusionLM, tokens: torch.Tensor, cfg: CalibConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [N, L] -> (x_t [N, L], t [N]).

    'uniform': t stratified over [t_min, 1] (one seeded offset, then evenly spaced, so every noise
    level is covered even with few samples) and each token masked with prob mask_prob(t) from a
    seeded generator. 'none': clean tokens at t = 0 (the autoregressive toolkits' habit).
    """
    if tokens.dim() != 2 or len(tokens) == 0:
        raise DataError(
            f"calibration tokens must be a non-empty [N, L] batch, got {tuple(tokens.shape)}"
        )
    n = len(tokens)
    if cfg.masking == "none":
        return tokens.clone(), torch.zeros(n)
    gen = torch.Generator().manual_seed(cfg.seed)
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
