"""Replay a dLLM's forward pass from captured CUDA graphs.

Every denoising step of a sampler calls the model on a batch of the same shape, so the whole
forward pass - hundreds of kernel launches and the Python around them (per-layer backend
dispatch in quantized layers included) - can be captured once and replayed. For small models,
or small batches of large ones, that Python is what a step costs; replaying removes it.

    denoiser = CUDAGraphDenoiser(model)          # anything the samplers accept
    result = generate(denoiser, prompts, cfg, seed)

One graph is captured per (input shape, t given or not, autocast state); the first call of each
warms up on a side stream first (kernel autotuning, layout caches) and is not captured.

Cached block decoding (`frontier.cache`, prefix and dual) is replayed too: the sampler hands
`cached_log_probs` to the wrapper, which keeps one K/V cache per canvas shape whose tensors
never move. A block's first step (the refresh) is one graph that writes every layer's K/V into
that cache; each later step is a graph per row window (one per block: the windows differ in
position, so their slices are baked into separate captures) that writes its rows' K/V in place
and attends to the rest. Replays run in sampling order on one stream, so the shared memory pool
never hands one graph's live tensors to another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from faircalib.errors import ConfigError
from faircalib.models.base import DiffusionLM


def capture(
    fn: Callable[[], Any], device: torch.device | str = "cuda", pool: Any = None
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """-> (graph, fn's output captured in it). `fn` runs twice first on a side stream, so
    autotuning, layout caches and lazy initialisation happen outside the capture, as it needs;
    the capture runs on that stream too, so what was set up per stream (the split-K GEMM's
    counters, `kernels.triton_w8a8._split_counters`) is found there, not made in the graph.
    It is one stream per device for every capture: the caching allocator reuses a block only on
    the stream that allocated it, so graphs sharing a `pool` share memory only when captured on
    one stream (as torch.cuda.graph's own default capture stream is shared)."""
    device = torch.device(device)
    side = _capture_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        out = fn()
    return graph, out


_capture_streams: dict[int, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capture_streams:
        _capture_streams[index] = torch.cuda.Stream(index)
    return _capture_streams[index]


class CUDAGraphDenoiser:
    """`log_probs(x_t, t)` of `model` from CUDA graph replays; every other attribute (vocab_size,
    mask_id, schedule, seq_len, eval, ...) is the wrapped model's. Weights must not change after
    the first call: a graph replays the kernels it captured, reading the tensors it captured."""

    def __init__(self, model: DiffusionLM, *, capture_fn: Callable | None = None) -> None:
        """`capture_fn` (graph, output) = capture_fn(fn, device, pool) replaces `capture`:
        the CPU tests pass a stand-in whose replay re-runs fn into the captured output."""
        if capture_fn is None and model.device.type != "cuda":
            raise ConfigError(
                f"CUDA graphs need the model on a CUDA device, it is on {model.device}"
            )
        self.model = model
        self._capture_fn = capture_fn or capture
        self._graphs: dict[tuple, tuple] = {}
        self._caches: dict[tuple, Any] = {}  # canvas key -> the K/V cache its graphs share
        # one memory pool shared by all graphs
        self._pool = torch.cuda.graph_pool_handle() if capture_fn is None else None

    def __getattr__(self, name: str) -> Any:  # only called for names not found on self
        return getattr(self.__dict__["model"], name)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_probs(x_t, t)

    def log_probs(self, x_t: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """x_t [B, L] (and t [B]) -> log-probs [B, L, V]: a fresh tensor, as the model returns."""
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        key = (tuple(x_t.shape), t is None, autocast)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x_t, t)
        static_x, static_t, graph, out = self._graphs[key]
        static_x.copy_(x_t)
        if t is not None:
            static_t.copy_(t.to(static_t.dtype))
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    def clear(self) -> None:
        """Drop every captured graph and K/V cache. Graphs are kept per input shape (and, for
        cached steps, per block window), so a long-lived process serving many prompt lengths
        grows; clearing frees their memory, the next calls capture again."""
        self._graphs.clear()
        self._caches.clear()

    @property
    def graphs(self) -> int:
        """How many graphs have been captured (one per input shape and mode)."""
        return len(self._graphs)

    def _capture(self, x_t: torch.Tensor, t: torch.Tensor | None) -> tuple:
        device = self.model.device
        static_x = x_t.to(device).clone()
        static_t = None if t is None else t.to(device).float().clone()
        fn = lambda: self.model.log_probs(static_x, static_t)  # noqa: E731
        graph, out = self._capture_fn(fn, device, self._pool)
        return static_x, static_t, graph, out

    def cached_log_probs(
        self, x_t: torch.Tensor, t: torch.Tensor | None, cache: Any, rows: slice | None
    ) -> tuple[torch.Tensor, int]:
        """`frontier.cache.cached_log_probs` from graph replays (see the module docstring).
        `cache`, the sampler's, is pointed at the wrapper's own K/V (its size is reported)."""
        from faircalib.frontier.cache import BlockKVCache
        from faircalib.frontier.cache import cached_log_probs as eager_cached

        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        canvas = (tuple(x_t.shape), t is None, autocast)
        window = None if rows is None else (rows.start, rows.stop)
        if canvas not in self._caches:
            if rows is not None:
                raise RuntimeError("cached step before the cache was filled (no refresh ran)")
            device = self.model.device
            static_x = x_t.to(device).clone()
            static_t = None if t is None else t.to(device).float().clone()
            self._caches[canvas] = (static_x, static_t, BlockKVCache.empty(len(self.model.blocks)))
        static_x, static_t, kv = self._caches[canvas]
        static_x.copy_(x_t)
        if t is not None:
            static_t.copy_(t.to(static_t.dtype))
        key = ("cached", canvas, window)
        if key not in self._graphs:  # the capture's warm-up runs fill or update kv first
            fn = lambda: eager_cached(self.model, static_x, static_t, kv, rows)  # noqa: E731
            self._graphs[key] = self._capture_fn(fn, self.model.device, self._pool)
        graph, (out, n_rows) = self._graphs[key]
        graph.replay()
        cache.layers = kv.layers
        return out.clone(), n_rows
