"""Write-frontier samplers for masked diffusion LMs, with a trace of every commit.

Three samplers share one loop shape: at each step the model sees the partly masked sequence,
a token is proposed at every masked position, and some of those positions are *committed*
(written once, never changed again). The positions written at a step are that step's
*write frontier*; the trace records how sure the model was there.

- ``low_confidence`` (LLaDA): the generated region is split into blocks filled left to right;
  each step commits a planned number of tokens per row, at the masked positions of the current
  block where the model's probability of the proposed token is highest.
- ``random``: same plan, positions picked at random (the ablation of the confidence rule).
- ``ancestral`` (MDLM): a time grid from 1 to 0; each masked position is revealed with the
  reverse-process probability (alpha_s - alpha_t) / (1 - alpha_t).
- ``maskgit_plus``, ``topk_margin``, ``entropy`` (Dream's `alg`s): on Dream's grid
  t = linspace(1, eps, steps + 1), a step commits int(n_masked (1 - s / t)) tokens (the rest at
  the last step) at the positions of highest confidence: the proposal's probability, the top-1
  minus top-2 probability, or the negative entropy. With ``alg_temp`` > 0 the positions are
  drawn instead, without replacement, in proportion to softmax(confidence / alg_temp).

``cfg_scale`` > 0 adds LLaDA's classifier-free guidance to any sampler: the model also sees the
sequence with the prompt masked, and its log-probs become
uncond + (cfg_scale + 1) (cond - uncond), renormalised.

Common random numbers: every random draw comes from seeded generators in a fixed order whose
shapes do not depend on the model's outputs, so two models (float vs quantized) run with the
same seed see identical noise and every difference in their outputs comes from the models. The
Gumbel noise has its own stream, so the position draws are the same whatever the temperature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from faircalib.errors import ConfigError, DataError
from faircalib.models.base import DiffusionLM

DREAM_ORDERS = ("maskgit_plus", "topk_margin", "entropy")
SAMPLERS = ("low_confidence", "random", "ancestral", *DREAM_ORDERS)


@dataclass
class SamplerConfig:
    sampler: str = "low_confidence"
    steps: int = 64
    gen_length: int = 64
    block_length: int | None = None  # None: one block spanning the whole generated region
    temperature: float = 0.0  # 0: greedy argmax; > 0: Gumbel-max at this temperature
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 0.0  # LLaDA's classifier-free guidance; 0: off
    alg_temp: float | None = None  # Dream orders: None / 0 commit the top confidences
    eps: float = 1e-3  # Dream orders: the time grid ends at eps

    @property
    def block(self) -> int:
        return self.block_length or self.gen_length

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.steps < 1 or self.gen_length < 1:
            raise ConfigError(
                f"steps ({self.steps}) and gen_length ({self.gen_length}) must be >= 1"
            )
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0 or (self.alg_temp is not None and self.alg_temp < 0):
            raise ConfigError(
                f"cfg_scale ({self.cfg_scale}) and alg_temp ({self.alg_temp}) must be >= 0"
            )
        if self.sampler in DREAM_ORDERS:
            self._validate_dream()
        elif self.sampler != "ancestral":
            self._validate_blocks()

    def _validate_dream(self) -> None:
        if self.block != self.gen_length:
            raise ConfigError(f"sampler {self.sampler} fills the whole region: no block_length")
        if not 0 < self.eps < 1:
            raise ConfigError(f"eps must be in (0, 1), got {self.eps}")

    def _validate_blocks(self) -> None:
        if self.block < 1 or self.gen_length % self.block:
            raise ConfigError(f"block_length {self.block} must divide gen_length {self.gen_length}")
        n_blocks = self.gen_length // self.block
        if self.steps % n_blocks:
            raise ConfigError(
                f"steps {self.steps} must be a multiple of the number of blocks {n_blocks} "
                f"(gen_length {self.gen_length} / block_length {self.block})"
            )


@dataclass
class FrontierStep:
    """One step's commits. Lists are per row; positions index the full sequence."""

    step: int
    t: list[float]
    positions: list[list[int]]
    tokens: list[list[int]]
    top1_prob: list[list[float]]
    margin: list[list[float]]  # top-1 minus top-2 probability
    entropy: list[list[float]]  # nats, of the model's (unfiltered) distribution


@dataclass
class FrontierTrace:
    sampler: str
    prompt_len: int
    steps: list[FrontierStep] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, P + gen_length]
    prompt_len: int
    trace: FrontierTrace | None
    states: list[tuple[torch.Tensor, torch.Tensor]] | None  # per step: (x_t [B, L], t [B]) fed
    committed: list[torch.Tensor]  # per step: cumulative committed mask [B, L] after the step

    def frontier(self, step: int) -> torch.Tensor:
        """Positions written at `step`: bool [B, L]."""
        before = self.committed[step - 1] if step > 0 else self._initial_committed()
        return self.committed[step] & ~before

    def _initial_committed(self) -> torch.Tensor:
        mask = torch.zeros_like(self.committed[0])
        mask[:, : self.prompt_len] = True
        return mask


# --- distributions -------------------------------------------------------------------------
def filter_log_probs(
    log_probs: torch.Tensor, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """Keep the top-k tokens and/or the smallest nucleus of mass >= top_p. [..., V] -> [..., V]."""
    out = log_probs
    if top_k is not None and top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]  # [..., 1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_lp, order = out.sort(dim=-1, descending=True)
        cum = sorted_lp.exp().cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top-1 always stays)
        drop_sorted = (cum - sorted_lp.exp()) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def propose(
    log_probs: torch.Tensor, gumbel: torch.Tensor | None, cfg: SamplerConfig
) -> torch.Tensor:
    """log_probs [B, G, V], gumbel [B, G, V] or None -> proposed tokens [B, G]."""
    filtered = filter_log_probs(log_probs, cfg.top_k, cfg.top_p)
    if gumbel is None:
        return filtered.argmax(dim=-1)
    # Gumbel-max in float64: low-precision Gumbel noise is known to distort MDM samples
    return (filtered.double() / cfg.temperature + gumbel).argmax(dim=-1)


@dataclass
class NoiseStreams:
    """Two seeded streams: uniforms [B, G] for positions, Gumbel [B, G, V] for token sampling."""

    positions: torch.Generator
    tokens: torch.Generator

    @classmethod
    def from_seed(cls, seed: int, device: torch.device) -> NoiseStreams:
        # 2s and 2s+1 never collide across seeds, so no two (seed, stream) pairs share noise
        return cls(
            torch.Generator(device=device).manual_seed(2 * seed),
            torch.Generator(device=device).manual_seed(2 * seed + 1),
        )

    def draw(
        self, shape: tuple[int, int, int], cfg: SamplerConfig, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One step's noise: Gumbel [B, G, V] (only when sampling) and uniforms [B, G]."""
        b, g, v = shape
        gumbel = None
        if cfg.temperature > 0:
            u = torch.rand((b, g, v), generator=self.tokens, dtype=torch.float64, device=device)
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        uniforms = torch.rand((b, g), generator=self.positions, dtype=torch.float64, device=device)
        return gumbel, uniforms


def plan_transfers(cfg: SamplerConfig) -> list[int]:
    """Tokens committed per row at each step: each block's length split evenly over its steps,
    the remainder going to the earliest steps (LLaDA's schedule)."""
    n_blocks = cfg.gen_length // cfg.block
    per_block = cfg.steps // n_blocks
    base, extra = divmod(cfg.block, per_block)
    block_plan = [base + (1 if i < extra else 0) for i in range(per_block)]
    return block_plan * n_blocks


def top_positions(score: torch.Tensor, tiebreak: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [B, count] of the highest scores per row; equal scores ordered by `tiebreak`.

    Two stable sorts give a lexicographic order without mixing the tie-breaker into the score.
    """
    by_tie = tiebreak.argsort(dim=-1, descending=True, stable=True)  # [B, G]
    score_in_tie_order = score.gather(-1, by_tie)
    order = score_in_tie_order.argsort(dim=-1, descending=True, stable=True)
    return by_tie.gather(-1, order)[:, :count]


# --- the loop ------------------------------------------------------------------------------
@dataclass
class _Run:
    model: DiffusionLM
    cfg: SamplerConfig
    x: torch.Tensor  # [B, L] current sequence
    prompt_len: int
    noise: NoiseStreams
    trace: FrontierTrace | None
    states: list[tuple[torch.Tensor, torch.Tensor]] | None
    committed: list[torch.Tensor] = field(default_factory=list)

    @property
    def region(self) -> slice:
        return slice(self.prompt_len, self.x.shape[1])


def generate(
    model: DiffusionLM,
    prompt_ids: torch.Tensor,
    cfg: SamplerConfig,
    seed: int,
    *,
    trace: bool = True,
    record_states: bool = False,
    progress: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Fill `cfg.gen_length` masked positions after `prompt_ids` [B, P].

    `progress`, if given, is called with 1 after every step (e.g. a tqdm bar's `update`).
    Returns tokens [B, P + gen_length]; with `record_states`, the (x_t, t) fed to the model at
    every step (the inputs frontier-aware calibration replays).
    """
    run = _start(model, prompt_ids, cfg, seed, trace, record_states)
    step_fn = {"ancestral": _ancestral_step, **dict.fromkeys(DREAM_ORDERS, _dream_step)}.get(
        cfg.sampler, _planned_step
    )
    plan = plan_transfers(cfg) if step_fn is _planned_step else [0] * cfg.steps
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for k in range(cfg.steps):
                step_fn(run, k, plan[k])
                if progress is not None:
                    progress(1)
    finally:
        model.train(was_training)
    return GenerationResult(run.x, run.prompt_len, run.trace, run.states, run.committed)


def _start(
    model: DiffusionLM,
    prompt_ids: torch.Tensor,
    cfg: SamplerConfig,
    seed: int,
    trace: bool,
    record_states: bool,
) -> _Run:
    cfg.validate()
    if prompt_ids.dim() != 2:
        raise DataError(
            f"prompt_ids must be [batch, prompt_len], got shape {tuple(prompt_ids.shape)}"
        )
    b, p = prompt_ids.shape
    if p + cfg.gen_length > model.seq_len:
        raise ConfigError(
            f"prompt length {p} + gen_length {cfg.gen_length} exceeds "
            f"the model's seq_len {model.seq_len}"
        )
    if (prompt_ids == model.mask_id).any():
        raise DataError(f"prompt contains the mask token id {model.mask_id}")
    device = model.device
    masks = torch.full((b, cfg.gen_length), model.mask_id, dtype=torch.long, device=device)
    x = torch.cat([prompt_ids.to(device=device, dtype=torch.long), masks], dim=1)  # [B, L]
    noise = NoiseStreams.from_seed(seed, device)
    return _Run(
        model,
        cfg,
        x,
        p,
        noise,
        FrontierTrace(cfg.sampler, p) if trace else None,
        [] if record_states else None,
    )


def _model_step(run: _Run, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed the current state; -> log-probs [B, G, V] of the generated region, proposals [B, G],
    uniforms [B, G]."""
    log_probs, gumbel, uniforms = _run_model(run, t)
    return log_probs, propose(log_probs, gumbel, run.cfg), uniforms


def _run_model(
    run: _Run, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """-> log-probs [B, G, V] of the generated region (guided if cfg_scale > 0), Gumbel noise
    [B, G, V] or None, uniforms [B, G]. Noise is drawn before the model runs, so its order
    never depends on the model."""
    b, g = run.x.shape[0], run.cfg.gen_length
    gumbel, uniforms = run.noise.draw((b, g, run.model.vocab_size), run.cfg, run.x.device)
    if run.states is not None:
        run.states.append((run.x.clone(), t.clone()))
    if run.cfg.cfg_scale > 0:  # LLaDA: the unconditional input is the prompt masked
        free = run.x.clone()
        free[:, : run.prompt_len] = run.model.mask_id
        both = run.model.log_probs(torch.cat([run.x, free]), torch.cat([t, t]))
        cond, uncond = both[:, run.region].float().chunk(2)
        return guided(cond, uncond, run.cfg.cfg_scale), gumbel, uniforms
    return run.model.log_probs(run.x, t)[:, run.region].float(), gumbel, uniforms  # [B, G, V]


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on log-probs [..., V]: uncond + (scale + 1) (cond - uncond),
    renormalised. Log-probs differ from logits by a per-position constant, which the
    renormalisation removes, so this equals LLaDA's guidance on logits. Entries impossible
    under either input (-inf: [MASK], or every other token at a committed position) stay so."""
    possible = torch.isfinite(cond) & torch.isfinite(uncond)
    mixed = uncond + (scale + 1) * (cond - uncond)
    return mixed.masked_fill(~possible, float("-inf")).log_softmax(-1)


def _planned_step(run: _Run, k: int, count: int) -> None:
    """low_confidence / random: commit `count` tokens per row inside the current block."""
    masked = run.x[:, run.region] == run.model.mask_id  # [B, G]
    t = masked.float().mean(dim=1)  # [B] mask fraction of the generated region
    log_probs, proposal, uniforms = _model_step(run, t)
    steps_per_block = run.cfg.steps // (run.cfg.gen_length // run.cfg.block)
    start = (k // steps_per_block) * run.cfg.block
    in_block = torch.zeros_like(masked)
    in_block[:, start : start + run.cfg.block] = True
    if run.cfg.sampler == "random":
        score = uniforms.clone()
    else:  # the model's own probability of the proposal, before temperature or filtering
        score = log_probs.gather(-1, proposal.unsqueeze(-1)).squeeze(-1).exp().double()
    score = score.masked_fill(~(masked & in_block), float("-inf"))
    chosen = torch.zeros_like(masked)
    if count > 0:
        chosen.scatter_(1, top_positions(score, uniforms, count), True)
    _commit(run, k, t, log_probs, proposal, chosen & masked)


def _ancestral_step(run: _Run, k: int, _count: int) -> None:
    """MDLM ancestral: reveal each masked position with probability (a_s - a_t) / (1 - a_t)."""
    b, steps = run.x.shape[0], run.cfg.steps
    t_now, t_next = 1 - k / steps, 1 - (k + 1) / steps
    t = torch.full((b,), t_now, device=run.x.device)
    log_probs, proposal, uniforms = _model_step(run, t)
    sched = run.model.schedule
    a_t, a_s = (float(sched.alpha(torch.tensor(v))) for v in (t_now, t_next))
    reveal_prob = 1.0 if k == steps - 1 else (a_s - a_t) / max(1 - a_t, 1e-12)
    masked = run.x[:, run.region] == run.model.mask_id
    _commit(run, k, t, log_probs, proposal, masked & (uniforms < reveal_prob))


def _dream_step(run: _Run, k: int, _count: int) -> None:
    """Dream's orders: commit int(n_masked (1 - s / t)) tokens per row where confidence is
    highest (or drawn by softmax(confidence / alg_temp)); everything left at the last step."""
    cfg, b = run.cfg, run.x.shape[0]
    grid = torch.linspace(1, cfg.eps, cfg.steps + 1)  # float32, as upstream
    t = torch.full((b,), float(grid[k]), device=run.x.device)
    log_probs, gumbel, uniforms = _run_model(run, t)
    proposal, confidence = dream_confidence(log_probs, gumbel, cfg)
    masked = run.x[:, run.region] == run.model.mask_id  # [B, G]
    count = dream_transfer_count(masked, grid[k], grid[k + 1], last=k == cfg.steps - 1)
    score = confidence.double().masked_fill(~masked, float("-inf"))
    if cfg.alg_temp:  # Gumbel-top-k: draws without replacement, proportional to the softmax
        score = score / cfg.alg_temp - torch.log(-torch.log(uniforms.clamp(1e-300, 1 - 1e-16)))
    chosen = torch.zeros_like(masked)
    if count > 0:
        chosen.scatter_(1, top_positions(score, uniforms, count), True)
    _commit(run, k, t, log_probs, proposal, chosen & masked)


def dream_transfer_count(masked: torch.Tensor, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """Tokens to commit per row: Dream's int(mean masked count x (1 - s / t)), in float32."""
    n_masked = masked.sum().float().cpu() / masked.shape[0]
    return int(n_masked) if last else int(n_masked * (1 - s / t))


def dream_confidence(
    log_probs: torch.Tensor, gumbel: torch.Tensor | None, cfg: SamplerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """log_probs [B, G, V] -> proposals [B, G] and their confidence [B, G] under Dream's
    distribution: tempered, then top-p / top-k filtered, then renormalised."""
    tempered = (log_probs / cfg.temperature).log_softmax(-1) if gumbel is not None else log_probs
    filtered = filter_log_probs(tempered, cfg.top_k, cfg.top_p).log_softmax(-1)
    probs = filtered.exp()
    # greedy, or Gumbel-max: a draw from the filtered distribution
    proposal = (filtered if gumbel is None else filtered.double() + gumbel).argmax(-1)
    if cfg.sampler == "maskgit_plus":
        return proposal, probs.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
    if cfg.sampler == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return proposal, top2[..., 0] - top2[..., 1]
    return proposal, (probs * torch.log(probs + 1e-10)).sum(-1)  # entropy: minus the entropy


def _commit(
    run: _Run,
    k: int,
    t: torch.Tensor,
    log_probs: torch.Tensor,
    proposal: torch.Tensor,
    chosen: torch.Tensor,
) -> None:
    """Write proposals at `chosen` [B, G] (masked positions only) and record the frontier."""
    region = run.x[:, run.region]
    run.x[:, run.region] = torch.where(chosen, proposal, region)
    run.committed.append(run.x != run.model.mask_id)
    if run.trace is not None:
        run.trace.steps.append(_frontier_step(k, t, log_probs, proposal, chosen, run.prompt_len))


def _frontier_step(
    k: int,
    t: torch.Tensor,
    log_probs: torch.Tensor,
    proposal: torch.Tensor,
    chosen: torch.Tensor,
    offset: int,
) -> FrontierStep:
    probs = log_probs.exp()  # [B, G, V]
    top2 = probs.topk(2, dim=-1).values  # [B, G, 2]
    entropy = torch.special.entr(probs).sum(-1)  # [B, G]; entr(0) = 0 handles -inf log-probs
    rows = [chosen[i].nonzero().flatten() for i in range(chosen.shape[0])]
    return FrontierStep(
        step=k,
        t=t.tolist(),
        positions=[(r + offset).tolist() for r in rows],
        tokens=[proposal[i, r].tolist() for i, r in enumerate(rows)],
        top1_prob=[top2[i, r, 0].tolist() for i, r in enumerate(rows)],
        margin=[(top2[i, r, 0] - top2[i, r, 1]).tolist() for i, r in enumerate(rows)],
        entropy=[entropy[i, r].tolist() for i, r in enumerate(rows)],
    )
