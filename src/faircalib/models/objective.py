"""The masked-diffusion objective: forward masking and the continuous-time NELBO.

For the absorbing-state process the negative ELBO of a clean sequence x_0 is

    NELBO(x_0) = E_{t ~ U(0,1)} E_{x_t ~ q(.|x_0)} [ w(t) * sum_{l : x_t^l = MASK} -log p(x_0^l | x_t) ]

with w(t) = -alpha'_t / (1 - alpha_t) (= 1/t for the log-linear schedule). It upper-bounds
-log p(x_0); divided by the sequence length it is the per-token bound behind MDLM's perplexity.
"""

from __future__ import annotations

import torch

from faircalib.models.base import DiffusionLM


def mask_tokens(
    x0: torch.Tensor, t: torch.Tensor, mask_id: int, mask_prob: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """x0: [B, L]; mask_prob: [B]; u: [B, L] uniforms -> x_t with x0 masked where u < mask_prob."""
    return torch.where(u < mask_prob[:, None], torch.full_like(x0, mask_id), x0)


def nelbo_per_sequence(
    model: DiffusionLM, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """One-sample Monte Carlo NELBO of each sequence, in nats: the model's own bound
    (`DiffusionLM.nelbo`; the masked NELBO below for masked families). x0: [B, L], t: [B],
    u: [B, L] -> [B]."""
    return model.nelbo(x0, t, u)


def masked_nelbo_per_sequence(
    model: DiffusionLM, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """One-sample Monte Carlo NELBO of each sequence, in nats. x0: [B, L], t: [B], u: [B, L] -> [B].

    `t` and `u` are inputs (not drawn here) so that callers control the randomness: training
    draws fresh noise, evaluation derives it from (seed, sequence index) for common random numbers.
    """
    schedule = model.schedule
    x_t = mask_tokens(x0, t, model.mask_id, schedule.mask_prob(t), u)
    log_probs = model.log_probs(x_t, t)  # [B, L, V]
    nll = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # [B, L]
    masked = x_t == model.mask_id
    nll = torch.where(masked, nll, torch.zeros_like(nll))
    return schedule.loss_weight(t) * nll.sum(dim=-1)


def stratified_times(batch: int, generator: torch.Generator, t_min: float = 1e-3) -> torch.Tensor:
    """Low-discrepancy t's for a batch: one uniform offset, then evenly spaced (MDLM's antithetic
    sampling). Lowers the variance of the batch-mean NELBO at no cost."""
    device = generator.device  # t is drawn on the generator's device
    offset = torch.rand(1, generator=generator, device=device)
    t = (offset + torch.arange(batch, device=device) / batch) % 1.0
    return t * (1 - t_min) + t_min
