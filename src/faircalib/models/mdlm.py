"""MDLM (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models").

A bidirectional transformer (DiT blocks: pre-LayerNorm, rotary attention, GELU MLP, adaLN
modulation from a noise-level embedding) trained with the SUBS parameterisation. Module and
tensor names follow the public MDLM backbone, so the `mdlm-owt` checkpoint layout maps onto
this class by dropping its `backbone.` prefix (see `faircalib.models.loaders`).

Time conditioning is configurable. Our reference models turn it off, as MDLM's own OWT model
does: with the log-linear schedule the fraction of masks in `x_t` already reveals `t`, and
without it the adaLN vectors are constants, so the blocks are plain transformer blocks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from faircalib.errors import CheckpointError
from faircalib.models.base import (
    BlockContext,
    DiffusionLM,
    VocabLayer,
    VocabLayers,
    subs_log_probs,
)
from faircalib.models.schedule import LogLinearSchedule

# config field -> accepted range (far beyond any real MDLM: 8B models have ~32 blocks)
_INT_RANGES = {
    "vocab_size": (2, 2**22),
    "mask_id": (0, 2**22),
    "seq_len": (1, 2**20),
    "hidden_dim": (2, 2**16),
    "cond_dim": (1, 2**16),
    "n_blocks": (1, 1024),
    "n_heads": (1, 1024),
    "mlp_ratio": (1, 64),
}


@dataclass
class MDLMConfig:
    vocab_size: int  # output classes, [MASK] included
    mask_id: int
    seq_len: int = 512
    hidden_dim: int = 384
    cond_dim: int = 128
    n_blocks: int = 8
    n_heads: int = 6
    mlp_ratio: int = 4
    dropout: float = 0.0
    time_conditioning: bool = False

    def __post_init__(self) -> None:
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            # bool is an int to Python, not to a config; bounds keep a lying config from
            # building millions of modules before its tensors are compared
            if type(value) is not int or not low <= value <= high:
                raise CheckpointError(
                    f"MDLM config field {name} must be an integer in [{low}, {high:,}], got "
                    f"{value!r}; fix config.json"
                )
        if type(self.time_conditioning) is not bool:
            raise CheckpointError(
                f"MDLM config field time_conditioning must be true or false, got "
                f"{self.time_conditioning!r}; fix config.json"
            )
        if type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            raise CheckpointError(
                f"MDLM config field dropout must be a number in [0, 1), got {self.dropout!r}; "
                "fix config.json"
            )
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise CheckpointError(
                f"hidden_dim {self.hidden_dim} must split into {self.n_heads} heads of even size; "
                "fix config.json"
            )
        if not 0 <= self.mask_id < self.vocab_size:
            raise CheckpointError(
                f"mask_id {self.mask_id} outside vocabulary of {self.vocab_size}; fix config.json"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MDLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"family", "torch_dtype", "quantization_config", "faircalib"}
        if unknown:
            raise CheckpointError(f"unknown MDLM config fields: {sorted(unknown)}; fix config.json")
        return cls(**{k: v for k, v in d.items() if k in known})


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (as MDLM does)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (self.dim,))
        return (y * self.weight.float()).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level sigma, then a 2-layer MLP."""

    def __init__(self, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:  # [B] -> [B, cond_dim]
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # float32
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # a bf16 / fp16 model's dtype


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [L, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [L, head_dim]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, L, hd]; cos/sin: [L, hd]
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, cfg: MDLMConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.n_heads = cfg.n_heads
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.mlp_ratio * d, d),
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return self.forward_cached(h, ctx, None, None)

    def forward_cached(
        self, h: torch.Tensor, ctx: BlockContext, kv: Any, rows: slice | None
    ) -> torch.Tensor:
        """The block with a K/V cache (`frontier.cache`): kv None is the plain forward; rows
        None runs every position and stores its K/V in kv; a slice runs h = the hidden states
        of those rows only, attending to kv's stored K/V of the other positions."""
        b, seq, d = h.shape
        mod = self.adaLN_modulation(ctx.tensors["batch_cond"])[:, None, :].to(h.dtype)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)

        x = modulate(self.norm1(h), shift_a, scale_a)
        qkv = self.attn_qkv(x).view(b, seq, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, hd]
        cos, sin = ctx.tensors["rotary_cos"], ctx.tensors["rotary_sin"]
        if rows is not None:  # the rows' own positions
            cos, sin = cos[rows], sin[rows]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:  # keys/values of every position: stored, or these rows' fresh ones
            k, v = kv.update(k, v, rows)
        attn = F.scaled_dot_product_attention(q, k, v)  # bidirectional: no mask
        attn = attn.transpose(1, 2).reshape(b, seq, d)
        h = h + gate_a * self.dropout(self.attn_out(attn))

        x = modulate(self.norm2(h), shift_m, scale_m)
        return h + gate_m * self.dropout(self.mlp(x))


class FinalLayer(nn.Module):
    def __init__(self, cfg: MDLMConfig) -> None:
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_dim)
        self.linear = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].to(h.dtype).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding[x]


class MDLM(DiffusionLM):
    family = "mdlm"
    block_cache_lookback = 0  # opts in to `frontier.cache`: position i's output predicts i

    def __init__(self, cfg: MDLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.mask_id, self.seq_len = cfg.vocab_size, cfg.mask_id, cfg.seq_len
        self.schedule = LogLinearSchedule()
        self.vocab_embed = EmbeddingLayer(cfg.hidden_dim, cfg.vocab_size)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.hidden_dim // cfg.n_heads)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_blocks))
        self.output_layer = FinalLayer(cfg)

    def stem(self, x_t: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, BlockContext]:
        b, seq = x_t.shape
        if self.cfg.time_conditioning and t is not None:
            sigma = self.schedule.sigma(t.to(x_t.device).float())
        else:
            sigma = torch.zeros(b, device=x_t.device)
        cond = F.silu(self.sigma_map(sigma))  # [B, cond_dim]
        cos, sin = self.rotary_emb(seq, x_t.device)
        h = self.vocab_embed(x_t)
        return h, BlockContext({"batch_cond": cond, "rotary_cos": cos, "rotary_sin": sin})

    def head(self, h: torch.Tensor, ctx: BlockContext, x_t: torch.Tensor) -> torch.Tensor:
        logits = self.output_layer(h, ctx.tensors["batch_cond"])
        return subs_log_probs(logits, x_t, self.mask_id)

    def quantizable_linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        return [
            ("attn_qkv", block.attn_qkv),
            ("attn_out", block.attn_out),
            ("mlp.0", block.mlp[0]),
            ("mlp.2", block.mlp[2]),
        ]

    def vocab_layers(self) -> VocabLayers:
        """Untied: the raw `vocab_embed.embedding` parameter [V, D] and the output Linear."""
        return VocabLayers(
            (
                VocabLayer("embedding", "vocab_embed", "embedding"),
                VocabLayer("output", "output_layer.linear"),
            )
        )

    def config_dict(self) -> dict[str, Any]:
        return {"family": self.family, **asdict(self.cfg)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MDLM:
        return cls(MDLMConfig.from_dict(config))
