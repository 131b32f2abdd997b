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

``cache`` (``prefix`` / ``dual``) runs the block steps with Fast-dLLM's approximate K/V cache
(`frontier.cache`); the default ``none`` is the plain computation. Every result carries
`GenerationStats` (model calls, token rows run, wall time, tokens/s).

Common random numbers: every random draw comes from seeded generators in a fixed order whose
shapes do not depend on the model's outputs, so two models (float vs quantized) run with the
same seed see identical noise and every difference in their outputs comes from the models. The
Gumbel noise has its own stream, so the position draws are the same whatever the temperature.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from faircalib.errors import ConfigError, DataError
from faircalib.frontier.cache import (
    CACHE_MODES,
    BlockKVCache,
    cached_log_probs,
    supports_block_cache,
)
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
    # K/V cache of block decoding (frontier.cache): none, prefix (prompt + finished blocks)
    # or dual (also the masked suffix); refreshed at every block's first step
    cache: Literal["none", "prefix", "dual"] = "none"

    @property
    def block(self) -> int:
        return self.block_length or self.gen_length

    @property
    def steps_per_block(self) -> int:
        """Model calls per block; samplers without blocks fill the region as one block."""
        if self.sampler in SAMPLERS and self.sampler not in ("ancestral", *DREAM_ORDERS):
            return self.steps // (self.gen_length // self.block)
        return self.steps

    @property
    def cache_block(self) -> int:
        """Width of the block a cached step recomputes (the region for block-less samplers)."""
        return self.block if self.steps_per_block != self.steps else self.gen_length

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"unknown cache {self.cache!r}; choose one of {CACHE_MODES}")
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
        if self.cfg_scale > MAX_CFG_SCALE:  # (scale + 1) x a log-prob gap overflows to NaN
            raise ConfigError(
                f"cfg_scale {self.cfg_scale:g} is past {MAX_CFG_SCALE:g} (--cfg-scale): the "
                "guided log-probs overflow; guidance scales in use are 0-5"
            )
        if self.cfg_scale < 0 or (self.alg_temp is not None and self.alg_temp < 0):
            raise ConfigError(
                f"cfg_scale ({self.cfg_scale}) and alg_temp ({self.alg_temp}) must be >= 0 "
                "(--cfg-scale, --alg-temp); use 0 to turn either off"
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
            raise ConfigError(
                f"block_length {self.block} must divide gen_length {self.gen_length}; pass a "
                "--block-length that divides --gen-length"
            )
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
class GenerationStats:
    """What a generation cost. rows: token rows run through the model, summed over model
    calls and sequences (a cached step runs fewer than the canvas); full_calls: calls that ran
    the whole canvas; seconds: wall time of the sampling loop (device synchronised)."""

    cache: str
    model_calls: int = 0
    full_calls: int = 0
    rows: int = 0
    seconds: float = 0.0
    generated_tokens: int = 0
    canvas_rows: int = 0  # rows an uncached run of the same length would run

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def row_fraction(self) -> float:
        """Rows run over the rows of an uncached run (1.0 without a cache)."""
        return self.rows / self.canvas_rows if self.canvas_rows else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "tokens_per_s": self.tokens_per_s,
            "row_fraction": self.row_fraction,
        }


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, P + gen_length]
    prompt_len: int
    trace: FrontierTrace | None
    states: list[tuple[torch.Tensor, torch.Tensor]] | None  # per step: (x_t [B, L], t [B]) fed
    committed: list[torch.Tensor]  # per step: cumulative committed mask [B, L] after the step
    # Gaussian families (no mask token): the rounded / decoded token at every generated
    # position after each step, [K, B, G]; None for the masked samplers
    beliefs: torch.Tensor | None = None
    stats: GenerationStats | None = None  # the masked samplers' cost bookkeeping

    def frontier(self, step: int) -> torch.Tensor:
        """Positions written at `step`: bool [B, L]."""
        return self.committed[step] & ~self.committed_before(step)

    def committed_before(self, step: int) -> torch.Tensor:
        """Positions already written when `step` starts (the prompt at step 0): bool [B, L]."""
        return self.committed[step - 1] if step > 0 else self._initial_committed()

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
    step: int = 0  # the step being run
    cache: BlockKVCache | None = None
    stats: GenerationStats = field(default_factory=lambda: GenerationStats("none"))

    @property
    def region(self) -> slice:
        return slice(self.prompt_len, self.x.shape[1])


class IgnoredSamplerOptions(UserWarning):
    """Sampler options set away from their defaults that the model's own sampler does not read
    (`DiffusionLM.sampler_fields`)."""

    def __init__(self, family: str, fields: list[str]) -> None:
        self.family, self.fields = family, fields
        flags = ", ".join("--" + name.replace("_", "-") for name in fields)
        super().__init__(f"the {family} sampler does not use {flags}; ignored")


def ignored_options(model: Any, cfg: SamplerConfig) -> list[str]:
    """The fields of `cfg` set away from their defaults that `model`'s own sampler ignores."""
    reads = getattr(model, "sampler_fields", None)
    if reads is None:
        return []
    default = SamplerConfig()
    return [
        name
        for name, value in asdict(cfg).items()
        if name not in reads and value != getattr(default, name)
    ]


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
    # a family with its own sampler (Diffusion-LM, PLANNER) returns its result; masked families
    # (and duck-typed models without the hook, e.g. test stubs) use the shared samplers
    if cfg.cache != "none" and not supports_block_cache(model):
        raise ConfigError(
            f"the {getattr(model, 'family', type(model).__name__)} model has no block cache; "
            "use cache 'none' (families opt in: docs/models.md, 'Block K/V cache')"
        )
    ignored = ignored_options(model, cfg)
    if ignored:
        family = getattr(model, "family", type(model).__name__)
        warnings.warn(IgnoredSamplerOptions(family, ignored), stacklevel=2)
    family_sampler = getattr(model, "sample", None)
    own = None
    if family_sampler is not None:
        own = family_sampler(
            prompt_ids, cfg, seed, trace=trace, record_states=record_states, progress=progress
        )
    if own is not None:
        return own
    run = _start(model, prompt_ids, cfg, seed, trace, record_states)
    step_fn = {"ancestral": _ancestral_step, **dict.fromkeys(DREAM_ORDERS, _dream_step)}.get(
        cfg.sampler, _planned_step
    )
    plan = plan_transfers(cfg) if step_fn is _planned_step else [0] * cfg.steps
    was_training = model.training
    model.eval()
    begin = time.perf_counter()
    try:
        with torch.inference_mode():
            for k in range(cfg.steps):
                run.step = k
                step_fn(run, k, plan[k])
                if progress is not None:
                    progress(1)
    finally:
        model.train(was_training)
        run.cache = None  # free the K/V before returning
    if run.x.device.type == "cuda":
        torch.cuda.synchronize(run.x.device)
    stats = run.stats
    stats.seconds = time.perf_counter() - begin
    stats.generated_tokens = run.x.shape[0] * cfg.gen_length
    return GenerationResult(
        run.x, run.prompt_len, run.trace, run.states, run.committed, stats=stats
    )


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
        stats=GenerationStats(cfg.cache),
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
        both = _region_log_probs(run, torch.cat([run.x, free]), torch.cat([t, t]))
        cond, uncond = both.float().chunk(2)
        return guided(cond, uncond, run.cfg.cfg_scale), gumbel, uniforms
    return _region_log_probs(run, run.x, t).float(), gumbel, uniforms  # [B, G, V]


def _region_log_probs(run: _Run, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's log-probs [B', G, V] of the generated region of x [B', L], through the K/V
    cache when one is configured. A cached step computes only its window's rows; every other
    generated position gets a one-hot on its current token (what SUBS gives a committed
    position; [MASK] at a masked one), and no sampler commits outside the current block."""
    cfg, stats = run.cfg, run.stats
    stats.model_calls += 1
    stats.canvas_rows += x.shape[0] * x.shape[1]
    if cfg.cache == "none":
        stats.full_calls += 1
        stats.rows += x.shape[0] * x.shape[1]
        return run.model.log_probs(x, t)[:, run.region]
    per_block = cfg.steps_per_block
    if run.step % per_block == 0 or run.cache is None:  # block start: refresh every K/V
        run.cache = BlockKVCache.empty(len(run.model.blocks))
        out, n_rows = cached_log_probs(run.model, x, t, run.cache, None)
        stats.full_calls += 1
        stats.rows += x.shape[0] * n_rows
        return out[:, run.region]
    start = run.prompt_len + (run.step // per_block) * cfg.cache_block
    stop = x.shape[1] if cfg.cache == "prefix" else start + cfg.cache_block
    part, n_rows = cached_log_probs(run.model, x, t, run.cache, slice(start, stop))
    stats.rows += x.shape[0] * n_rows
    region = x[:, run.region]
    out = torch.full(
        (*region.shape, part.shape[-1]), float("-inf"), dtype=part.dtype, device=part.device
    )
    out.scatter_(-1, region.unsqueeze(-1), 0.0)
    out[:, start - run.prompt_len : stop - run.prompt_len] = part
    return out


# the largest guidance scale: log-prob gaps are at most a few thousand, so (scale + 1) x gap
# stays far inside float32 / bf16 range (a scale of 1e308 turned every token into NaN)
MAX_CFG_SCALE = 1e6


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


# --- frontiers of families without a mask token ------------------------------------------------
def stop_steps(beliefs: torch.Tensor) -> torch.Tensor:
    """beliefs [K, B, G] (the token each position would get after step k) -> [B, G] long: the
    first step from which a position's token never changes again. This is the write frontier
    of a continuous sampler: position l is written at step stop[l] (the last step writes
    every position still moving)."""
    k_total = beliefs.shape[0]
    settled = beliefs == beliefs[-1:]  # [K, B, G]
    trailing = settled.flip(dims=[0]).long().cumprod(dim=0).sum(dim=0)  # >= 1
    return k_total - trailing


def result_from_beliefs(
    prompt_ids: torch.Tensor,
    beliefs: torch.Tensor,
    stats: dict[str, torch.Tensor],
    times: list[float],
    states: list[tuple[torch.Tensor, torch.Tensor]] | None,
    sampler: str,
    *,
    trace: bool,
) -> GenerationResult:
    """A GenerationResult for a sampler whose tokens may change at every step.

    beliefs [K, B, G]; stats: `top1_prob`, `margin`, `entropy`, each [K, B, G], the model's
    distribution at each position in step k; times: the t fed at each step. Final tokens are
    the last step's; step k's frontier is the positions whose `stop_steps` is k, so the
    committed sets grow monotonically as for the masked samplers and the flip metrics apply
    unchanged."""
    prompt = prompt_ids.to(beliefs.device, torch.long)
    b, p = prompt.shape
    stop = stop_steps(beliefs)  # [B, G]
    tokens = torch.cat([prompt, beliefs[-1]], dim=1)
    prompt_mask = torch.ones(b, p, dtype=torch.bool, device=beliefs.device)
    committed = [torch.cat([prompt_mask, stop <= k], dim=1) for k in range(len(beliefs))]
    frontier_trace = FrontierTrace(sampler, p) if trace else None
    if frontier_trace is not None:
        for k in range(len(beliefs)):
            rows = [(stop[i] == k).nonzero().flatten() for i in range(b)]
            frontier_trace.steps.append(
                FrontierStep(
                    step=k,
                    t=[times[k]] * b,
                    positions=[(r + p).tolist() for r in rows],
                    tokens=[beliefs[-1, i, r].tolist() for i, r in enumerate(rows)],
                    **{
                        name: [stats[name][k, i, r].tolist() for i, r in enumerate(rows)]
                        for name in ("top1_prob", "margin", "entropy")
                    },
                )
            )
    return GenerationResult(tokens, p, frontier_trace, states, committed, beliefs)


def distribution_stats(log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """log_probs [B, G, V] -> top1_prob, margin (top-1 minus top-2) and entropy, each [B, G]."""
    probs = log_probs.float().exp()
    top2 = probs.topk(2, dim=-1).values
    return {
        "top1_prob": top2[..., 0],
        "margin": top2[..., 0] - top2[..., 1],
        "entropy": torch.special.entr(probs).sum(-1),
    }
