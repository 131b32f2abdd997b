"""Diffusion-LM (Li et al. 2022): Gaussian diffusion on learned word embeddings, with rounding.

Forward process: a token w_l is embedded as e_w (d numbers) and noised,
z_t = alpha_t e_w + sigma_t eps (variance preserving, `gaussian.GaussianSchedule`). A
bidirectional transformer reads z_t and t and outputs, at every position, a distribution over
the vocabulary, p(w_l | z_t); its expected embedding is the clean-embedding estimate x_hat.

Where this follows the paper, and where not (docs/models.md, "Diffusion-LM"):

* Modules as upstream names them: `word_embedding`, `input_up_proj` (d -> D, tanh, D -> D),
  `position_embeddings`, `time_embed`, `LayerNorm`, the encoder `blocks`, `output_down_proj`
  (D -> D, tanh, D -> d) and the LM head tied to the embedding (the rounding step). The blocks
  are pre-LN, so `final_norm` adds the LayerNorm upstream's post-LN BERT has built in (`norm_f`)
  before the tanh: without it the residual stream grows and saturates the tanh, and the head
  goes blind to the blocks (docs/models.md).
* Embeddings are normalised to norm sqrt(d) (CDCD's fix for the embedding collapse that
  Diffusion-LM counters with its rounding loss): every e_w has the same norm, so the
  Gaussian likelihood of z_t under token w is alpha_t / sigma_t^2 <z_t, e_w> + const.
* The head adds that exact per-position likelihood to the network's logits (a skip, like
  EDM's c_skip): at low noise the posterior is right by construction, and the network models
  what context adds. x_hat = E_p[e_w] (CDCD's score interpolation).
* Schedule: log-SNR linear (VDM) instead of the paper's sqrt schedule, so uniform t is already
  the bound's importance sampler.
* Training (`training_loss`): the cross-entropy of p(w_l | z_t) at every t (CDCD's score
  interpolation) + the decoder and prior terms of the bound. The paper's L_simple (unweighted
  ||x_hat - e_w||^2) is not trained on: summed over d it is up to d a token (60-160 at
  d = 128, against ~8 nats of cross-entropy) and swamps the clipped gradient; the
  cross-entropy has the same optimum (x_hat = E_p[e_w] is the posterior mean when p is the
  posterior). A CPU pilot at d = 128 learned faster without it (docs/models.md).
* Options, all off by default and recorded in config.json (docs/training.md has what each did):
  per-position noise levels, CDCD's time warping, training on the bound, variance-optimal
  levels for it (`warp_on_bound`, RePlaid's learned schedule shape), the trunk reading each
  position's own posterior (`posterior_input`), an untied output layer (`untied_head`).
* `nelbo`: the continuous-time bound (VDM / Plaid):
      -log p(w) <= E[-log p(w | z_t0)] + KL(q(z_1 | w) || N(0, I))
                   + (gamma_max - gamma_min) / 2 * E_{t ~ U(t0, 1)}[SNR(t) ||e_w - x_hat||^2] (1 - t0)
  with p(w | z_t0) the Bayes rounding of z_t0 under a uniform prior over tokens.

`mask_id` is the tokenizer's mask token: never in an input (the schedule's `mask_prob` is 0)
and given zero mass by the head, so code that checks for it keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from faircalib.errors import CheckpointError
from faircalib.models.base import (
    BlockContext,
    DiffusionLM,
    VocabLayer,
    VocabLayers,
    config_from_dict,
)
from faircalib.models.gaussian import (
    Block,
    GaussianSchedule,
    block_linears,
    check_fields,
    hashed_normal,
    keyed_normal,
    row_keys,
    time_features,
)

# keyed-noise streams: stem-made inputs, the bound's draw, training's per-position noise levels
NOISE_STREAM, BOUND_STREAM, LEVEL_STREAM, TRAIN_STREAM = 0, 1, 2, 3
# time warping: updates before the curve shapes the draws, the EMA rate, the uniform share
WARP_START, WARP_RATE, WARP_UNIFORM = 100, 0.02, 0.2


@dataclass
class DiffusionLMConfig:
    vocab_size: int
    mask_id: int
    seq_len: int = 128
    embed_dim: int = 16
    hidden_dim: int = 128
    n_blocks: int = 2
    n_heads: int = 4
    mlp_ratio: int = 2
    gamma_min: float = -9.0
    gamma_max: float = 6.0
    t_min: float = 1e-3
    # LayerNorm on the blocks' output before `output_down_proj`'s tanh (PLANNER's `norm_f`,
    # MDLM's `norm_final`; upstream's post-LN BERT normalises every layer's output). Off only
    # for checkpoints saved before the field existed (their config.json lacks it).
    final_norm: bool = False
    # Share of training sequences in which every position draws its own noise level (the rest
    # share one, as the bound and the sampler do). Gaussian noise hits every position alike,
    # so a neighbour is never clearer than the position being denoised; with levels of their
    # own some neighbours are nearly clean, as unmasked tokens are in MDLM. Measured
    # (docs/models.md, "Per-position noise levels"): 1.0 made an 88 M retrain worse at the
    # bound's one level a sequence, 0.5 (the diffusionlm-base preset) slightly better; neither
    # made it read context. 0 (off) by default.
    independent_t: float = 0.0
    # With independent_t: 0 draws each position's level uniformly; > 0 draws its log-SNR around
    # the sequence's, gamma_l = gamma(t) + level_jitter * N(0, 1) (clamped to the schedule), so
    # one level a sequence (the bound's case) stays inside what training sees.
    level_jitter: float = 0.0
    # CDCD's time warping (Dieleman et al. 2022), training only: levels are drawn where a
    # running estimate of the cross-entropy curve CE(t) rises, `time_warp_bins` bins over t,
    # so that training spends its steps where the token's identity is being lost (information
    # lost at a constant rate in warped time, RePlaid's linear-information schedule). The
    # bound, sampling and calibration keep uniform t. 0: off.
    time_warp_bins: int = 0
    # With time_warp_bins: draw the levels from the bound's variance-optimal density instead,
    # q(t) proportional to sqrt(E[l(t)^2]) with l the diffusion integrand at t (a running
    # per-bin second moment), and weight each level's fit term by 1 / q(t) relative to uniform,
    # so the trained objective keeps its expectation and only its variance falls. For a bound
    # trained on itself (train_on_bound) this is VDM's learned noise schedule with fixed
    # endpoints: the continuous-time bound does not depend on the schedule's shape, only its
    # estimator's variance does, and RePlaid (arXiv 2605.18530) finds the variance-optimal
    # schedule loses information linearly in time (docs/models.md, "Variance-optimal levels").
    warp_on_bound: bool = False
    # Train on the bound's own diffusion term (VDM's SNR-weighted error of E_p[e], Plaid's and
    # RePlaid's likelihood training) instead of CDCD's cross-entropy of p(w | z_t); the
    # rounding and prior terms are trained either way. With per-position levels the term is
    # each position's integrand at its own level.
    train_on_bound: bool = False
    # The trunk also reads each position's posterior from its own z_t: p_l(w) proportional to
    # exp(alpha_t / sigma_t^2 <z_l, e_w>) (the head's skip term, uniform prior), embedded as
    # sum_w p_l(w) E_in[w] with a learned [V, hidden_dim] table `input_embedding`. A position
    # whose z names its token then enters as that token's row (MDLM's clean token), one lost
    # in noise as the table's mean (MDLM's mask), one in between as a mixture: the trunk reads
    # what its neighbours say, which a d -> D projection of a noisy z cannot decode at 8 k
    # tokens (docs/models.md, "Posterior input"). A function of z_t and t: the bound, the
    # sampler and calibration are unchanged.
    posterior_input: bool = False
    # The network's logits from its own [V, hidden_dim] projection with a bias (`lm_head`, as
    # MDLM's output layer and Plaid's) in place of a similarity to the tied word embeddings:
    # those are the diffusion's data space, fixed in norm and only embed_dim wide, so logits
    # through them have rank <= embed_dim and no per-token offset. The skip term (the exact
    # likelihood of z_t under each e_w) is added either way.
    untied_head: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "Diffusion-LM")
        if not 0.0 <= self.independent_t <= 1.0 or self.level_jitter < 0:
            raise CheckpointError(
                f"Diffusion-LM config: independent_t {self.independent_t} must lie in [0, 1] "
                f"and level_jitter {self.level_jitter} be >= 0; fix config.json"
            )
        if self.hidden_dim % self.n_heads or not 0 <= self.mask_id < self.vocab_size:
            raise CheckpointError(
                f"Diffusion-LM config: hidden_dim {self.hidden_dim} must split into "
                f"{self.n_heads} heads and mask_id {self.mask_id} lie in the vocabulary; fix "
                "config.json"
            )
        if self.warp_on_bound and not (
            self.time_warp_bins and self.train_on_bound and self.level_jitter == 0
        ):
            # the density is the bound's, so it serves a bound-trained model; the 1/q weights
            # assume uniform levels going in, which jittered (clamped) levels are not
            raise CheckpointError(
                "Diffusion-LM config: warp_on_bound needs time_warp_bins > 0, train_on_bound "
                "and level_jitter 0; fix config.json"
            )
        if not self.gamma_min < self.gamma_max or not 0 < self.t_min < 1:
            raise CheckpointError(
                "Diffusion-LM config: need gamma_min < gamma_max and 0 < t_min < 1; fix config.json"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionLMConfig:
        return config_from_dict(cls, d, "Diffusion-LM")


class DiffusionLMModel(DiffusionLM):
    family = "diffusion_lm"
    # ancestral steps with the clamping trick: no blocks, no sampling temperature (rounding)
    sampler_fields = frozenset({"steps", "gen_length", "cache"})

    def __init__(self, cfg: DiffusionLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.mask_id, self.seq_len = cfg.vocab_size, cfg.mask_id, cfg.seq_len
        self.schedule = GaussianSchedule(cfg.gamma_min, cfg.gamma_max, cfg.t_min)
        d, dim = cfg.embed_dim, cfg.hidden_dim
        self.word_embedding = nn.Embedding(cfg.vocab_size, d)
        self.input_up_proj = nn.Sequential(nn.Linear(d, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.position_embeddings = nn.Parameter(0.02 * torch.randn(cfg.seq_len, dim))
        self.max_positions = cfg.seq_len  # a learned table: no position past it exists
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.LayerNorm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_blocks)
        )
        self.norm_f = nn.LayerNorm(dim) if cfg.final_norm else None
        if cfg.posterior_input:
            self.input_embedding = nn.Parameter(0.02 * torch.randn(cfg.vocab_size, dim))
        if cfg.untied_head:
            self.lm_head = nn.Linear(dim, cfg.vocab_size)
        self.output_down_proj = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, d))
        if cfg.time_warp_bins:  # training state, not weights: never saved (non-persistent)
            self.register_buffer("warp_ce", torch.zeros(cfg.time_warp_bins), persistent=False)
            self.register_buffer(
                "warp_updates", torch.zeros((), dtype=torch.long), persistent=False
            )

    # --- embeddings and noise ----------------------------------------------------------------
    def embeddings(self) -> torch.Tensor:
        """[V, d] word embeddings, each of norm sqrt(d)."""
        w = self.word_embedding.weight.float()
        return math.sqrt(w.shape[1]) * w / w.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def noised(self, tokens: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z_t = alpha_t e_w + sigma_t eps: tokens [B, L], t [B] or [B, L], eps [B, L, d]."""
        t = per_position(t)[..., None]
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        return a * self.embeddings()[tokens] + s * eps

    # --- the three stages ------------------------------------------------------------------
    def stem(self, x_t: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, BlockContext]:
        """x_t: a noisy embedding state [B, L, d] (what the sampler feeds), or token ids
        [B, L], which are noised here to level t with noise keyed by (ids, t): calibration
        and any caller holding only tokens get one draw of q(z_t | w), the same draw on every
        call. t None: the lowest noise level t_min; t [B, L] (training with
        `independent_t`; noisy embeddings only): one level a position."""
        b, seq = x_t.shape[:2]
        if t is None:
            t = torch.full((b,), self.cfg.t_min, device=x_t.device)
        t = t.to(x_t.device).float()
        if not x_t.is_floating_point():
            if t.dim() != 1:  # the keyed draw is one per (sequence, level)
                raise ValueError("Diffusion-LM stem: token ids take one level a sequence, t [B]")
            eps = keyed_normal(row_keys(x_t, t), NOISE_STREAM, (seq, self.cfg.embed_dim))
            x_t = self.noised(x_t, t, eps)
        z, dt = x_t.float(), self.position_embeddings.dtype  # weights may be bf16 (loaded so)
        h = self.input_up_proj(z.to(dt)) + self.position_embeddings[:seq]
        if self.cfg.posterior_input:
            h = h + self.own_posterior(z, t).to(dt) @ self.input_embedding.to(dt)
        steps = time_features(per_position(t), self.cfg.hidden_dim).to(dt)
        h = self.LayerNorm(h + self.time_embed(steps))
        return h, BlockContext({"batch_z": z, "batch_t": t})

    def own_likelihood(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[B, L, V] log q(z_t,l | w) + const = alpha_t / sigma_t^2 <z_t,l, e_w> (every e_w has
        the same norm); [MASK] at -inf. t [B] or [B, L]."""
        emb = self.embeddings()  # [V, d]
        scale = per_position(self.schedule.alpha(t) / self.schedule.sigma(t) ** 2)[..., None]
        with float32_math(z):  # scale reaches ~8,000 at t_min: bf16's rounding would be noise
            logits = scale * (z.float() @ emb.T)
        logits[..., self.mask_id] = float("-inf")
        return logits

    def own_posterior(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[B, L, V] p(w | z_t,l) under a uniform prior: what each position's own z says."""
        return torch.softmax(self.own_likelihood(z, t), dim=-1)

    def head(self, h: torch.Tensor, ctx: BlockContext, x_t: torch.Tensor) -> torch.Tensor:
        """log p(w_l | z_t): network logits over the tied embedding plus the exact Gaussian
        log-likelihood of z_t,l under each token; [MASK] gets no mass."""
        z, t = ctx.tensors["batch_z"], ctx.tensors["batch_t"]
        if self.norm_f is not None:  # pre-LN blocks leave the residual stream unnormalised
            h = self.norm_f(h)
        if self.cfg.untied_head:
            net = self.lm_head(h).float()
        else:
            net = self.output_down_proj(h).float() @ self.embeddings().T
        return torch.log_softmax(net + self.own_likelihood(z, t), dim=-1)

    def quantizable_linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        return block_linears(block)

    # --- objectives --------------------------------------------------------------------------
    def bound_terms(
        self, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor, eps: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sequence [B] terms (nats) from one keyed draw of eps (keyed by u, the caller's
        noise): the bound's `diffusion`, `recon` (rounding of z_t0) and `prior`, and the
        training terms `mse` (L_simple) and `ce` (rounding of z_t). t: [B], or [B, L] for
        training's per-position levels (then `diffusion` is not a bound term). `eps` [B, L, d]:
        training's own draw (`training_loss`) in place of the keyed one."""
        emb = self.embeddings()
        e = emb[x0]  # [B, L, d]
        if eps is None:
            eps = keyed_normal(row_keys(u), BOUND_STREAM, tuple(e.shape[1:]))
        log_probs = self.log_probs(self.noised(x0, t, eps), t)  # [B, L, V]
        with float32_math(x0):  # SNR up to e^9 weighs this error: a bf16 x_hat (autocast)
            x_hat = log_probs.float().exp() @ emb  # added ~1 nat/token at t_min, ~0.07 overall
        sq_err = (e - x_hat).pow(2).sum(-1)  # [B, L]
        snr = per_position(self.schedule.snr(t))  # [B, 1] or [B, L]
        t0 = torch.full((len(x0),), self.cfg.t_min, device=x0.device)
        z0 = self.noised(x0, t0, eps)
        scale0 = self.schedule.alpha(t0) / self.schedule.sigma(t0) ** 2
        with float32_math(z0):
            logits0 = scale0[:, None, None] * (z0 @ emb.T)
        logits0[..., self.mask_id] = float("-inf")
        recon = -torch.log_softmax(logits0, -1).gather(-1, x0[..., None]).squeeze(-1)
        ce_positions = -log_probs.gather(-1, x0[..., None]).squeeze(-1)
        integrand = self.schedule.diffusion_weight() * snr * sq_err  # [B, L]
        return {
            "diffusion": integrand.sum(-1),
            "diffusion_positions": integrand,  # [B, L]: the variance-optimal warp's signal
            "recon": recon.sum(-1),
            "prior": self.schedule.prior_kl(e).sum(-1),
            "mse": sq_err.sum(-1),
            "ce": ce_positions.sum(-1),
            "ce_positions": ce_positions,  # [B, L]: the time warp's curve is per level
        }

    def nelbo(self, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        terms = self.bound_terms(x0, t, u)
        return terms["diffusion"] + terms["recon"] + terms["prior"]

    def training_loss(self, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """CDCD's objective: cross-entropy of p(w | z_t) + the bound's rounding and prior terms.
        `mse` (L_simple) stays a reported term, not a trained one: its scale grows with
        embed_dim and drowned the cross-entropy (pilot in docs/models.md). With
        `independent_t` a share of the sequences get one level a position (`training_levels`).
        The noise is `hashed_normal`'s, drawn on the device (the bound's per-row CPU draw was
        most of a GPU step's time); still a pure function of u, so a batch repeats exactly."""
        shape = (x0.shape[1], self.cfg.embed_dim)
        eps = hashed_normal(row_keys(u), TRAIN_STREAM, shape)
        levels = self.training_levels(t, u)
        warp = bool(self.cfg.time_warp_bins) and self.training
        weight = None
        if warp:
            levels, bins = self.warp_levels(levels, return_bins=True)
            if self.cfg.warp_on_bound:
                weight = self.warp_weight(bins)
        terms = self.bound_terms(x0, levels, u, eps=eps)
        name = "diffusion_positions" if self.cfg.train_on_bound else "ce_positions"
        if warp:
            signal = terms["diffusion_positions" if self.cfg.warp_on_bound else "ce_positions"]
            if self.cfg.warp_on_bound and levels.dim() == 1:
                # one level a sequence: the estimate whose variance counts is the sequence's
                # sum, so its per-position mean (same scale as one position's) is tracked
                signal = signal.mean(-1, keepdim=True)
            self.update_warp(levels, signal.detach())
        fit = terms[name] if weight is None else terms[name] * per_position(weight)
        return fit.sum(-1) + terms["recon"] + terms["prior"]

    # --- time warping (training only; `time_warp_bins`) ---------------------------------------
    def warp_density(self) -> torch.Tensor:
        """[bins] probabilities over equal t bins: the running CE curve's rise in each bin
        (CE(t_min) ~ 0; the curve's running maximum, as CE rises with t), or with
        `warp_on_bound` the root of the running second moment of the diffusion integrand; mixed
        80/20 with uniform so no level goes untrained (and no weight exceeds 5); uniform until
        WARP_START updates shaped it."""
        bins = self.cfg.time_warp_bins
        if self.cfg.warp_on_bound:  # the running mean holds E[l^2]: q proportional to its root
            rise = self.warp_ce.clamp_min(0).sqrt()
        else:
            curve = torch.cummax(self.warp_ce, 0).values  # CE rises with t; a dip is noise
            rise = torch.diff(curve, prepend=curve.new_zeros(1))
        total = rise.sum()
        shaped = torch.where(total > 0, rise / total.clamp_min(1e-12), 1.0 / bins)
        density = (1 - WARP_UNIFORM) * shaped + WARP_UNIFORM / bins
        return torch.where(self.warp_updates >= WARP_START, density, 1.0 / bins)

    def warp_weight(self, bins: torch.Tensor) -> torch.Tensor:
        """Importance weights of warped levels from their bins (`warp_levels(...,
        return_bins=True)`, any shape): uniform's density over `warp_density`'s, 1 / (n_bins *
        density[k]); their mean under the warped draw is 1, and weighted fit terms keep the
        uniform-t expectation."""
        return 1.0 / (self.cfg.time_warp_bins * self.warp_density()[bins])

    def warp_levels(
        self, levels: torch.Tensor, return_bins: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Uniform levels in [t_min, 1] (any shape) -> levels drawn from `warp_density` by its
        inverse CDF (piecewise linear; monotone, t_min -> t_min, 1 -> 1). With `level_jitter`
        the per-position levels are not uniform; the map still moves them toward the rise."""
        bins, t_min = self.cfg.time_warp_bins, self.cfg.t_min
        density = self.warp_density()
        cdf = torch.cumsum(density, 0)
        v = ((levels - t_min) / (1 - t_min)).clamp(0, 1)
        k = torch.searchsorted(cdf, v.contiguous(), right=True).clamp(max=bins - 1)
        frac = ((v - (cdf[k] - density[k])) / density[k]).clamp(0, 1)
        warped = t_min + (1 - t_min) * (k + frac) / bins
        return (warped, k) if return_bins else warped

    @torch.no_grad()
    def update_warp(self, levels: torch.Tensor, ce: torch.Tensor) -> None:
        """Fold one batch's per-position CE [B, L] (with `warp_on_bound`: diffusion integrand,
        squared) at its levels ([B] or [B, L]) into the running curve: per-bin means, an
        exponential average over batches (bins the batch missed keep their value)."""
        bins, t_min = self.cfg.time_warp_bins, self.cfg.t_min
        if self.warp_ce.dtype != torch.float32:  # a model cast whole (.to(bf16)): the running
            self.warp_ce = self.warp_ce.float()  # average needs float32 to move by 2% a batch
        levels = per_position(levels).expand_as(ce)
        idx = (((levels - t_min) / (1 - t_min)) * bins).long().clamp(0, bins - 1).flatten()
        value = ce.float().pow(2) if self.cfg.warp_on_bound else ce.float()  # E[l^2] or CE
        sums = torch.zeros(bins, device=ce.device).index_add_(0, idx, value.flatten())
        ones = torch.ones_like(idx, dtype=sums.dtype)
        counts = torch.zeros(bins, device=ce.device).index_add_(0, idx, ones)
        mean = sums / counts.clamp_min(1)
        fresh = self.warp_ce == 0  # a bin's first data sets it; later batches blend in
        blended = torch.where(fresh, mean, (1 - WARP_RATE) * self.warp_ce + WARP_RATE * mean)
        self.warp_ce.copy_(torch.where(counts > 0, blended, self.warp_ce))
        self.warp_updates.add_(1)

    def training_levels(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """t [B] -> t [B], or [B, L] where `independent_t` > 0: in a share of the sequences
        (chosen by a keyed draw) every position takes its own t ~ U(t_min, 1). The draws are
        keyed by u (`hashed_normal`, on the device): the same batch gives the same levels."""
        share = self.cfg.independent_t
        if share == 0:
            return t
        length = u.shape[1]
        draws = torch.special.ndtr(hashed_normal(row_keys(u), LEVEL_STREAM, (1 + length,)))
        own = draws[:, 0] < share  # [B]: which sequences get a level a position
        t_min, jitter = self.cfg.t_min, self.cfg.level_jitter
        if jitter > 0:  # log-SNR jittered around the sequence's level, mapped back to t
            sch = self.schedule
            noise = torch.special.ndtri(draws[:, 1:].clamp(1e-6, 1 - 1e-6)).to(t.device)
            gamma = (sch.gamma(t)[:, None] + jitter * noise).clamp(sch.gamma_min, sch.gamma_max)
            levels = (sch.gamma_max - gamma) / (sch.gamma_max - sch.gamma_min)
            levels = levels.clamp(t_min, 1.0)
        else:
            levels = t_min + (1 - t_min) * draws[:, 1:].to(t.device)  # [B, L]
        return torch.where(own.to(t.device)[:, None], levels, t[:, None].expand(-1, length))

    # --- sampling ----------------------------------------------------------------------------
    def sample(
        self,
        prompt_ids: torch.Tensor,
        cfg: Any,
        seed: int,
        *,
        trace: bool = True,
        record_states: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Any:
        from faircalib.frontier.samplers import result_from_beliefs

        with _evaluating(self):
            run = self._reverse(prompt_ids, cfg, seed, record_states, progress)
        return result_from_beliefs(prompt_ids, *run, "diffusion_lm", trace=trace)

    def _reverse(self, prompt_ids: torch.Tensor, cfg: Any, seed: int, record: bool, progress):
        """Ancestral sampling with the clamping trick: at each step x_hat is clamped to the
        embedding of the rounded token, then z_s ~ q(z_s | z_t, x_hat). Prompt positions are
        re-noised from the prompt's embeddings at every step (infilling by replacement).
        -> beliefs [K, B, G], stats {name: [K, B, G]}, times [K], states."""
        from faircalib.frontier.samplers import distribution_stats

        device, sch = self.device, self.schedule
        prompt = prompt_ids.to(device, torch.long)
        b, p = prompt.shape
        _check_length(p, cfg, self.seq_len)
        gen = torch.Generator().manual_seed(seed)
        emb = self.embeddings()
        z = torch.randn(b, p + cfg.gen_length, self.cfg.embed_dim, generator=gen).to(device)
        grid = [
            self.cfg.t_min + (1 - self.cfg.t_min) * (1 - k / cfg.steps)
            for k in range(cfg.steps + 1)
        ]
        beliefs, stats, states = [], [], [] if record else None
        for k in range(cfg.steps):
            t = torch.full((b,), grid[k], device=device)
            if p:
                eps_p = torch.randn(b, p, self.cfg.embed_dim, generator=gen).to(device)
                z[:, :p] = self.noised(prompt, t, eps_p)
            log_probs = self.log_probs(z, t)
            rounded = log_probs.argmax(-1)  # [B, L]
            rounded[:, :p] = prompt
            if states is not None:  # token ids, as every calibration input: the stem re-noises
                states.append((rounded.clone(), t.clone()))  # the step's text to its level
            beliefs.append(rounded[:, p:])
            stats.append(distribution_stats(log_probs[:, p:]))
            z = _posterior_step(sch, z, emb[rounded], grid[k], grid[k + 1], gen)
            if progress is not None:
                progress(1)
        return (*_stacked(beliefs, stats), grid[:-1], states)

    # --- persistence -------------------------------------------------------------------------
    def vocab_layers(self) -> VocabLayers:
        """One tied matrix, `word_embedding` [V, embed_dim]: the head is not a learned vocabulary
        projection but a similarity to these vectors, which are also what the Gaussian
        diffusion noises and rounds against. Quantizing them changes the data space, not only
        a weight: refused."""
        layers = (VocabLayer("tied", "word_embedding"),)
        untied = ""
        if self.cfg.untied_head:
            layers += (VocabLayer("output", "lm_head"),)
            untied = " (this model's untied lm_head stays in float beside it)"
        return VocabLayers(
            layers,
            refusal=(
                "--quantize-head: the Diffusion-LM family's tied word_embedding is the "
                "diffusion's data space (tokens are noised as and rounded against these "
                f"vectors), not an output projection; it is not quantized{untied} - leave "
                "--quantize-head off"
            ),
        )

    def config_dict(self) -> dict[str, Any]:
        return {"family": self.family, **asdict(self.cfg)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DiffusionLMModel:
        return cls(DiffusionLMConfig.from_dict(config))


# --- helpers shared with PLANNER -------------------------------------------------------------
def float32_math(x: torch.Tensor) -> torch.autocast:
    """Autocast off on x's device: matmuls inside run in the inputs' float32 (the bound's
    high-SNR terms amplify bf16 rounding by up to e^9)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def per_position(x: torch.Tensor) -> torch.Tensor:
    """A per-sequence [B] quantity as [B, 1], a per-position [B, L] one unchanged: both then
    broadcast against [B, L] (and, with [..., None], against [B, L, d])."""
    return x[:, None] if x.dim() == 1 else x


def _posterior_step(
    sch: GaussianSchedule,
    z: torch.Tensor,
    x_hat: torch.Tensor,
    t: float,
    s: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """One draw of q(z_s | z_t, x = x_hat) (VDM eq. 3-4), s < t. The noise is drawn every
    step (also the last), so the random stream never depends on the model."""
    a_t, a_s = (sch.alpha(torch.tensor(v)).item() for v in (t, s))
    s2_t, s2_s = (sch.sigma(torch.tensor(v)).item() ** 2 for v in (t, s))
    a_ts = a_t / a_s
    s2_ts = s2_t - a_ts**2 * s2_s
    mean = (a_ts * s2_s / s2_t) * z + (a_s * s2_ts / s2_t) * x_hat
    noise = torch.randn(z.shape, generator=gen).to(z.device)
    return mean + math.sqrt(max(s2_ts * s2_s / s2_t, 0.0)) * noise


def _check_length(p: int, cfg: Any, seq_len: int) -> None:
    from faircalib.errors import ConfigError

    if cfg.steps < 1 or cfg.gen_length < 1 or p + cfg.gen_length > seq_len:
        raise ConfigError(
            f"need steps >= 1, gen_length >= 1 and prompt length {p} + gen_length "
            f"{cfg.gen_length} <= the model's seq_len {seq_len}"
        )


class _evaluating:
    """Eval mode and inference mode for a sampler run; the model's mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.inference = model, torch.inference_mode()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)


def _stacked(beliefs: list[torch.Tensor], stats: list[dict]) -> tuple:
    """Per-step lists -> (beliefs [K, B, G], {name: [K, B, G]})."""
    return torch.stack(beliefs), {name: torch.stack([s[name] for s in stats]) for name in stats[0]}
