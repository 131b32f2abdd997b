"""Shared parts of the Gaussian (continuous) diffusion families: Diffusion-LM and PLANNER.

* `GaussianSchedule`: variance-preserving diffusion with log-SNR linear in t (VDM, Kingma et
  al. 2021). With it the continuous-time bound's integrand is flat in t, so the uniform t draws
  that `eval/bound.py` and training already make are a good importance sampler.
* Keyed Gaussian noise: the noise a continuous family needs is a pure function of the inputs
  the shared code already passes (`t`, the uniforms `u`, or the token ids), so the float and a
  quantized model see the same draw (common random numbers) without any new argument.
* `Block`: a pre-LayerNorm transformer block whose quantizable linears carry MDLM's names
  (`attn_qkv`, `attn_out`, `mlp.0`, `mlp.2`); optionally causal, optionally attending to a
  few memory vectors (PLANNER's latent codes) through its own float `mem_kv` projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from faircalib.models.base import BlockContext

_M = 2_147_483_647  # 2^31 - 1: keys stay small enough that no product overflows int64


class GaussianSchedule:
    """alpha_t^2 = sigmoid(gamma(t)), sigma_t^2 = sigmoid(-gamma(t)), gamma(t) = log SNR(t)
    falling linearly from gamma_max (t = 0) to gamma_min (t = 1).

    `mask_prob` is 0: no token is ever replaced by [MASK]; Gaussian noise on embeddings is
    the corruption. Shared code that builds masked inputs from (tokens, t) (calibration)
    therefore hands these models clean tokens and t, and the model noises them itself.
    """

    def __init__(self, gamma_min: float = -9.0, gamma_max: float = 6.0, t_min: float = 1e-3):
        self.gamma_min, self.gamma_max, self.t_min = gamma_min, gamma_max, t_min

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_max - (self.gamma_max - self.gamma_min) * t

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gamma(t)).sqrt()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-self.gamma(t)).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.gamma(t))

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def diffusion_weight(self) -> float:
        """-gamma'(t) / 2 * (1 - t_min): the weight of SNR(t) ||x - x_hat||^2 in the one-sample
        estimate of the bound's diffusion term over t ~ U(t_min, 1) (VDM eq. 17)."""
        return 0.5 * (self.gamma_max - self.gamma_min) * (1 - self.t_min)

    def prior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """KL(q(z_1 | x) || N(0, I)) summed over the last dim: x [..., d] -> [...]."""
        one = torch.ones((), device=x.device)
        a2, s2 = self.alpha(one) ** 2, self.sigma(one) ** 2
        return 0.5 * (a2 * x.float().pow(2) + s2 - 1 - torch.log(s2)).sum(-1)


# --- keyed noise -------------------------------------------------------------------------------
def row_keys(x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """One integer key per row of x [B, ...] (token ids or floats, hashed by value), mixed with
    t [B]: equal (row, t) -> equal key, so repeated forwards of one input see one noise draw."""
    flat = x.reshape(x.shape[0], -1)
    if flat.is_floating_point():
        flat = flat.float().view(torch.int32).long() & 0x7FFFFFFF
    flat = flat.long() % _M
    n = flat.shape[1]
    powers = torch.tensor([pow(1_000_003, i, _M) for i in range(n)], device=x.device)
    key = ((flat * powers) % _M).sum(-1) % _M
    if t is not None:
        t_bits = t.float().view(torch.int32).long() & 0x7FFFFFFF
        key = (key * 1_000_033 + t_bits) % _M
    return key


def keyed_normal(keys: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape] standard normals; row b drawn from a CPU generator seeded by (keys[b],
    stream), so the draw is the same on every device and in every batch composition."""
    rows = []
    for key in keys.tolist():
        gen = torch.Generator().manual_seed(int(key) * 7919 + stream)
        rows.append(torch.randn(shape, generator=gen))
    return torch.stack(rows).to(keys.device)


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 32-bit values held in int64 (xorshift-multiply rounds; both
    multipliers are below 2^31, so no product leaves int64 and every device computes the same)."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def hashed_normal(keys: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape] standard normals on keys' device, a pure function of (keys[b], stream): the
    vectorised sibling of `keyed_normal` for training, where one CPU generator a row held a
    small model's GPU step to ~30 steps/s (27 ms of host work for [256, 128, 128]). Each value
    hashes its counter and its row's key together (XOR, then a second round keyed by the row
    again: rows never share shifted copies of one sequence, as an additive mix would), giving
    two uniforms in (0, 1] a pair of normals (Box-Muller). Keys are `row_keys` values (< 2^31),
    so every product stays in int64; equal on every device up to float rounding."""
    n = math.prod(shape)
    pairs = (n + 1) // 2  # Box-Muller gives two normals (cos, sin) from each pair of uniforms
    row = _mix32(keys.long() * 1_000_003 + stream)[:, None]  # [B, 1]
    row2 = _mix32(row ^ 0x2545F491)
    counter = _mix32(torch.arange(2 * pairs, device=keys.device) * 0x9E3779B9)  # [2 pairs]
    bits = _mix32(_mix32(counter ^ row) ^ row2)  # [B, 2 pairs], 32 random bits each
    uniform = ((bits >> 8).float() + 0.5) * 2.0**-24  # in (0, 1]: log never sees 0
    radius = torch.sqrt(-2.0 * torch.log(uniform[:, :pairs]))
    angle = 2 * math.pi * uniform[:, pairs:]
    normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :n]
    return normal.view(len(keys), *shape)


# --- modules -----------------------------------------------------------------------------------
def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t [...] in [0, 1] -> [..., dim] (t scaled to 0..1000, as DDPM);
    t is [B] (one level a sequence) or [B, L] (one a position, Diffusion-LM's training)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = 1000 * t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    """Pre-LN transformer block. ctx keys: `batch_memory` [B, M, D] when `memory` is on (the
    memory's keys and values come from `mem_kv`, kept in float: its rows are memory vectors,
    not tokens, so the engine's per-token row weights do not apply to them)."""

    def __init__(
        self, dim: int, n_heads: int, mlp_ratio: int, *, causal: bool = False, memory: bool = False
    ) -> None:
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.norm1 = nn.LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        self.mem_kv = nn.Linear(dim, 2 * dim) if memory else None

    def forward(self, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        b, n, d = h.shape
        heads, hd = self.n_heads, d // self.n_heads
        q, k, v = self.attn_qkv(self.norm1(h)).view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        mask = None
        if self.causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        if self.mem_kv is not None:
            mem = ctx.tensors["batch_memory"]  # [B, M, D]
            mk, mv = self.mem_kv(mem).view(b, mem.shape[1], 2, heads, hd).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2)
            if mask is not None:  # every token sees all memory vectors
                see_mem = torch.ones(n, mem.shape[1], dtype=torch.bool, device=h.device)
                mask = torch.cat([see_mem, mask], dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.attn_out(attn.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The quantizable linears of a `Block`, in execution order (mem_kv stays in float)."""
    return [
        ("attn_qkv", block.attn_qkv),
        ("attn_out", block.attn_out),
        ("mlp.0", block.mlp[0]),
        ("mlp.2", block.mlp[2]),
    ]


# integer config fields for which 0 is meaningful (an id, or "off")
ZERO_ALLOWED = frozenset({"mask_id", "time_warp_bins"})


def check_fields(cfg: object, family: str) -> None:
    """Refuse a config whose integer fields are not positive integers (mask_id: >= 0) or whose
    float fields are not numbers: config.json is the only input of the builders."""
    from dataclasses import fields

    from faircalib.errors import CheckpointError

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.type == "int":
            ok = type(value) is int and value >= (0 if f.name in ZERO_ALLOWED else 1)
        elif f.type == "bool":
            ok = type(value) is bool
        else:
            ok = type(value) in (int, float) and math.isfinite(value)
        if not ok:
            kind = {"int": "positive integer", "bool": "boolean"}.get(f.type, "finite number")
            raise CheckpointError(
                f"{family} config field {f.name} must be a {kind}, got {value!r}; fix config.json"
            )
