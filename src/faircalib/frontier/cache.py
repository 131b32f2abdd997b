"""Cached block decoding for masked dLLMs (Fast-dLLM's prefix and dual cache).

Semi-autoregressive sampling fills the generated region block by block. Fast-dLLM (Wu et al.
2025, arXiv 2505.22618) observed that the attention keys/values of the positions outside the
current block change little while that block is being filled, and reuses them:

- at the first step of every block the whole canvas runs, as without a cache, and every
  layer's K/V (after rotary) of every position is kept (the *refresh*);
- ``prefix``: the block's other steps run the token rows from the block start to the end of
  the canvas (the current block and the still-masked suffix), attending to the kept K/V of
  the prompt and the finished blocks and to fresh K/V of their own rows;
- ``dual``: those steps run only the current block's rows; the prefix and the suffix K/V both
  come from the refresh.

Attention is bidirectional, so this is an approximation: the prompt's and finished blocks'
K/V above the first layer depend on the (changing) masked positions, and the suffix's on the
current block. Exact pieces: the refresh step equals the uncached step bit for bit; layer 0's
K/V of rows whose tokens did not change equal recomputed ones; a one-layer model's cached
generation equals its uncached one. `frontier.metrics.cache_flip_metrics` measures the
departure on real prompts.

Samplers without blocks (``ancestral``, Dream's orders) treat the generated region as one
block: the prompt's K/V are cached at step 0 (prefix and dual are then the same thing).

A family opts in by giving its model a `block_cache_lookback` attribute (0, or 1 when the
output at i - 1 predicts token i, as Dream's does) and its blocks a method
``forward_cached(h, ctx, kv, rows)``: rows None runs every position and stores K/V in `kv`
(`LayerKV.update`); a slice runs h's rows only (h is [B, rows, D]) against the stored K/V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CACHE_MODES = ("none", "prefix", "dual")


@dataclass
class LayerKV:
    """One layer's keys and values of the whole canvas, [B, H_kv, L, hd], after rotary."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def update(
        self, k: torch.Tensor, v: torch.Tensor, rows: slice | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store fresh K/V (of every position when rows is None, else of `rows`) and return
        the K/V to attend to. The refresh attends to its own tensors (so it is the uncached
        computation exactly); a cached step writes its rows in place - they are recomputed at
        every step, so the stored copy of them is never read - and attends to the whole."""
        if rows is None:
            if _same_layout(self.keys, k) and _same_layout(self.values, v):
                # kept storage (a reused cache): a CUDA graph that captured this refresh writes
                # where the graphs of the block's other steps read (models.cuda_graph)
                self.keys.copy_(k)
                self.values.copy_(v)
            else:
                self.keys, self.values = k.contiguous(), v.contiguous()
            return k, v
        if self.keys is None or self.values is None:
            raise RuntimeError("cached step before the cache was filled (no refresh step ran)")
        self.keys[:, :, rows] = k
        self.values[:, :, rows] = v
        return self.keys, self.values


def _same_layout(stored: torch.Tensor | None, fresh: torch.Tensor) -> bool:
    return (
        stored is not None
        and stored.shape == fresh.shape
        and stored.dtype == fresh.dtype
        and stored.device == fresh.device
    )


@dataclass
class BlockKVCache:
    layers: list[LayerKV] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int) -> BlockKVCache:
        return cls([LayerKV() for _ in range(n_layers)])

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for kv in self.layers
            for t in (kv.keys, kv.values)
            if t is not None
        )


def supports_block_cache(model: object) -> bool:
    """Whether `model`'s family opted in (see the module docstring)."""
    if getattr(model, "block_cache_lookback", None) is None:
        return False
    blocks = getattr(model, "blocks", None)
    return blocks is not None and all(hasattr(b, "forward_cached") for b in blocks)


def cached_log_probs(
    model: object,
    x_t: torch.Tensor,
    t: torch.Tensor | None,
    cache: BlockKVCache,
    rows: slice | None,
) -> tuple[torch.Tensor, int]:
    """-> (log-probs, token rows run per sequence).

    rows None: the refresh, every position through every block, K/V stored in `cache`; returns
    [B, L, V], identical to `model.log_probs(x_t, t)`. rows a slice [a, b): only those rows
    (plus `block_cache_lookback` rows before them) run, attending to the cached K/V elsewhere;
    returns [B, b - a, V], the log-probs of positions a .. b - 1.

    A model wrapper with its own `cached_log_probs` (`models.cuda_graph.CUDAGraphDenoiser`,
    which replays these steps from CUDA graphs) is handed the call."""
    if hasattr(type(model), "cached_log_probs"):
        return model.cached_log_probs(x_t, t, cache, rows)
    h, ctx = model.stem(x_t, t)
    blocks = list(model.blocks)
    if len(cache.layers) != len(blocks):
        raise ValueError(f"cache has {len(cache.layers)} layers, model {len(blocks)} blocks")
    if rows is None:
        for block, kv in zip(blocks, cache.layers, strict=True):
            h = block.forward_cached(h, ctx, kv, None)
        return model.head(h, ctx, x_t), x_t.shape[1]
    lo = max(rows.start - int(model.block_cache_lookback), 0)
    window = slice(lo, rows.stop)
    h = h[:, window]
    for block, kv in zip(blocks, cache.layers, strict=True):
        h = block.forward_cached(h, ctx, kv, window)
    # a shifted head moves outputs one position right: row lo's output lands on lo + 1, and
    # the window's first log-prob row (row lo's own, or its copy at position 0) is dropped
    out = model.head(h, ctx, x_t[:, window])
    return out[:, rows.start - lo :], rows.stop - lo
