"""Flip and degeneration metrics: how a (quantized) model's generations depart from a reference.

Both models generate under the same seed, so they see the same noise (common random numbers)
and every token that differs - a *flip* - is caused by the models, not by sampling luck.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from faircalib.errors import ConfigError
from faircalib.frontier.samplers import GenerationResult, SamplerConfig, generate
from faircalib.models.base import DiffusionLM


def compare_generations(
    model_a: DiffusionLM,
    model_b: DiffusionLM,
    prompt_ids: torch.Tensor,
    cfg: SamplerConfig,
    seed: int,
) -> dict[str, Any]:
    """Generate with both models under one seed; A is the reference (e.g. the float model)."""
    a = generate(model_a, prompt_ids, cfg, seed, trace=False)
    b = generate(model_b, prompt_ids, cfg, seed, trace=False)
    gen_a, gen_b = a.tokens[:, a.prompt_len :], b.tokens[:, b.prompt_len :]  # [B, G]
    differ = gen_a != gen_b
    first = first_divergence_steps(a, b)
    diverged = [s for s in first if s is not None]
    flip_rate = differ.float().mean().item()
    return {
        "flip_rate": flip_rate,
        "token_agreement": 1.0 - flip_rate,
        "exact_match_rate": (~differ.any(dim=1)).float().mean().item(),
        "first_divergence_step": first,
        "mean_first_divergence_step": sum(diverged) / len(diverged) if diverged else None,
        "flip_rate_by_step": flip_rate_by_step(a, b),
        "repetition_rate_a": repetition_rate(gen_a),
        "repetition_rate_b": repetition_rate(gen_b),
        "steps": cfg.steps,
        "samples": int(gen_a.shape[0]),
    }


def _partial(result: GenerationResult, step: int, mask_id: int) -> torch.Tensor:
    """The sequence right after `step` [B, L]: committed tokens never change afterwards, so the
    final tokens under the step's committed mask reproduce it exactly."""
    masks = torch.full_like(result.tokens, mask_id)
    return torch.where(result.committed[step], result.tokens, masks)


def first_divergence_steps(a: GenerationResult, b: GenerationResult) -> list[int | None]:
    """Per row, the first step after which the two partial sequences differ (None: never)."""
    mask_id = -1  # any value no token takes; only equality of the two partials matters
    first: list[int | None] = [None] * a.tokens.shape[0]
    for k in range(len(a.committed)):
        differs = (_partial(a, k, mask_id) != _partial(b, k, mask_id)).any(dim=1)  # [B]
        for row in differs.nonzero().flatten().tolist():
            if first[row] is None:
                first[row] = k
    return first


def flip_rate_by_step(a: GenerationResult, b: GenerationResult) -> list[float | None]:
    """Share of the tokens A commits at step k that differ from B's final tokens there
    (None for a step where A commits nothing)."""
    out: list[float | None] = []
    for k in range(len(a.committed)):
        written = a.frontier(k)  # [B, L]
        n = int(written.sum())
        flips = int((written & (a.tokens != b.tokens)).sum())
        out.append(flips / n if n else None)
    return out


def _rows(tokens: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    return tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(r) for r in tokens]


def distinct_n(tokens: torch.Tensor | Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / total n-grams in each row, averaged over rows. tokens: [B, N]."""
    rows = _rows(tokens)
    if n < 1 or not rows or any(len(r) < n for r in rows):
        raise ConfigError(f"distinct_n needs n >= 1 and every row at least n={n} tokens long")
    ratios = []
    for r in rows:
        grams = [tuple(r[i : i + n]) for i in range(len(r) - n + 1)]
        ratios.append(len(set(grams)) / len(grams))
    return sum(ratios) / len(ratios)


def repetition_rate(tokens: torch.Tensor | Sequence[Sequence[int]], n: int = 4) -> float:
    """1 - distinct n-grams / total n-grams per row, averaged: 0 = no repeated n-gram."""
    return 1.0 - distinct_n(tokens, n)
