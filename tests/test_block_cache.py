"""Cached block decoding (`frontier.cache`, Fast-dLLM's prefix and dual cache) on tiny random
MDLM, LLaDA and Dream models.

Under bidirectional attention the cache is an approximation, so only these equalities are
exact, and they are what is tested:
- the refresh step (a block's first) is the uncached forward, bit for bit;
- layer 0's K/V of a row depend on its token alone: rows whose tokens did not change keep
  bit-identical K/V, so a ONE-layer model's cached step equals its uncached step, and its
  cached generation equals the uncached one (any sampler, prefix or dual);
- with one step per block every step is a refresh: cached == uncached at any depth.
A two-layer model shows the approximation is really taken (the cached step differs).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from faircalib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.frontier import SamplerConfig, generate
from faircalib.frontier.cache import BlockKVCache, cached_log_probs, supports_block_cache
from faircalib.frontier.metrics import cache_flip_metrics
from faircalib.kernels.quant_linear import QuantLinear
from faircalib.models.dream import Dream
from faircalib.models.llada import LLaDA
from faircalib.models.mdlm import MDLM, MDLMConfig, apply_rotary, modulate
from llama_like_ckpt import dream_config, llada_config

FAMILIES = ("mdlm", "llada", "dream")


def build(family: str, layers: int, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    if family == "mdlm":
        cfg = MDLMConfig(
            vocab_size=48, mask_id=47, seq_len=40, hidden_dim=32, cond_dim=16, n_blocks=layers,
            n_heads=2,
        )  # fmt: skip
        model = MDLM(cfg)
    elif family == "llada":
        model = LLaDA.from_config(llada_config(n_layers=layers))
    else:
        model = Dream.from_config(dream_config(num_hidden_layers=layers))
    with torch.no_grad():  # MDLM zero-inits its adaLN and output: make every path matter
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() < 2 else 1 / math.sqrt(p.shape[-1]))
    # MDLM's time embedding computes in float32, so MDLM stays float32
    return model.to(torch.float32 if family == "mdlm" else dtype).eval()


def tol(t: torch.Tensor) -> float:
    return 1e-10 if t.dtype == torch.float64 else 2e-5


def prompt_for(model, batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab_size - 1, (batch, length), generator=gen)
    return ids.masked_fill(ids == model.mask_id, 0)


def canvas(model, prompt: torch.Tensor, gen_length: int, filled: int = 0) -> torch.Tensor:
    """The prompt, then `filled` random committed tokens, then masks."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), model.mask_id)
    x[:, :p] = prompt
    if filled:
        x[:, p : p + filled] = prompt_for(model, b, filled, seed=7)
    return x


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_opts_in(family):
    assert supports_block_cache(build(family, 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_refresh_step_is_the_uncached_forward_bit_for_bit(family):
    model = build(family, 2, dtype=torch.float32)
    x = canvas(model, prompt_for(model), 8, filled=3)
    t = torch.full((2,), 0.5)
    with torch.inference_mode():
        out, rows = cached_log_probs(model, x, t, BlockKVCache.empty(2), None)
        assert rows == x.shape[1] and torch.equal(out, model.log_probs(x, t))


def reference_dit_block(block, h, ctx):
    """MDLM's DiT block as it was written before the cache (the plain forward must be it)."""
    b, seq, d = h.shape
    mod = block.adaLN_modulation(ctx.tensors["batch_cond"])[:, None, :].to(h.dtype)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
    x = modulate(block.norm1(h), shift_a, scale_a)
    q, k, v = (
        block.attn_qkv(x).view(b, seq, 3, block.n_heads, d // block.n_heads).permute(2, 0, 3, 1, 4)
    )
    cos, sin = ctx.tensors["rotary_cos"], ctx.tensors["rotary_sin"]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, seq, d)
    h = h + gate_a * block.dropout(block.attn_out(attn))
    return h + gate_m * block.dropout(block.mlp(modulate(block.norm2(h), shift_m, scale_m)))


def reference_llama_block(block, h, ctx):
    """The LLaMA-style block as it was written before the cache."""
    n, hd, b, seq = block.names, block.head_dim, h.shape[0], h.shape[1]
    m = block.get_submodule
    x = m(n.attn_norm)(h)
    q = m(n.q)(x).view(b, seq, block.n_heads, hd).transpose(1, 2)
    k = m(n.k)(x).view(b, seq, block.n_kv_heads, hd).transpose(1, 2)
    v = m(n.v)(x).view(b, seq, block.n_kv_heads, hd).transpose(1, 2)
    cos, sin = ctx.tensors["rotary_cos"], ctx.tensors["rotary_sin"]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    group = block.n_heads // block.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, seq, -1)
    h = h + m(n.o)(out)
    x = m(n.mlp_norm)(h)
    return h + m(n.down)(F.silu(m(n.gate)(x)) * m(n.up)(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_block_forward_is_unchanged(family):
    model = build(family, 1, dtype=torch.float32)
    x = canvas(model, prompt_for(model), 8, filled=2)
    reference = reference_dit_block if family == "mdlm" else reference_llama_block
    with torch.inference_mode():
        h, ctx = model.stem(x, torch.full((2,), 0.3))
        assert torch.equal(model.blocks[0](h, ctx), reference(model.blocks[0], h, ctx))


def cached_step_vs_uncached(model, mode: str, block: int = 4, gen_length: int = 12):
    """Refresh at a block start, commit two tokens of the block, then one cached step:
    -> (cached log-probs of the window, uncached log-probs of the same positions)."""
    prompt = prompt_for(model)
    p = prompt.shape[1]
    x = canvas(model, prompt, gen_length, filled=block)  # block 0 finished; block 1 current
    t = torch.full((2,), 0.6)
    cache = BlockKVCache.empty(len(model.blocks))
    start = p + block
    stop = x.shape[1] if mode == "prefix" else start + block
    with torch.inference_mode():
        cached_log_probs(model, x, t, cache, None)
        x[:, start : start + 2] = prompt_for(model, 2, 2, seed=9)  # two commits in the block
        part, _ = cached_log_probs(model, x, t, cache, slice(start, stop))
        full = model.log_probs(x, t)[:, start:stop]
    return part, full


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_step_is_exact_on_a_one_layer_model(family, mode):
    part, full = cached_step_vs_uncached(build(family, 1), mode)
    finite = torch.isfinite(full)
    assert torch.equal(finite, torch.isfinite(part))
    assert torch.allclose(part[finite], full[finite], rtol=0, atol=tol(full))


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_step_is_an_approximation_on_two_layers(family, mode):
    part, full = cached_step_vs_uncached(build(family, 2), mode)
    finite = torch.isfinite(full)
    diff = (part[finite] - full[finite]).abs().max().item()
    assert 1e-4 < diff < 5.0  # really cached (not recomputed), and not garbage


@pytest.mark.parametrize("family", FAMILIES)
def test_layer0_kv_of_unchanged_rows_equal_recomputed(family):
    model = build(family, 2)
    prompt = prompt_for(model)
    x = canvas(model, prompt, 8)
    first, second = BlockKVCache.empty(2), BlockKVCache.empty(2)
    with torch.inference_mode():
        cached_log_probs(model, x, None, first, None)
        x[:, 6:8] = 3  # commit two tokens
        cached_log_probs(model, x, None, second, None)
    same = [i for i in range(x.shape[1]) if i not in (6, 7)]
    for name in ("keys", "values"):
        a, b = getattr(first.layers[0], name), getattr(second.layers[0], name)
        assert torch.allclose(a[:, :, same], b[:, :, same], rtol=0, atol=tol(a) / 100)
        assert not torch.allclose(a[:, :, 6:8], b[:, :, 6:8])
    # above layer 0 the committed tokens reach every row: why the cache is approximate
    assert not torch.allclose(first.layers[1].keys[:, :, :5], second.layers[1].keys[:, :, :5])


SAMPLER_CASES = [
    ("low_confidence", 4),
    ("random", 4),
    ("ancestral", None),
    ("maskgit_plus", None),
]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_layer_cached_generation_equals_uncached(family, mode):
    model = build(family, 1)
    prompt = prompt_for(model)
    for sampler, block in SAMPLER_CASES:
        if (sampler == "ancestral") != (family == "mdlm") and sampler != "low_confidence":
            continue  # ancestral is MDLM's; the other orders run on the LLaMA families
        cfg = SamplerConfig(sampler=sampler, steps=12, gen_length=12, block_length=block)
        if sampler == "low_confidence":
            cfg = replace(cfg, steps=12, temperature=0.7, cfg_scale=0.5)  # noise + guidance
        plain = generate(model, prompt, cfg, seed=3)
        cached = generate(model, prompt, replace(cfg, cache=mode), seed=3)
        assert torch.equal(plain.tokens, cached.tokens), (sampler, mode)
        assert [s.positions for s in plain.trace.steps] == [s.positions for s in cached.trace.steps]
        assert cached.stats.rows < plain.stats.rows


@pytest.mark.parametrize("family", FAMILIES)
def test_block_length_equal_gen_length_caches_only_the_prompt(family):
    """One block: the prefix cache holds only the prompt, refreshed once. The first step is
    the uncached step exactly; later steps are approximate on a deep model (the prompt's
    upper-layer K/V depend on the masks), exact on a one-layer model."""
    cfg = SamplerConfig(steps=6, gen_length=6, cache="prefix")
    for layers in (1, 2):
        model = build(family, layers)
        prompt = prompt_for(model)
        plain = generate(model, prompt, replace(cfg, cache="none"), seed=0, record_states=True)
        cached = generate(model, prompt, cfg, seed=0, record_states=True)
        assert cached.trace.steps[0] == plain.trace.steps[0]  # the refresh step
        assert cached.stats.full_calls == 1 and cached.stats.model_calls == 6
        if layers == 1:
            assert torch.equal(plain.tokens, cached.tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_per_block_is_exact_at_any_depth(family):
    model = build(family, 3)
    prompt = prompt_for(model)
    cfg = SamplerConfig(steps=3, gen_length=12, block_length=4)
    plain = generate(model, prompt, cfg, seed=0)
    for mode in ("prefix", "dual"):
        cached = generate(model, prompt, replace(cfg, cache=mode), seed=0)
        assert torch.equal(plain.tokens, cached.tokens)
        assert cached.trace.to_dict() == plain.trace.to_dict()
        assert cached.stats.rows == plain.stats.rows


@pytest.mark.parametrize(
    "family,mode,rows",
    [
        # B=2, P=5, L=13, blocks of 4, 4 steps a block: per block 1 refresh (13 rows) and
        # 3 cached steps of the block (dual: 4 rows) or of block + suffix (prefix: 8, then 4);
        # Dream runs one row more per cached step (the row before the window)
        ("llada", "dual", 2 * (2 * 13 + 6 * 4)),
        ("llada", "prefix", 2 * (2 * 13 + 3 * 8 + 3 * 4)),
        ("dream", "dual", 2 * (2 * 13 + 6 * 5)),
        ("mdlm", "none", 2 * 8 * 13),
    ],
)
def test_rows_and_tokens_per_second_bookkeeping(family, mode, rows):
    model = build(family, 2, dtype=torch.float32)
    cfg = SamplerConfig(steps=8, gen_length=8, block_length=4, cache=mode)
    res = generate(model, prompt_for(model), cfg, seed=0)
    stats = res.stats
    assert stats.cache == mode and stats.model_calls == 8
    assert stats.full_calls == (8 if mode == "none" else 2)
    assert stats.rows == rows and stats.canvas_rows == 2 * 8 * 13
    assert stats.row_fraction == pytest.approx(rows / (2 * 8 * 13))
    assert stats.generated_tokens == 16 and stats.seconds > 0
    assert stats.tokens_per_s == pytest.approx(16 / stats.seconds)
    assert set(stats.to_dict()) >= {"tokens_per_s", "row_fraction", "rows", "seconds"}
    guided = generate(model, prompt_for(model), replace(cfg, cfg_scale=1.0), seed=0)
    assert guided.stats.rows == 2 * rows  # the unconditional copy runs the same rows


def test_default_generation_runs_the_whole_canvas_every_step():
    model = build("llada", 2, dtype=torch.float32)
    calls: list[tuple[int, ...]] = []
    original = model.log_probs

    def spy(x, t=None):
        calls.append(tuple(x.shape))
        return original(x, t)

    model.log_probs = spy
    cfg = SamplerConfig(steps=8, gen_length=8, block_length=4)
    assert cfg.cache == "none"
    res = generate(model, prompt_for(model), cfg, seed=0)
    assert calls == [(2, 13)] * 8 and res.stats.full_calls == 8
    del model.log_probs
    again = generate(model, prompt_for(model), cfg, seed=0)
    assert torch.equal(again.tokens, res.tokens)


def quantize_linears(model) -> None:
    """Swap every block linear for a packed W4 QuantLinear (CPU dequant backend)."""
    from faircalib.quant.primitives import compute_qparams, quantize

    for block in model.blocks:
        for path, linear in model.quantizable_linears(block):
            qp = compute_qparams(linear.weight.data, QuantConfig(bits=4, group_size=32))
            layer = QuantLinear.from_codes(
                quantize(linear.weight.data, qp), qp, bias=linear.bias, backend="dequant"
            )
            parent, _, leaf = path.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, layer)


@pytest.mark.parametrize("family", ["llada", "mdlm"])
def test_packed_quantlinear_models_use_the_cache(family):
    model = build(family, 1, dtype=torch.float32)
    quantize_linears(model)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    prompt = prompt_for(model)
    cfg = SamplerConfig(steps=8, gen_length=8, block_length=4)
    plain = generate(model, prompt, cfg, seed=0)
    cached = generate(model, prompt, replace(cfg, cache="dual"), seed=0)
    assert torch.equal(plain.tokens, cached.tokens)  # one layer: exact
    assert cached.stats.rows < plain.stats.rows


def test_cache_flip_metrics_against_the_uncached_run():
    model = build("llada", 3, dtype=torch.float32)
    cfg = SamplerConfig(steps=12, gen_length=12, block_length=4)
    out = cache_flip_metrics(model, prompt_for(model, batch=3), cfg, seed=0)
    assert out["steps"] == 12 and out["samples"] == 3
    assert out["reference"]["cache"] == "none" and out["reference"]["row_fraction"] == 1.0
    for mode in ("prefix", "dual"):
        m = out[mode]
        assert 0.0 <= m["flip_rate"] <= 1.0
        assert m["token_agreement"] == pytest.approx(1 - m["flip_rate"])
        assert len(m["flip_rate_by_step"]) == 12 and len(m["first_divergence_step"]) == 3
        assert m["row_fraction"] < 1.0 and m["tokens_per_s"] > 0 and m["speedup"] > 0
    assert out["dual"]["row_fraction"] < out["prefix"]["row_fraction"]
    exact = cache_flip_metrics(build("llada", 1), prompt_for(model), cfg, seed=0)
    assert exact["dual"]["flip_rate"] == 0.0 and exact["prefix"]["exact_match_rate"] == 1.0


def test_refusals():
    with pytest.raises(ConfigError, match="unknown cache"):
        SamplerConfig(cache="suffix").validate()

    class NoCache(torch.nn.Module):
        family = "stub"

    with pytest.raises(ConfigError, match="has no block cache"):
        generate(NoCache(), torch.zeros(1, 2, dtype=torch.long), SamplerConfig(cache="dual"), 0)


def test_cli_flag():
    from faircalib.cli import build_parser
    from faircalib.commands.generate import generate_texts

    args = build_parser().parse_args(["generate", "mdlm-tiny", "--cache", "dual"])
    assert args.cache == "dual"
    assert build_parser().parse_args(["generate", "mdlm-tiny"]).cache == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "mdlm-tiny", "--cache", "full"])
    # graphs and the cache go together now; on a CPU the graphs themselves are refused
    with pytest.raises(ConfigError, match="CUDA device"):
        generate_texts("mdlm-tiny", "", SamplerConfig(cache="prefix"), cuda_graph=True)


# --- cached steps replayed from graphs (models.cuda_graph), with a CPU stand-in for capture ---
class ReplayByRerun:
    """A CUDA graph's contract on the CPU: the output tensors are created once at capture and
    every replay recomputes fn from the captured (static) inputs into those same tensors."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        new = self.fn()
        for old_t, new_t in zip(self.out, new if isinstance(new, tuple) else (new,), strict=True):
            if isinstance(old_t, torch.Tensor):
                old_t.copy_(new_t)


def capture_by_rerun(fn, device, pool):
    graph = ReplayByRerun(fn)
    out = fn()
    graph.out = out if isinstance(out, tuple) else (out,)
    return graph, out


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_replayed_cached_generation_equals_eager_cached(family, mode):
    from faircalib.models.cuda_graph import CUDAGraphDenoiser

    model = build(family, 2, dtype=torch.float32)
    prompt = prompt_for(model)
    cfg = SamplerConfig(steps=12, gen_length=12, block_length=4, cache=mode)
    eager = generate(model, prompt, cfg, seed=3)
    wrapped = CUDAGraphDenoiser(model, capture_fn=capture_by_rerun)
    graphed = generate(wrapped, prompt, cfg, seed=3)
    assert torch.equal(eager.tokens, graphed.tokens)
    assert graphed.stats.rows == eager.stats.rows  # the same windows ran
    # one refresh graph for the canvas, one per block window; a second run captures nothing
    assert wrapped.graphs == 1 + 3
    again = generate(wrapped, prompt, cfg, seed=3)
    assert torch.equal(again.tokens, eager.tokens) and wrapped.graphs == 4
    wrapped.clear()
    assert wrapped.graphs == 0
    assert torch.equal(generate(wrapped, prompt, cfg, seed=3).tokens, eager.tokens)


def test_graph_replayed_refresh_keeps_the_kv_storage():
    """A captured refresh writes into the K/V tensors the step graphs captured: the storage of
    the wrapper's cache must not move from one block's refresh to the next."""
    from faircalib.models.cuda_graph import CUDAGraphDenoiser

    model = build("llada", 2, dtype=torch.float32)
    wrapped = CUDAGraphDenoiser(model, capture_fn=capture_by_rerun)
    x = canvas(model, prompt_for(model), 8)
    with torch.inference_mode():
        first = BlockKVCache.empty(2)
        out, _ = cached_log_probs(wrapped, x, None, first, None)
        ptrs = [kv.keys.data_ptr() for kv in first.layers]
        x2 = canvas(model, prompt_for(model), 8, filled=4)
        second = BlockKVCache.empty(2)
        out2, _ = cached_log_probs(wrapped, x2, None, second, None)
        assert [kv.keys.data_ptr() for kv in second.layers] == ptrs
        # and the replayed refresh is the uncached forward of the new canvas
        assert torch.equal(out2, model.log_probs(x2, None))
        with pytest.raises(RuntimeError, match="refresh"):
            cached_log_probs(wrapped, x[:1], None, BlockKVCache.empty(2), slice(5, 9))


def test_generate_cli_reports_what_the_cache_saved(capsys):
    # --json carries the sampler's cost bookkeeping: the prefix cache runs fewer token rows
    # than an uncached run of the same length (which runs the whole canvas every step)
    import json

    from faircalib.cli import main

    argv = ["generate", "mdlm-tiny", "--prompt", "The river", "--gen-length", "16"]
    argv += ["--steps", "8", "--block-length", "8", "--json"]
    fractions = {}
    for cache in ("none", "prefix"):
        assert main([*argv, "--cache", cache]) == 0
        stats = json.loads(capsys.readouterr().out)["stats"]
        assert stats["cache"] == cache and stats["generated_tokens"] == 16
        assert stats["model_calls"] >= 8 and stats["rows"] > 0
        fractions[cache] = stats["row_fraction"]
    assert fractions["none"] == 1.0 and fractions["prefix"] < 1.0
    assert main([*argv[:-1], "--cache", "prefix"]) == 0
    assert "of the uncached token rows (cache: prefix)" in capsys.readouterr().out
