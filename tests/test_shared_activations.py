"""Layers of a block that read the same input quantize it once (kernels.shared_activations)."""

import pytest
import torch
from torch import nn

from faircalib import hub
from faircalib.calib.activations import ActCalibConfig, quantize_activations
from faircalib.calib.fakequant_io import packed_act_config, save_quantized
from faircalib.config import CalibConfig
from faircalib.formats.packed import load_packed_model
from faircalib.frontier.samplers import SamplerConfig, generate
from faircalib.kernels import backends
from faircalib.kernels.shared_activations import _SCOPE, _Scope, quantize_once, share_activations
from llama_like_ckpt import write_family


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x * 2


class Reads(nn.Module):
    """A block whose three 'projections' quantize one input, then a fourth its own."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail
        self.quantize = Counter()

    def forward(self, h):
        q = [quantize_once("k", h.reshape(-1, h.shape[-1]), self.quantize) for _ in range(3)]
        if self.fail:
            raise RuntimeError("a forward that raises")
        other = quantize_once("k", h + 1, self.quantize)
        return q[0] + q[1] + q[2] + other.reshape(q[0].shape)


def test_a_scope_shares_the_same_rows_and_nothing_else():
    h = torch.randn(2, 3, 8)
    plain = Reads()
    plain(h)
    assert plain.quantize.calls == 4  # not hooked: every call quantizes
    block = Reads()
    assert share_activations([block]) == 1 and share_activations([block]) == 0  # hooked once
    y = block(h)
    assert block.quantize.calls == 2  # the shared input once (three views of it), h + 1 once
    assert torch.equal(y, plain(h))
    assert _SCOPE.get() is None  # closed after the forward
    # another kind of quantization, an in-place write, another tensor with equal values, and a
    # tensor that needs a gradient all miss
    counter = Counter()
    token = _SCOPE.set(_Scope(block, None))
    try:
        x = torch.randn(4, 8)
        quantize_once("a", x, counter)
        quantize_once("a", x, counter)
        quantize_once("b", x, counter)
        x.add_(1)
        quantize_once("a", x, counter)
        quantize_once("a", x.clone(), counter)
        w = torch.randn(4, 8, requires_grad=True)
        quantize_once("a", w, counter)
        quantize_once("a", w, counter)
        assert counter.calls == 6
        # an input freed in the scope takes its entry (and result) with it
        scope = _SCOPE.get()
        quantize_once("a", torch.randn(3, 8), counter)  # a temporary, freed after the call
        quantize_once("b", torch.ones(2, 2), counter)  # the next miss purges dead entries
        dead = [key for key, (held, _) in scope.memo.items() if held() is None]
        assert [key[4] for key in dead] == [(2, 2)]  # only the last temporary's is left
        assert any(key[4] == (4, 8) for key in scope.memo)  # x, alive, keeps its entries
        # inference tensors have no version counter; their rows are still shared
        with torch.inference_mode():
            z = torch.randn(4, 8)
            before = counter.calls
            quantize_once("a", z, counter)
            quantize_once("a", z.reshape(2, 16).reshape(4, 8), counter)
            assert counter.calls == before + 1
    finally:
        _SCOPE.reset(token)


def test_a_forward_that_raises_closes_its_scope():
    block = Reads(fail=True)
    share_activations([block])
    with pytest.raises(RuntimeError, match="raises"):
        block(torch.randn(2, 8))
    assert _SCOPE.get() is None
    counter = Counter()
    x = torch.randn(2, 8)
    quantize_once("k", x, counter)
    quantize_once("k", x, counter)
    assert counter.calls == 2  # outside any scope: nothing remembered


def llada_w8a8(tmp_path):
    model = hub.load(write_family(tmp_path / "src", "llada"))
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (4, 32), generator=gen)
    calib = CalibConfig(n_samples=4, seq_len=32, seed=0)
    config = packed_act_config(ActCalibConfig("w8a8", "rtn"))
    report = quantize_activations(model, tokens, config, calib)
    save_quantized(model, report, tmp_path / "p", None, fmt="packed")
    x_t = torch.randint(0, 256, (2, 24), generator=gen)
    x_t[torch.rand(x_t.shape, generator=gen) < 0.5] = model.mask_id
    return tmp_path / "p", x_t, torch.full((2,), 0.5)


def test_a_loaded_llada_block_quantizes_q_k_v_and_gate_up_inputs_once(tmp_path, monkeypatch):
    """LLaDA's block has 7 linears reading 4 distinct inputs: the INT8 W8A8 kernels (on the
    CPU: torch._int_mm) quantize 4 times a block, not 7, and give the same bits as a copy whose
    layers each quantize their own input."""
    directory, x_t, t = llada_w8a8(tmp_path)
    shared = load_packed_model(directory, backend="int8")
    unshared = load_packed_model(directory, backend="int8")
    for block in unshared.blocks:  # as loaded before the sharing existed
        block._forward_pre_hooks.clear()
        block._forward_hooks.clear()
    calls = []
    original = backends.quantize_rows_int8

    def counted(x):
        calls.append(x.shape)
        return original(x)

    monkeypatch.setattr(backends, "quantize_rows_int8", counted)
    with torch.no_grad():
        want = unshared.log_probs(x_t, t)
        per_forward_unshared = len(calls)
        calls.clear()
        got = shared.log_probs(x_t, t)
    n_blocks = len(shared.blocks)
    assert per_forward_unshared == 7 * n_blocks
    assert len(calls) == 4 * n_blocks
    assert torch.equal(got, want)
    # generation runs under inference_mode (tensors without a version counter)
    calls.clear()
    with torch.inference_mode():
        assert torch.equal(shared.log_probs(x_t, t), want)
    assert len(calls) == 4 * n_blocks
    prompts = x_t[:, :8].clamp(max=200)
    sampler = SamplerConfig(sampler="low_confidence", steps=8, gen_length=8)
    tokens = [generate(m, prompts, sampler, seed=1, trace=False).tokens for m in (shared, unshared)]
    assert torch.equal(tokens[0], tokens[1])
