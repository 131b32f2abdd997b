"""Bidirectional LLaMA-style dLLMs (LLaDA, Dream): one block, one name map per family.

Both families are pre-norm LLaMA blocks - RMSNorm, rotary attention with grouped key/value
heads, a SiLU-gated MLP - run without a causal mask and without time conditioning. They differ
only in their tensor names, in a q/k/v bias (Dream has one) and in how logits line up with
positions (Dream's logits are shifted one position to the right). A family is therefore a
`NameMap` (where each module lives in the checkpoint) plus a config parser producing a
`LlamaSpec`.

The module tree is built at the checkpoint's own paths, so an upstream checkpoint loads by
name with no renaming, and what we write back (fake-quant or packed) keeps upstream's names
and config for the readers that know them. `blocks` is a property pointing into that tree.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from faircalib.errors import CheckpointError
from faircalib.fusion import fused_for_inference
from faircalib.models.base import (
    BlockContext,
    DiffusionLM,
    NormReaders,
    ResidualLayout,
    VocabLayer,
    VocabLayers,
    subs_log_probs,
)
from faircalib.models.mdlm import apply_rotary
from faircalib.models.schedule import LogLinearSchedule

# what older transformers exports store per attention layer (a buffer the model recomputes)
ROTARY_BUFFER = "rotary_emb.inv_freq"

# Keys the toolkit itself writes into config.json; never part of an architecture.
TOOLKIT_KEYS = frozenset({"family", "torch_dtype", "quantization_config", "faircalib"})


@dataclass(frozen=True)
class BlockNames:
    """Paths of a block's modules, relative to the block, as the checkpoint names them."""

    attn_norm: str
    q: str
    k: str
    v: str
    o: str
    mlp_norm: str
    gate: str  # the SiLU-gated branch
    up: str  # the linear branch
    down: str
    act: str  # the parameter-free SwiGLU, silu(gate) * up (upstream's activation module)

    def linears(self) -> tuple[str, ...]:
        """Quantizable linears in execution order (gate runs before up upstream)."""
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)


@dataclass(frozen=True)
class NameMap:
    """Paths of the model-level modules, relative to the model."""

    embed: str
    blocks: str
    final_norm: str
    lm_head: str  # absent when the embedding is tied to the output layer
    block: BlockNames


@dataclass(frozen=True)
class LlamaSpec:
    vocab_size: int  # rows of the embedding and the output layer, [MASK] included
    mask_id: int
    seq_len: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    rope_theta: float
    rms_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    shift_logits: bool  # position i is predicted from position i - 1's output (Dream)

    def __post_init__(self) -> None:
        if self.hidden % self.n_heads or (self.hidden // self.n_heads) % 2:
            raise CheckpointError(
                f"hidden size {self.hidden} must split into {self.n_heads} heads of even size"
            )
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(
                f"{self.n_heads} attention heads cannot share {self.n_kv_heads} key/value heads"
            )
        if not 0 <= self.mask_id < self.vocab_size:
            raise CheckpointError(
                f"mask_token_id {self.mask_id} outside the vocabulary of {self.vocab_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


def place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at dotted `path` under `root`, creating empty containers on the way."""
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, module)


class RMSNorm(nn.Module):
    """Normalised in float32, cast back, then scaled (the order both upstreams use).
    `fusable_op` names this computation for the inference kernels, which may swap the module
    for one that also quantizes its output (docs/models.md, "Fusable ops")."""

    fusable_op = "rms_norm"

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_for_inference(rms_norm, x, self.weight)(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on queries and keys in one call, so that on CUDA one fused kernel does both
    (eager: an fp32 copy, a half-swap, two products and a cast each)."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """silu(gate) * up: a module, not a call, so that the inference kernels can swap it for one
    that also quantizes its output for the down projection (`fusable_op`, as RMSNorm's)."""

    fusable_op = "swiglu"

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return fused_for_inference(swiglu, gate, up)(gate, up)


def rotary_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] for rotate-half rotary (pairs i, i + head_dim/2), in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # [L, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class LlamaLikeBlock(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + down(silu(gate(x)) * up(x)), x = norm(h)."""

    def __init__(self, spec: LlamaSpec, names: BlockNames) -> None:
        super().__init__()
        self.names = names
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        d, hd = spec.hidden, spec.head_dim
        q_out, kv_out = spec.n_heads * hd, spec.n_kv_heads * hd
        modules = {
            names.attn_norm: RMSNorm(d, spec.rms_eps),
            names.q: nn.Linear(d, q_out, bias=spec.qkv_bias),
            names.k: nn.Linear(d, kv_out, bias=spec.qkv_bias),
            names.v: nn.Linear(d, kv_out, bias=spec.qkv_bias),
            names.o: nn.Linear(q_out, d, bias=False),
            names.mlp_norm: RMSNorm(d, spec.rms_eps),
            names.gate: nn.Linear(d, spec.intermediate, bias=False),
            names.up: nn.Linear(d, spec.intermediate, bias=False),
            names.down: nn.Linear(spec.intermediate, d, bias=False),
            names.act: SwiGLU(),
        }
        for path, module in modules.items():
            place(self, path, module)

    def _m(self, path: str) -> nn.Module:
        # looked up on every call: calibration swaps linears for quantized stand-ins in place
        return self.get_submodule(path)

    def forward(self, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return self.forward_cached(h, ctx, None, None)

    def forward_cached(
        self, h: torch.Tensor, ctx: BlockContext, kv: Any, rows: slice | None
    ) -> torch.Tensor:
        """The block with a K/V cache (`frontier.cache`): kv None is the plain forward; rows
        None runs every position and stores its K/V in kv; a slice runs h = the hidden states
        of those rows only, attending to kv's stored K/V of the other positions."""
        n = self.names
        h = h + self._m(n.o)(self._attention(self._m(n.attn_norm)(h), ctx, kv, rows))
        x = self._m(n.mlp_norm)(h)
        gate, up = self._m(n.gate)(x), self._m(n.up)(x)
        return h + self._m(n.down)(self._m(n.act)(gate, up))

    def _attention(
        self, x: torch.Tensor, ctx: BlockContext, kv: Any = None, rows: slice | None = None
    ) -> torch.Tensor:
        """x [B, R, D] -> attention output [B, R, H * hd], before the output projection."""
        b, seq, _ = x.shape
        n, hd = self.names, self.head_dim
        q = self._m(n.q)(x).view(b, seq, self.n_heads, hd).transpose(1, 2)  # [B, H, L, hd]
        k = self._m(n.k)(x).view(b, seq, self.n_kv_heads, hd).transpose(1, 2)  # [B, KV, L, hd]
        v = self._m(n.v)(x).view(b, seq, self.n_kv_heads, hd).transpose(1, 2)
        cos, sin = ctx.tensors["rotary_cos"], ctx.tensors["rotary_sin"]
        if rows is not None:  # the rows' own positions
            cos, sin = cos[rows], sin[rows]
        q, k = fused_for_inference(rotary_qk, q, k)(q, k, cos, sin)
        if kv is not None:  # keys/values of every position: stored, or these rows' fresh ones
            k, v = kv.update(k, v, rows)
        group = self.n_heads // self.n_kv_heads  # kv head j serves query heads j*group ...
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: bidirectional
        return out.transpose(1, 2).reshape(b, seq, self.n_heads * hd)


class LlamaLikeLM(DiffusionLM):
    """A family sets `family`, `NAMES`, `TIE_KEY` and `parse_config` (upstream config.json ->
    LlamaSpec)."""

    NAMES: ClassVar[NameMap]
    TIE_KEY: ClassVar[str]  # upstream's config.json flag that ties embedding and output layer

    def __init__(self, spec: LlamaSpec, source_config: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        # upstream's config.json, kept whole so that what we write stays readable upstream
        self.source_config = {k: v for k, v in source_config.items() if k not in TOOLKIT_KEYS}
        self.vocab_size, self.mask_id, self.seq_len = spec.vocab_size, spec.mask_id, spec.seq_len
        self.schedule = LogLinearSchedule()  # mask probability t, NELBO weight 1/t
        n = self.NAMES
        place(self, n.embed, nn.Embedding(spec.vocab_size, spec.hidden))
        blocks = nn.ModuleList(LlamaLikeBlock(spec, n.block) for _ in range(spec.n_layers))
        place(self, n.blocks, blocks)
        place(self, n.final_norm, RMSNorm(spec.hidden, spec.rms_eps))
        if not spec.tie_embeddings:
            place(self, n.lm_head, nn.Linear(spec.hidden, spec.vocab_size, bias=False))

    @classmethod
    @abstractmethod
    def parse_config(cls, config: dict[str, Any]) -> LlamaSpec:
        """Upstream's config.json -> LlamaSpec; CheckpointError for what the block lacks."""

    @property
    def block_cache_lookback(self) -> int:
        """Rows before a cached window that must run too (`frontier.cache`): Dream's output
        at i - 1 predicts token i, so the row before the window runs as well."""
        return int(self.spec.shift_logits)

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self.get_submodule(self.NAMES.blocks)

    def stem(self, x_t: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, BlockContext]:
        """t is ignored: neither family is time-conditioned."""
        h = self.get_submodule(self.NAMES.embed)(x_t)  # [B, L, D]
        cos, sin = rotary_tables(x_t.shape[1], self.spec.head_dim, self.spec.rope_theta, x_t.device)
        return h, BlockContext({"rotary_cos": cos, "rotary_sin": sin})

    def head(self, h: torch.Tensor, ctx: BlockContext, x_t: torch.Tensor) -> torch.Tensor:
        h = self.get_submodule(self.NAMES.final_norm)(h)
        if self.spec.tie_embeddings:
            logits = F.linear(h, self.get_submodule(self.NAMES.embed).weight)
        else:
            logits = self.get_submodule(self.NAMES.lm_head)(h)  # [B, L, V]
        if self.spec.shift_logits:  # position 0 has no predecessor and keeps its own logits
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return subs_log_probs(logits, x_t, self.mask_id)

    def quantizable_linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        return [(path, block.get_submodule(path)) for path in self.NAMES.block.linears()]

    def checkpoint_tensors(
        self, tensors: dict[str, torch.Tensor], source: str
    ) -> dict[str, torch.Tensor]:
        """Drop what older upstream exports store besides the weights, as transformers does:
        rotary `inv_freq` buffers (checked against config.json's rope_theta: the frequencies
        are recomputed from it) and, for tied embeddings, an output-layer copy equal to the
        embedding. A copy that differs contradicts the tie: refused."""
        kept = {}
        for name, tensor in tensors.items():
            if name.endswith(ROTARY_BUFFER):
                self._check_inv_freq(name, tensor, source)
            else:
                kept[name] = tensor
        head = f"{self.NAMES.lm_head}.weight"
        if self.spec.tie_embeddings and head in kept:
            embedding = kept.get(f"{self.NAMES.embed}.weight")
            if embedding is None or not torch.equal(kept[head], embedding):
                raise CheckpointError(
                    f"{source}: config.json ties the embedding and the output layer, but the "
                    f"weights hold a different {head}; set the tie flag ({self.TIE_KEY}) to "
                    "false if the model has its own output layer"
                )
            del kept[head]
        return kept

    def _check_inv_freq(self, name: str, inv_freq: torch.Tensor, source: str) -> None:
        hd = self.spec.head_dim
        want = 1.0 / self.spec.rope_theta ** (torch.arange(0, hd, 2).double() / hd)
        ok = inv_freq.shape == want.shape and torch.allclose(
            inv_freq.double(), want, rtol=1e-2, atol=0
        )
        if not ok:
            raise CheckpointError(
                f"{source}: {name} holds rotary frequencies that config.json's rope_theta "
                f"({self.spec.rope_theta}) and head size ({hd}) do not give; fix rope_theta "
                "or drop the stale buffer from the weights"
            )

    def vocab_layers(self) -> VocabLayers:
        """The embedding (nn.Embedding) and the output Linear; one tied entry, the embedding,
        when the checkpoint ties them (LLaDA `weight_tying`, Dream `tie_word_embeddings`)."""
        n = self.NAMES
        if self.spec.tie_embeddings:
            return VocabLayers((VocabLayer("tied", n.embed),))
        return VocabLayers((VocabLayer("embedding", n.embed), VocabLayer("output", n.lm_head)))

    def residual_layout(self) -> ResidualLayout:
        """Pre-norm blocks: RMSNorm -> q, k, v and RMSNorm -> gate, up read the stream; o and
        down add to it; the final RMSNorm feeds the output layer (the embedding when tied)."""
        n, b = self.NAMES, self.NAMES.block
        norms, writers = [], []
        for i in range(len(self.blocks)):
            p = f"{n.blocks}.{i}."
            norms.append(NormReaders(p + b.attn_norm, (p + b.q, p + b.k, p + b.v)))
            norms.append(NormReaders(p + b.mlp_norm, (p + b.gate, p + b.up)))
            writers += [p + b.o, p + b.down]
        tied = self.spec.tie_embeddings
        return ResidualLayout(
            embedding=n.embed,
            norms=tuple(norms),
            writers=tuple(writers),
            final_norm=n.final_norm,
            head=None if tied else n.lm_head,
            untie_head=self.untie_head if tied else None,
        )

    @torch.no_grad()
    def untie_head(self) -> str:
        """Give the output layer its own weight, a copy of the tied embedding's (the same
        logits), and record it in the config, so a saved directory reloads untied. Returns
        the output layer's path."""
        n = self.NAMES
        table = self.get_submodule(n.embed).weight
        head = nn.Linear(self.spec.hidden, self.spec.vocab_size, bias=False)
        head = head.to(device=table.device, dtype=table.dtype)
        head.weight.copy_(table)
        place(self, n.lm_head, head)
        self.spec = replace(self.spec, tie_embeddings=False)
        self.source_config[self.TIE_KEY] = False
        return n.lm_head

    def config_dict(self) -> dict[str, Any]:
        return dict(self.source_config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlamaLikeLM:
        return cls(cls.parse_config(config), config)


# --- config field readers shared by the families' parsers ------------------------------------
_ABSENT = object()


def integer(config: dict[str, Any], key: str, family: str, *, default: Any = _ABSENT) -> int:
    value = config.get(key, default)
    if value is _ABSENT:
        raise CheckpointError(f"{family} config.json lacks {key}; add it (see the model's card)")
    if type(value) is not int:
        raise CheckpointError(f"{family} config.json: {key} must be an integer, got {value!r}")
    return value


def positive_int(config: dict[str, Any], key: str, family: str, *, default: Any = _ABSENT) -> int:
    value = integer(config, key, family, default=default)
    if value <= 0:
        raise CheckpointError(f"{family} config.json: {key} must be positive, got {value}")
    return value


def positive_float(config: dict[str, Any], key: str, default: float, family: str) -> float:
    value = config.get(key, default)
    # Python's json reads NaN and Infinity literals, which pass `> 0` or fail it silently
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(
            f"{family} config.json: {key} must be a positive finite number, got {value!r}"
        )
    return float(value)


def rope_theta(config: dict[str, Any], default: float, family: str) -> float:
    """The rotary base: `rope_theta`, or where transformers 5 saves it, `rope_parameters`
    ({"rope_theta": ..., "rope_type": "default"}). Other rope types (scaled rotary) are refused:
    only the plain rotary is implemented, and a silent default base gives wrong logits."""
    params = config.get("rope_parameters")
    if params is None:
        return positive_float(config, "rope_theta", default, family)
    if not isinstance(params, dict):
        raise CheckpointError(
            f"{family} config.json: rope_parameters must be an object, got {params!r}"
        )
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise CheckpointError(
            f"{family} config.json: rope_parameters.rope_type {kind!r} is not supported "
            "(faircalib implements the plain rotary embedding only); use a model with the default one"
        )
    theta = positive_float(params, "rope_theta", default, family)
    if (
        config.get("rope_theta") is not None
        and positive_float(config, "rope_theta", default, family) != theta
    ):
        raise CheckpointError(
            f"{family} config.json: rope_theta {config['rope_theta']!r} and "
            f"rope_parameters.rope_theta {theta!r} disagree; fix config.json"
        )
    return theta


def require_values(
    config: dict[str, Any], supported: dict[str, tuple[Any, tuple[Any, ...]]], family: str
) -> None:
    """supported: key -> (upstream default when absent, values we implement). Anything else
    would change the forward pass in a way this adapter does not reproduce, so it is refused."""
    for key, (default, allowed) in supported.items():
        value = config.get(key, default)
        if value not in allowed:
            raise CheckpointError(
                f"{family} config.json: {key}={value!r} is not supported (supported: "
                f"{', '.join(repr(a) for a in allowed)}): faircalib's {family} block does not "
                "compute it; use a checkpoint without it"
            )
