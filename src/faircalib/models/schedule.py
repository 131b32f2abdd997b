"""Noise schedules of masked diffusion: alpha_t = P(token still clean at time t)."""

from __future__ import annotations

import torch


class LogLinearSchedule:
    """alpha_t = 1 - (1 - eps) t, so a token is masked with probability ~t (MDLM's default).

    The continuous-time NELBO weight -alpha'_t / (1 - alpha_t) simplifies to 1 / t. With the
    default eps = 0 every token is masked at t = 1, so the NELBO has no prior term and is an
    exact upper bound (MDLM trains with eps = 1e-3; the difference is 0.1% of the masking rate).
    """

    def __init__(self, eps: float = 0.0) -> None:
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - self.alpha(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise sigma(t) = -log alpha_t, the conditioning input of MDLM."""
        return -torch.log1p(-(1 - self.eps) * t.clamp(max=1 - 1e-6))

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'_t / (1 - alpha_t) of the continuous-time NELBO."""
        return (1 - self.eps) / self.mask_prob(t)
