"""PLANNER (Zhang et al. 2023): latent diffusion over paragraph codes, with an AR decoder.

Three parts (docs/models.md, "PLANNER"):

* the paragraph embedder's encoder: a bidirectional transformer over the text, pooled by
  `n_latents` learned queries into codes z [K, latent_dim] (LayerNorm without affine, so the
  codes have unit scale); during training and in the bound, q(z | x) = N(enc(x), s^2 I) with
  s = `latent_noise` (PLANNER's noise on the embedder's codes, for a robust decoder);
* the latent diffusion prior: a transformer denoiser (`prior_blocks`) predicting the noise of
  z_t = alpha_t z + sigma_t eps (VDM, log-SNR linear schedule);
* the autoregressive decoder (`blocks`): a causal transformer over the text that attends to the
  codes (projected to its width) as a prefix memory.

Likelihood bound (`nelbo`), nats per sequence:
    -log p(x) <= E_q[-log p(x | z)] - H(q(z | x)) + E_q[-log p(z)],
    -log p(z) <= -log p(z | z_t0) + KL(q(z_1 | z) || N(0, I)) + (gamma_max - gamma_min) / 2 *
                 E_t[||eps - eps_hat(z_t, t)||^2] (1 - t0),
the decoder likelihood plus the latent prior's continuous-time variational bound. Training
minimises the same bound (all parts jointly).

Behind the calibration interface `log_probs(x, t)` is the decoder's distribution at every
position of x given the *denoised* plan: stem = encode x -> code z -> noise to level t ->
denoiser -> z_hat; blocks = the decoder; head = its token distribution. The engine quantizes
the decoder's blocks and, through `extra_block_stacks`, the prior's (`prior_blocks`, first:
the stem runs them): their rows are the K codes the stem denoises for each calibration
sequence. The prior's input, time and output layers stay in float like every stem and head
(docs/models.md, "Quantizing PLANNER's prior"). Frontier: the sampler decodes greedily from
the current plan at every denoising step; a position is written at the step from which its
decoded token stops changing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from faircalib.errors import CheckpointError
from faircalib.models.base import (
    BlockContext,
    BlockStack,
    DiffusionLM,
    VocabLayer,
    VocabLayers,
    config_from_dict,
)
from faircalib.models.diffusion_lm import _check_length, _evaluating, _stacked
from faircalib.models.gaussian import (
    Block,
    GaussianSchedule,
    block_linears,
    check_fields,
    keyed_normal,
    row_keys,
    time_features,
)

# keyed-noise streams: the stem's code noise and diffusion noise; the bound's three draws
STEM_CODE, STEM_DIFF, BOUND_CODE, BOUND_DIFF, BOUND_RECON = range(5)
X_HAT_CLAMP = 4.0  # codes are LayerNorm'ed: |z| > 4 is implausible, as images clip to [-1, 1]


@dataclass
class PlannerConfig:
    vocab_size: int
    mask_id: int
    seq_len: int = 128
    embed_dim: int = 16
    hidden_dim: int = 128  # the decoder's width
    plan_dim: int = 64  # the encoder's and the denoiser's width (they see K codes, or run once)
    n_heads: int = 4
    mlp_ratio: int = 2
    enc_blocks: int = 1
    n_prior_blocks: int = 2
    n_blocks: int = 2  # decoder blocks (the quantized ones)
    n_latents: int = 4
    latent_dim: int = 16
    latent_noise: float = 0.1
    gamma_min: float = -9.0
    gamma_max: float = 6.0
    t_min: float = 1e-3

    def __post_init__(self) -> None:
        check_fields(self, "PLANNER")
        if (
            self.hidden_dim % self.n_heads
            or self.plan_dim % self.n_heads
            or not 0 <= self.mask_id < self.vocab_size
        ):
            raise CheckpointError(
                f"PLANNER config: hidden_dim {self.hidden_dim} must split into {self.n_heads} "
                f"heads and mask_id {self.mask_id} lie in the vocabulary; fix config.json"
            )
        if not (self.gamma_min < self.gamma_max and 0 < self.t_min < 1 and self.latent_noise > 0):
            raise CheckpointError(
                "PLANNER config: need gamma_min < gamma_max, 0 < t_min < 1, latent_noise > 0; "
                "fix config.json"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlannerConfig:
        return config_from_dict(cls, d, "PLANNER")


class Planner(DiffusionLM):
    family = "planner"
    # the plan's ancestral steps, then the decoder: greedy or Gumbel-max at `temperature`
    sampler_fields = frozenset({"steps", "gen_length", "temperature", "cache"})

    def __init__(self, cfg: PlannerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.mask_id, self.seq_len = cfg.vocab_size, cfg.mask_id, cfg.seq_len
        self.schedule = GaussianSchedule(cfg.gamma_min, cfg.gamma_max, cfg.t_min)
        dim, pd, k, dz = cfg.hidden_dim, cfg.plan_dim, cfg.n_latents, cfg.latent_dim
        # token embedding factorised (V x e, then e -> D) and tied to the output: small files
        self.word_embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.embed_up = nn.Linear(cfg.embed_dim, dim)
        # paragraph encoder -> K codes
        self.enc_in = nn.Linear(cfg.embed_dim, pd)
        self.enc_pos = nn.Parameter(0.02 * torch.randn(cfg.seq_len, pd))
        self.max_positions = cfg.seq_len  # learned tables (enc_pos, dec_pos): none past it
        self.encoder = nn.ModuleList(
            Block(pd, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.enc_blocks)
        )
        self.latent_queries = nn.Parameter(0.02 * torch.randn(k, pd))
        self.enc_pool = nn.Linear(pd, 2 * pd)  # keys and values for the queries
        self.enc_out = nn.Linear(pd, dz)
        # latent diffusion prior (eps prediction)
        self.prior_in = nn.Linear(dz, pd)
        self.prior_pos = nn.Parameter(0.02 * torch.randn(k, pd))
        self.prior_time = nn.Sequential(nn.Linear(pd, pd), nn.SiLU(), nn.Linear(pd, pd))
        self.prior_blocks = nn.ModuleList(
            Block(pd, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_prior_blocks)
        )
        self.prior_out = nn.Sequential(nn.LayerNorm(pd), nn.Linear(pd, dz))
        # autoregressive decoder conditioned on the codes
        self.mem_proj = nn.Linear(dz, dim)
        self.dec_pos = nn.Parameter(0.02 * torch.randn(cfg.seq_len, dim))
        self.bos = nn.Parameter(0.02 * torch.randn(dim))
        self.blocks = nn.ModuleList(
            Block(dim, cfg.n_heads, cfg.mlp_ratio, causal=True, memory=True)
            for _ in range(cfg.n_blocks)
        )
        self.norm_f = nn.LayerNorm(dim)
        self.output_down = nn.Linear(dim, cfg.embed_dim)

    # --- parts -------------------------------------------------------------------------------
    def _tokens_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_up(self.word_embedding(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L] -> the codes' mean enc(x) [B, K, latent_dim] (unit scale per code)."""
        h = self.enc_in(self.word_embedding(x)) + self.enc_pos[: x.shape[1]]
        for block in self.encoder:
            h = block(h, BlockContext())
        keys, values = self.enc_pool(h).chunk(2, dim=-1)
        q = self.latent_queries.expand(x.shape[0], -1, -1)
        pooled = F.scaled_dot_product_attention(q, keys, values)  # [B, K, D]
        return F.layer_norm(self.enc_out(pooled), (self.cfg.latent_dim,)).float()

    def prior_stem(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prior's input to its blocks: z_t [B, K, dz], t [B] -> hidden [B, K, plan_dim]."""
        dt = self.prior_pos.dtype  # the codes are float32; weights may be bf16
        h = self.prior_in(z_t.to(dt)) + self.prior_pos
        return h + self.prior_time(time_features(t, self.cfg.plan_dim).to(dt))[:, None]

    def denoise_eps(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prior's noise prediction: z_t [B, K, dz], t [B] -> [B, K, dz]."""
        h = self.prior_stem(z_t, t)
        for block in self.prior_blocks:
            h = block(h, BlockContext())
        return self.prior_out(h).float()

    def x_hat(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoised plan (z_t - sigma eps_hat) / alpha, clamped to plausible codes."""
        a, s = self.schedule.alpha(t)[:, None, None], self.schedule.sigma(t)[:, None, None]
        return ((z_t - s * self.denoise_eps(z_t, t)) / a).clamp(-X_HAT_CLAMP, X_HAT_CLAMP)

    def decoder_stem(
        self, x: torch.Tensor, codes: torch.Tensor
    ) -> tuple[torch.Tensor, BlockContext]:
        """Decoder inputs: [BOS, x_0 .. x_{L-2}] (shifted right) and the codes as memory."""
        b, seq = x.shape
        shifted = torch.cat([self.bos.expand(b, 1, -1), self._tokens_in(x[:, :-1])], dim=1)
        return shifted + self.dec_pos[:seq], BlockContext(
            {"batch_memory": self.mem_proj(codes.to(self.bos.dtype))}
        )

    def decode_log_probs(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """log p(x_l | x_<l, codes) at every position: [B, L, V]."""
        h, ctx = self.decoder_stem(x, codes)
        for block in self.blocks:
            h = block(h, ctx)
        return self.head(h, ctx, x)

    # --- the three stages ------------------------------------------------------------------
    def stem(self, x_t: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, BlockContext]:
        """x_t: token ids [B, L] (never masked). The plan the decoder gets is the float prior's
        denoising of x's code at level t (t None: t_min), with noise keyed by (x, t)."""
        z_t, t = self.noisy_code(x_t, t)
        return self.decoder_stem(x_t, self.x_hat(z_t, t))

    def noisy_code(
        self, x_t: torch.Tensor, t: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the stem hands the prior for (x_t, t): the code of x_t noised to level t,
        z_t [B, K, dz], and t [B] (None: t_min), noise keyed by (x, t)."""
        b, _ = x_t.shape
        t = torch.full((b,), self.cfg.t_min, device=x_t.device) if t is None else t.float()
        t = t.to(x_t.device)
        keys, shape = row_keys(x_t, t), (self.cfg.n_latents, self.cfg.latent_dim)
        z = self.encode(x_t) + self.cfg.latent_noise * keyed_normal(keys, STEM_CODE, shape)
        a, s = self.schedule.alpha(t)[:, None, None], self.schedule.sigma(t)[:, None, None]
        return a * z + s * keyed_normal(keys, STEM_DIFF, shape), t

    def head(self, h: torch.Tensor, ctx: BlockContext, x_t: torch.Tensor) -> torch.Tensor:
        logits = self.output_down(self.norm_f(h)).float() @ self.word_embedding.weight.float().T
        logits[..., self.mask_id] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    def quantizable_linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        return block_linears(block)

    def extra_block_stacks(self) -> list[BlockStack]:
        """The latent prior's blocks, which the stem runs before the decoder: their rows are
        the K codes the stem denoises for each calibration sequence (z_t and t as the stem
        draws them), each weighted by its sequence's mean token weight. `prior_in`,
        `prior_time` and `prior_out` stay in float, as every family's stem and head do."""
        return [
            BlockStack(
                "prior_blocks",
                self.prior_blocks,
                self.prior_inputs,
                _per_code_weights(self.cfg.n_latents),
            )
        ]

    def prior_inputs(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, BlockContext]:
        """The prior's first-block input [B, K, plan_dim] for the stem's call on (x_t, t)."""
        z_t, t = self.noisy_code(x_t, t)
        return self.prior_stem(z_t, t), BlockContext()

    # --- the bound -------------------------------------------------------------------------------
    def bound_terms(
        self, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sequence [B] terms of the bound (nats), noise keyed by u (the caller's draw)."""
        keys = row_keys(u)
        shape = (self.cfg.n_latents, self.cfg.latent_dim)
        z = self.encode(x0) + self.cfg.latent_noise * keyed_normal(keys, BOUND_CODE, shape)
        lp = self.decode_log_probs(x0, z)
        dims = self.cfg.n_latents * self.cfg.latent_dim
        entropy = dims * (0.5 * math.log(2 * math.pi) + 0.5 + math.log(self.cfg.latent_noise))
        return {
            "decoder": -lp.gather(-1, x0[..., None]).squeeze(-1).sum(-1),
            **self.prior_terms(z, t, keys),
            "entropy": torch.full_like(t, entropy),  # of q(z | x), in closed form
        }

    def prior_terms(
        self, z: torch.Tensor, t: torch.Tensor, keys: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The latent prior's bound on -log p(z), z [B, K, dz], as [B] terms: `diffusion`
        (one t), `prior` (KL at t = 1) and `latent_recon` (-log N(z; z_t0 / alpha, sigma^2 /
        alpha^2), a density, so it may be negative)."""
        sch = self.schedule
        eps = keyed_normal(keys, BOUND_DIFF, tuple(z.shape[1:]))
        a, s = sch.alpha(t)[:, None, None], sch.sigma(t)[:, None, None]
        eps_hat = self.denoise_eps(a * z + s * eps, t)
        t0 = torch.full_like(t, self.cfg.t_min)
        log_std = torch.log(sch.sigma(t0) / sch.alpha(t0))  # [B]
        eps0 = keyed_normal(keys, BOUND_RECON, tuple(z.shape[1:]))
        dims = z.shape[1] * z.shape[2]
        return {
            "diffusion": sch.diffusion_weight() * (eps - eps_hat).pow(2).sum((-2, -1)),
            "prior": sch.prior_kl(z).sum(-1),
            "latent_recon": dims * (0.5 * math.log(2 * math.pi) + log_std)
            + 0.5 * eps0.pow(2).sum((-2, -1)),
        }

    def nelbo(self, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        terms = self.bound_terms(x0, t, u)
        prior = terms["diffusion"] + terms["prior"] + terms["latent_recon"]
        return terms["decoder"] + prior - terms["entropy"]

    # --- sampling --------------------------------------------------------------------------------
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
        """Reverse diffusion of the plan (cfg.steps ancestral steps from N(0, I)); after each
        step the decoder writes the continuation of the prompt from the current plan x_hat
        (greedy, or Gumbel-max at cfg.temperature with noise fixed per position). The plan is
        unconditional: the prompt steers only the decoder."""
        from faircalib.frontier.samplers import distribution_stats, result_from_beliefs
        from faircalib.models.diffusion_lm import _posterior_step

        prompt = prompt_ids.to(self.device, torch.long)
        b, p = prompt.shape
        _check_length(p, cfg, self.seq_len)
        gen = torch.Generator().manual_seed(seed)
        shape = (b, self.cfg.n_latents, self.cfg.latent_dim)
        gumbel = None
        if cfg.temperature > 0:
            u = torch.rand(b, cfg.gen_length, self.vocab_size, generator=gen, dtype=torch.float64)
            gumbel = (-torch.log(-torch.log(u.clamp_min(1e-300)))).to(self.device)
        grid = [
            self.cfg.t_min + (1 - self.cfg.t_min) * (1 - k / cfg.steps)
            for k in range(cfg.steps + 1)
        ]
        beliefs, stats, states = [], [], [] if record_states else None
        with _evaluating(self):
            z = torch.randn(shape, generator=gen).to(self.device)
            for k in range(cfg.steps):
                t = torch.full((b,), grid[k], device=self.device)
                plan = self.x_hat(z, t)
                tokens, lps = self.greedy_decode(
                    prompt, plan, cfg.gen_length, cfg.temperature, gumbel
                )
                if states is not None:  # replayable through log_probs: the text and its level
                    states.append((torch.cat([prompt, tokens], 1), t.clone()))
                beliefs.append(tokens)
                stats.append(distribution_stats(lps))
                z = _posterior_step(self.schedule, z, plan, grid[k], grid[k + 1], gen)
                if progress is not None:
                    progress(1)
        return result_from_beliefs(
            prompt, *_stacked(beliefs, stats), grid[:-1], states, "planner", trace=trace
        )

    def greedy_decode(
        self,
        prompt: torch.Tensor,
        plan: torch.Tensor,
        length: int,
        temperature: float = 0.0,
        gumbel: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `length` tokens after `prompt` [B, P] given the plan [B, K, dz]:
        -> tokens [B, G] and the decoder's log-probs at each written position [B, G, V]."""
        x = prompt
        out = []
        for j in range(length):
            # position n's distribution sees only x[:, :n]; a column of its own even when
            # x is empty (an unconditional sample: x[:, :1] would be 0 wide)
            pad = x.new_zeros(x.shape[0], 1)
            lp = self.decode_log_probs(torch.cat([x, pad], dim=1), plan)[:, -1]  # [B, V]
            score = lp.double() / temperature + gumbel[:, j] if gumbel is not None else lp
            x = torch.cat([x, score.argmax(-1, keepdim=True)], dim=1)
            out.append(lp)
        return x[:, prompt.shape[1] :], torch.stack(out, dim=1)

    # --- persistence -------------------------------------------------------------------------
    def vocab_layers(self) -> VocabLayers:
        """One tied matrix, `word_embedding` [V, embed_dim] (16 columns): the decoder's head
        scores against it, and the paragraph encoder reads it - the encoder's codes are the
        latent diffusion's data space, so quantizing it would move the codes the prior was
        trained on, not only a weight. Refused; it is ~V*16 parameters, no size win."""
        return VocabLayers(
            (VocabLayer("tied", "word_embedding"),),
            refusal=(
                "--quantize-head: the PLANNER family's only vocabulary layer, the tied 16-wide "
                "word_embedding, also feeds the paragraph encoder whose codes are the latent "
                "diffusion's data space; it is not quantized - leave --quantize-head off"
            ),
        )

    def config_dict(self) -> dict[str, Any]:
        return {"family": self.family, **asdict(self.cfg)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Planner:
        return cls(PlannerConfig.from_dict(config))


def _per_code_weights(n_latents: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Token row weights [N, L] -> the prior's code rows [N, K]: a sequence's codes carry its
    mean token weight (uniform weights stay exactly 1; FAIR-Calib's emphasis on unstable
    sequences carries over, its per-token detail cannot: a code serves every token)."""

    def rows(weights: torch.Tensor) -> torch.Tensor:
        return weights.float().mean(dim=1, keepdim=True).expand(-1, n_latents)

    return rows
