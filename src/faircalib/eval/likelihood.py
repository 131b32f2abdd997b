"""Log-likelihood of a continuation given a context, one implementation for every family.

Everything here talks to a model only through `DiffusionLM.log_probs` and `mask_id`, so MDLM,
LLaDA, Dream, fake-quant and packed models are scored by the same code.

- `conditional_log_likelihood`: LLaDA's Monte Carlo estimate (Nie et al. 2025, Appendix B.5),
  re-implemented from reading ML-GSAI/LLaDA's `get_log_likelihood.py` and `eval_llada.py`. Each
  draw masks a number l of the continuation's C tokens (l from 1 to C), chosen uniformly at
  random among its positions; the context is never masked. The draw's loss is the summed
  -log p of the masked tokens times C / l, and the estimate is minus the mean loss over
  `mc_samples` draws: a lower bound on log p(continuation | context), in nats. Within each
  batch of draws the counts l are stratified: a uniform start k, then k + i C / b for
  i = 0..b-1, rounded (half to even) and wrapped into 1..C. LLaDA uses 128 draws in general and
  one for single-token answers (MMLU), where every draw is the same exact value.
- `conditional_bound`: our NELBO (faircalib.eval.bound's estimator: stratified t, masks seeded
  per draw) with the context never masked; `loglikelihood_rolling` sums it over windows.
- `greedy_match`: LLaDA's check that greedy decoding reproduces the continuation.

Draws come from a generator seeded with `seed` and never depend on the model, so two models
scored with one seed see identical masks (common random numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

from faircalib.errors import ConfigError, DataError
from faircalib.eval.bound import draw_noise
from faircalib.frontier.samplers import guided
from faircalib.models.base import DiffusionLM
from faircalib.models.objective import nelbo_per_sequence

Ids = Sequence[int] | torch.Tensor


def stratified_counts(start: int, length: int, batch: int) -> torch.Tensor:
    """LLaDA's masked-token counts for one batch of draws: start + i * length / batch for
    i = 0..batch-1, rounded half to even and wrapped into 1..length. -> [batch] in 1..length."""
    raw = torch.round(start + torch.arange(batch, dtype=torch.float64) * (length / batch))
    return (raw.long() - 1) % length + 1


def random_subsets(counts: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """[B] counts -> [B, length] bool with counts[i] True entries at uniformly random places."""
    ranks = torch.rand(len(counts), length, generator=generator).argsort(-1).argsort(-1)
    return ranks < counts[:, None]


def _as_ids(ids: Ids) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long).flatten()


def _check_pair(model: DiffusionLM, context: torch.Tensor, continuation: torch.Tensor) -> None:
    if len(continuation) == 0:
        raise DataError("the continuation to score is empty")
    if len(context) + len(continuation) > model.seq_len:
        raise DataError(
            f"context ({len(context)}) + continuation ({len(continuation)}) tokens exceed the "
            f"model's length {model.seq_len}; truncate the context"
        )
    if (torch.cat([context, continuation]) == model.mask_id).any():
        raise DataError(f"the text contains the mask token id {model.mask_id}")


def _log_probs(
    model: DiffusionLM, x: torch.Tensor, t: torch.Tensor, n_context: int, cfg_scale: float
) -> torch.Tensor:
    """x [B, L], t [B] -> log-probs [B, L, V] (float32), with LLaDA's classifier-free guidance
    when cfg_scale > 0 (the unconditional input has the context masked)."""
    if cfg_scale <= 0 or n_context == 0:
        return model.log_probs(x, t).float()
    free = x.clone()
    free[:, :n_context] = model.mask_id
    cond, uncond = model.log_probs(torch.cat([x, free]), torch.cat([t, t])).float().chunk(2)
    return guided(cond, uncond, cfg_scale)


@torch.no_grad()
def conditional_log_likelihood(
    model: DiffusionLM,
    context: Ids,
    continuation: Ids,
    *,
    mc_samples: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    seed: int = 0,
) -> float:
    """LLaDA's Monte Carlo lower bound on log p(continuation | context), in nats."""
    if mc_samples < 1 or batch_size < 1:
        raise ConfigError(f"mc_samples ({mc_samples}) and batch_size ({batch_size}) must be >= 1")
    ctx, cont = _as_ids(context), _as_ids(continuation)
    _check_pair(model, ctx, cont)
    n_ctx, n_cont = len(ctx), len(cont)
    generator = torch.Generator().manual_seed(seed)
    device = model.device
    seq, target = torch.cat([ctx, cont]).to(device), cont.to(device)
    total = 0.0
    model.eval()
    for start in range(0, mc_samples, batch_size):
        b = min(batch_size, mc_samples - start)
        k = int(torch.randint(1, n_cont + 1, (1,), generator=generator))
        counts = stratified_counts(k, n_cont, b)  # [b]
        masked = random_subsets(counts, n_cont, generator).to(device)  # [b, C]
        x = seq.repeat(b, 1)
        x[:, n_ctx:] = torch.where(masked, model.mask_id, x[:, n_ctx:])
        ratio = counts.double() / n_cont  # [b] the draw's mask ratio: MDLM's t
        log_probs = _log_probs(model, x, ratio.float().to(device), n_ctx, cfg_scale)[:, n_ctx:]
        nll = -log_probs.gather(-1, target.expand(b, -1).unsqueeze(-1)).squeeze(-1)  # [b, C]
        nll = torch.where(masked, nll, torch.zeros_like(nll)).double().cpu()
        total += (nll.sum(-1) / ratio).sum().item()
    return -total / mc_samples


@torch.no_grad()
def conditional_bound(
    model: DiffusionLM, context: Ids, continuation: Ids, *, mc_samples: int = 8, seed: int = 0
) -> float:
    """-NELBO of the continuation with the context clean (a lower bound on
    log p(continuation | context), nats): faircalib.eval.bound's estimator on one sequence."""
    if mc_samples < 1:
        raise ConfigError(f"mc_samples must be >= 1, got {mc_samples}")
    ctx, cont = _as_ids(context), _as_ids(continuation)
    _check_pair(model, ctx, cont)
    seq = torch.cat([ctx, cont])
    draws = [draw_noise(seed, [0], k, mc_samples, 1, len(seq)) for k in range(mc_samples)]
    t = torch.cat([d[0] for d in draws])  # [K]
    u = torch.cat([d[1] for d in draws])  # [K, L]
    u[:, : len(ctx)] = 2.0  # uniforms above any mask probability: the context stays clean
    device = model.device
    model.eval()
    nelbo = nelbo_per_sequence(
        model, seq.expand(mc_samples, -1).to(device), t.to(device), u.to(device)
    )
    return -nelbo.double().mean().item()


@torch.no_grad()
def greedy_match(
    model: DiffusionLM, context: Ids, continuation: Ids, *, cfg_scale: float = 0.0
) -> bool:
    """Whether greedy decoding gives the continuation: starting from it fully masked, each step
    commits the one masked position whose most probable token is most probable (LLaDA's
    `suffix_greedy_prediction`), then the result is compared with the continuation."""
    ctx, cont = _as_ids(context), _as_ids(continuation)
    _check_pair(model, ctx, cont)
    n_ctx = len(ctx)
    device = model.device
    x = torch.cat([ctx, torch.full_like(cont, model.mask_id)]).to(device)[None]  # [1, L]
    model.eval()
    for _ in range(len(cont)):
        masked = x[0, n_ctx:] == model.mask_id  # [C]
        t = masked.float().mean().view(1)
        best, token = _log_probs(model, x, t, n_ctx, cfg_scale)[0, n_ctx:].max(-1)  # [C]
        pos = int(best.masked_fill(~masked, float("-inf")).argmax())
        x[0, n_ctx + pos] = token[pos]
    return bool((x[0, n_ctx:].cpu() == cont).all())


def rolling_windows(
    tokens: list[int], prefix: int | None, seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling scheme for a model that predicts in place (no shift): disjoint windows
    of up to seq_len - 1 predicted tokens, each conditioned on the token before it (`prefix`,
    e.g. end-of-text, for the first; none if None), except the last, which gets as much
    preceding text as fits. Every token is predicted exactly once. -> [(context, predicted)]."""
    if seq_len < 2:
        raise ConfigError(f"rolling windows need seq_len >= 2, got {seq_len}")
    step = seq_len - 1
    windows = []
    for start in range(0, len(tokens), step):
        pred = tokens[start : start + step]
        first = [] if prefix is None else [prefix]
        ctx = first if start == 0 else tokens[start - 1 : start]
        if start + step >= len(tokens) and start > 0:  # the last window: fill the context
            ctx = tokens[max(0, start - (seq_len - len(pred))) : start]
        windows.append((ctx, pred))
    return windows


def encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """lm-eval's tokenization of a (context, continuation) pair: trailing spaces of the context
    move to the continuation; the continuation's ids are those of the whole text after the
    context's. An empty context becomes the end-of-text token (lm-eval's prefix token)."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer.encode(stripped + continuation).ids
    ctx = tokenizer.encode(stripped).ids if stripped else []
    cont = whole[len(ctx) :]
    if not ctx:
        from faircalib.data.tokenizers import EOS

        eos = tokenizer.token_to_id(EOS)
        ctx = [eos] if eos is not None else []
    return ctx, cont


def fit_context(context: list[int], continuation: list[int], seq_len: int) -> list[int]:
    """The context cut from the left so that context + continuation fit in seq_len."""
    if len(continuation) > seq_len:
        raise DataError(
            f"the continuation has {len(continuation)} tokens, more than the model's length "
            f"{seq_len}"
        )
    room = seq_len - len(continuation)
    return context[len(context) - room :] if len(context) > room else context
