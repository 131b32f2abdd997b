"""What a model believes at each generated position over a recorded generation.

A position's *belief* at step k is the model's argmax there (its unfiltered distribution, no
temperature). While the position is masked (steps 0..c, c = its commit step) the belief is
read from the state the sampler fed at step k. Once it is committed, SUBS makes the model's
output there one-hot on the committed token, so the belief is read with that position alone
re-masked in the state (every other position as it was). docs/fair-calib.md has the
definitions these helpers serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from faircalib.errors import ConfigError
from faircalib.frontier.samplers import GenerationResult
from faircalib.models.base import DiffusionLM


@dataclass
class MaskedStage:
    """The model read at every recorded state, over the generated region (CPU tensors)."""

    argmax: torch.Tensor  # [K, B, G] the model's argmax at each position in state k
    final_prob: torch.Tensor  # [K, B, G] its probability of the position's final token
    masked: torch.Tensor  # [K, B, G] bool: the position is masked in state k


@contextmanager
def evaluating(model: DiffusionLM) -> Iterator[None]:
    """Eval mode and no autograd for the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def commit_steps(result: GenerationResult) -> torch.Tensor:
    """Step at which each generated position was committed: [B, G] long (K: never)."""
    region = slice(result.prompt_len, None)
    not_yet = torch.stack([~c[:, region] for c in result.committed])  # [K, B, G]
    return not_yet.sum(dim=0).cpu()  # committed sets only grow: count of steps before commit


def masked_stage(model: DiffusionLM, result: GenerationResult) -> MaskedStage:
    """Re-run `model` on every state of `result` (one forward of [B, L] per step)."""
    if result.states is None:
        raise ConfigError("masked_stage needs a generation recorded with record_states=True")
    p = result.prompt_len
    final = result.tokens[:, p:].unsqueeze(-1)  # [B, G, 1]
    argmax, final_prob, masked = [], [], []
    with evaluating(model):
        for x_k, t_k in result.states:
            log_probs = model.log_probs(x_k, t_k)[:, p:].float()  # [B, G, V]
            argmax.append(log_probs.argmax(dim=-1).cpu())
            final_prob.append(log_probs.gather(-1, final).squeeze(-1).exp().cpu())
            masked.append((x_k[:, p:] == model.mask_id).cpu())
    return MaskedStage(torch.stack(argmax), torch.stack(final_prob), torch.stack(masked))


def sample_positions(rows: int, width: int, max_positions: int, seed: int) -> torch.Tensor:
    """(row, generated position) pairs [P, 2]: all of them, or `max_positions` drawn without
    replacement by a generator seeded with `seed` (the same pairs for every model)."""
    if max_positions < 1:
        raise ConfigError(f"max_positions must be >= 1, got {max_positions}")
    flat = torch.arange(rows * width)
    if len(flat) > max_positions:
        pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))
        flat = pick[:max_positions].sort().values
    return torch.stack([flat // width, flat % width], dim=1)


def belief_trajectories(
    model: DiffusionLM,
    result: GenerationResult,
    stage: MaskedStage,
    pairs: torch.Tensor,
    *,
    batch_rows: int = 32,
) -> torch.Tensor:
    """Beliefs [P, K + 1] of the `pairs` at every state k = 0..K-1 and at the final sequence
    (k = K). Masked-stage entries come from `stage`; each entry after the commit step is one
    row of a batched forward with that single position re-masked."""
    k_total = len(result.committed)
    rows, cols = pairs[:, 0], pairs[:, 1]
    trajectory = torch.empty(len(pairs), k_total + 1, dtype=torch.long)
    trajectory[:, :k_total] = stage.argmax[:, rows, cols].T  # post-commit entries replaced below
    commit = commit_steps(result)[rows, cols]
    queries = [(i, k) for i in range(len(pairs)) for k in range(int(commit[i]) + 1, k_total + 1)]
    with evaluating(model):
        for start in range(0, len(queries), batch_rows):
            chunk = queries[start : start + batch_rows]
            beliefs = _remasked_argmax(model, result, pairs, chunk)
            for (i, k), belief in zip(chunk, beliefs.tolist(), strict=True):
                trajectory[i, k] = belief
    return trajectory


def _remasked_argmax(
    model: DiffusionLM, result: GenerationResult, pairs: torch.Tensor, chunk: list[tuple[int, int]]
) -> torch.Tensor:
    """One forward: for each (pair index, step) the state with the pair's position re-masked."""
    p = result.prompt_len
    x = torch.stack([_state(result, int(pairs[i, 0]), k) for i, k in chunk])  # [R, L]
    position = torch.tensor([p + int(pairs[i, 1]) for i, _ in chunk], device=x.device)
    row = torch.arange(len(chunk), device=x.device)
    x[row, position] = model.mask_id
    # the planned samplers' t: the masked share of the generated region (MDLM-style models
    # ignore t; for the ancestral sampler this is the linear schedule's expected share)
    t = (x[:, p:] == model.mask_id).float().mean(dim=1)
    return model.log_probs(x, t)[row, position].argmax(dim=-1).cpu()


def _state(result: GenerationResult, row: int, k: int) -> torch.Tensor:
    """Row `row` of the state fed at step k, or of the final sequence for k = K: [L]."""
    return result.states[k][0][row] if k < len(result.states) else result.tokens[row]
