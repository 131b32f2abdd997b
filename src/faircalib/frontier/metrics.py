"""Flip and degeneration metrics: how a (quantized) model's generations depart from a reference.

Both models generate under the same seed, so they see the same noise (common random numbers)
and every token that differs - a *flip* - is caused by the models, not by sampling luck.

Mechanism metrics (per model, on its own generation): how the model's belief at a position
(its argmax; read with the position alone re-masked once it is committed) settles relative to
the step that committed it - stabilization lag - and whether, at the end, it still agrees with
the committed token - post-commit mismatch. docs/fair-calib.md defines them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from faircalib.errors import ConfigError
from faircalib.frontier.beliefs import (
    belief_trajectories,
    commit_steps,
    masked_stage,
    sample_positions,
)
from faircalib.frontier.samplers import GenerationResult, SamplerConfig, generate
from faircalib.models.base import DiffusionLM


def compare_generations(
    model_a: DiffusionLM,
    model_b: DiffusionLM,
    prompt_ids: torch.Tensor,
    cfg: SamplerConfig,
    seed: int,
    *,
    max_positions: int = 64,
) -> dict[str, Any]:
    """Generate with both models under one seed; A is the reference (e.g. the float model).

    Besides the flip metrics, each model's mechanism metrics on its own generation
    (`mechanism_metrics`) under the keys stabilization_lag_{a,b}, late_stabilization_rate_{a,b}
    and post_commit_mismatch_{a,b}, over the same `max_positions` (row, position) pairs for
    both models (`mechanism_positions` says how many). Cost per model: the generation (K
    forwards of [B, L]), the same again to read the masked stage, and at most
    max_positions * K re-masked rows (about half that on average), 32 to a forward.
    max_positions=0 skips them (those keys are then None).
    """
    if max_positions < 0:
        raise ConfigError(f"max_positions must be >= 0, got {max_positions}")
    record = max_positions > 0
    a = generate(model_a, prompt_ids, cfg, seed, trace=False, record_states=record)
    b = generate(model_b, prompt_ids, cfg, seed, trace=False, record_states=record)
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
        **_mechanism(model_a, a, max_positions, seed, "_a"),
        **_mechanism(model_b, b, max_positions, seed, "_b"),
        "mechanism_positions": min(max_positions, gen_a.numel()),
    }


MECHANISM_KEYS = ("stabilization_lag", "late_stabilization_rate", "post_commit_mismatch")


def _mechanism(
    model: DiffusionLM, result: GenerationResult, max_positions: int, seed: int, suffix: str
) -> dict[str, float | None]:
    if max_positions == 0:  # switched off: the same keys, without values
        return {key + suffix: None for key in MECHANISM_KEYS}
    metrics = mechanism_metrics(model, result, max_positions=max_positions, seed=seed)
    return {key + suffix: metrics[key] for key in MECHANISM_KEYS}


def stabilization_lags(trajectory: torch.Tensor, commit: torch.Tensor) -> torch.Tensor:
    """delta_lag = s - c per position [P]: s is the first step from which the belief stays at
    its final value (trajectory [P, K + 1], k = K the final sequence), c the commit step.
    delta_lag > 0: the belief still moved after the position was written."""
    k_total = trajectory.shape[1] - 1
    settled = trajectory == trajectory[:, k_total:]  # [P, K + 1]
    trailing = settled.flip(dims=[1]).long().cumprod(dim=1).sum(dim=1)  # >= 1 (k = K itself)
    return (k_total + 1 - trailing) - commit


def mechanism_metrics(
    model: DiffusionLM,
    result: GenerationResult,
    *,
    max_positions: int = 64,
    seed: int = 0,
    batch_rows: int = 32,
) -> dict[str, float]:
    """Stabilization lag and post-commit mismatch of `model` on its generation `result`
    (recorded with record_states=True), over at most `max_positions` (row, generated position)
    pairs drawn with `seed`:

    * stabilization_lag: mean over the pairs of max(0, delta_lag), in steps;
    * late_stabilization_rate: share of pairs with delta_lag > 0 (committed before settling);
    * post_commit_mismatch: share of pairs whose final belief (the final sequence with that
      position alone re-masked) differs from the committed token.

    Cost: K forwards of [B, L] (the masked stage) plus sum over pairs of (K - c) re-masked rows,
    at most max_positions * K, `batch_rows` to a forward.
    """
    rows, width = result.tokens.shape[0], result.tokens.shape[1] - result.prompt_len
    pairs = sample_positions(rows, width, max_positions, seed)
    if result.beliefs is not None:  # a sampler without [MASK] recorded its beliefs itself
        trajectory = recorded_trajectories(result, pairs)
    else:
        stage = masked_stage(model, result)
        trajectory = belief_trajectories(model, result, stage, pairs, batch_rows=batch_rows)
    commit = commit_steps(result)[pairs[:, 0], pairs[:, 1]]
    lags = stabilization_lags(trajectory, commit)
    final = result.tokens[:, result.prompt_len :].cpu()[pairs[:, 0], pairs[:, 1]]
    return {
        "stabilization_lag": lags.clamp(min=0).float().mean().item(),
        "late_stabilization_rate": (lags > 0).float().mean().item(),
        "post_commit_mismatch": (trajectory[:, -1] != final).float().mean().item(),
    }


def recorded_trajectories(result: GenerationResult, pairs: torch.Tensor) -> torch.Tensor:
    """[P, K + 1] beliefs of `pairs` ([P, 2]: row, generated position) from a result that
    recorded them (Gaussian families), with the final tokens appended as step K. There the
    frontier is the step a belief stops changing, so the lag is 0 and the mismatch 0 by
    definition: the metrics stay comparable in form, and any nonzero value is a bug."""
    beliefs = result.beliefs.cpu()  # [K, B, G]
    final = result.tokens[:, result.prompt_len :].cpu()
    per_step = beliefs[:, pairs[:, 0], pairs[:, 1]].T  # [P, K]
    return torch.cat([per_step, final[pairs[:, 0], pairs[:, 1]][:, None]], dim=1)


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


def cache_flip_metrics(
    model: DiffusionLM,
    prompt_ids: torch.Tensor,
    cfg: SamplerConfig,
    seed: int,
    *,
    modes: Sequence[str] = ("prefix", "dual"),
) -> dict[str, Any]:
    """How far the cached samplers (`frontier.cache`) depart from the uncached one: `model`
    generates from `prompt_ids` under one seed without a cache (the reference) and with each
    cache in `modes`; the same noise, so every flip is the cache's approximation.

    -> {"reference": {tokens_per_s, ...}, "<mode>": {flip_rate, token_agreement,
    exact_match_rate, first_divergence_step, mean_first_divergence_step, flip_rate_by_step,
    repetition_rate, tokens_per_s, speedup, row_fraction, ...}}. cfg.cache is ignored."""
    from dataclasses import replace

    reference = generate(model, prompt_ids, replace(cfg, cache="none"), seed, trace=False)
    out: dict[str, Any] = {"reference": _cost(reference)}
    out["reference"]["repetition_rate"] = _repetition(reference.tokens[:, reference.prompt_len :])
    for mode in modes:
        cached = generate(model, prompt_ids, replace(cfg, cache=mode), seed, trace=False)
        ref_gen = reference.tokens[:, reference.prompt_len :]
        gen = cached.tokens[:, cached.prompt_len :]
        differ = ref_gen != gen
        first = first_divergence_steps(reference, cached)
        diverged = [s for s in first if s is not None]
        flip_rate = differ.float().mean().item()
        cost = _cost(cached)
        out[mode] = {
            "flip_rate": flip_rate,
            "token_agreement": 1.0 - flip_rate,
            "exact_match_rate": (~differ.any(dim=1)).float().mean().item(),
            "first_divergence_step": first,
            "mean_first_divergence_step": sum(diverged) / len(diverged) if diverged else None,
            "flip_rate_by_step": flip_rate_by_step(reference, cached),
            "repetition_rate": _repetition(gen),
            **cost,
            "speedup": out["reference"]["seconds"] / cost["seconds"] if cost["seconds"] else None,
        }
    out["steps"], out["samples"] = cfg.steps, int(prompt_ids.shape[0])
    return out


def _repetition(tokens: torch.Tensor) -> float | None:
    return repetition_rate(tokens) if tokens.shape[1] >= 4 else None


def _cost(result: GenerationResult) -> dict[str, Any]:
    stats = result.stats
    if stats is None:
        raise ConfigError("this family's sampler keeps no generation stats (no block cache)")
    return stats.to_dict()
