"""Layers that read one input run as one stacked layer (kernels.stacked_linears)."""

import shutil

import pytest
import torch
from torch import nn

from faircalib import api, hub
from faircalib.calib.activations import ActCalibConfig, quantize_activations
from faircalib.calib.fakequant_io import packed_act_config, save_quantized
from faircalib.config import CalibConfig, QuantConfig
from faircalib.errors import ConfigError
from faircalib.formats.packed import FP8ActLinear, load_packed_model
from faircalib.frontier.samplers import SamplerConfig, generate
from faircalib.kernels import QuantLinear
from faircalib.kernels.stacked_linears import StackedMember, stack_layers, stack_linears
from faircalib.quant.primitives import compute_qparams, quantize
from llama_like_ckpt import write_family


def quant_linear(out, inp, gen, *, bits=4, group=32, act_bits=None, bias=True, input_scale=None):
    w = torch.randn(out, inp, generator=gen)
    qp = compute_qparams(w, QuantConfig(bits=bits, group_size=group, symmetric=bits == 8))
    return QuantLinear.from_codes(
        quantize(w, qp),
        qp,
        bias=torch.randn(out, generator=gen) if bias else None,
        input_scale=input_scale,
        act_bits=act_bits,
        backend="dequant" if act_bits is None else "int8",
    )


def members_reference(layers, x):
    """float64 of what the members compute: per-token INT8 x (if they quantize it) times
    each member's decoded weight, plus bias, concatenated."""
    outs = []
    for layer in layers:
        xs = x.double() if layer.input_scale is None else x.double() / layer.input_scale.double()
        if layer.act_bits == 8:
            scale = xs.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
            xs = (xs / scale).round().clamp(-127, 127) * scale
        y = xs @ layer.dequantized_weight(torch.float64).T
        outs.append(y if layer.bias is None else y + layer.bias.double())
    return torch.cat(outs, dim=-1)


def test_a_stacked_layer_computes_each_members_rows():
    """W4 g32 layers with their own biases and one shared input scale, INT8 W8A8 layers and
    float layers: the stacked layer's output is the members' outputs side by side (within float32
    rounding of the float64 math; INT8's exact integer GEMM gives the unstacked bits)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen) * torch.logspace(-1, 1, 64)
    smooth = torch.rand(64, generator=gen) + 0.5
    w4 = [quant_linear(n, 64, gen, input_scale=smooth) for n in (32, 16, 16)]
    int8 = [quant_linear(n, 64, gen, bits=8, group=None, act_bits=8) for n in (48, 16)]
    for layers in (w4, int8):
        stacked = stack_layers(layers)
        assert isinstance(stacked, QuantLinear) and stacked.out_features == 64
        ref = members_reference(layers, x)
        y = stacked(x)
        assert ((y.double() - ref).norm() / ref.norm()) < 1e-6
        if layers is int8:
            assert torch.equal(y, torch.cat([layer(x) for layer in layers], dim=-1))
    floats = [nn.Linear(64, n) for n in (8, 24)]
    stacked = stack_layers(floats)
    want = torch.cat([layer(x) for layer in floats], dim=-1)
    assert torch.allclose(stacked(x), want, rtol=1e-5, atol=1e-6)
    values = torch.randn(40, 64, generator=gen).to(torch.float8_e4m3fn)
    fp8 = [
        FP8ActLinear(values[:24], torch.rand(24, 1) + 0.1, None),
        FP8ActLinear(values[24:], torch.rand(16, 1) + 0.1, None),
    ]
    want = torch.cat([layer(x) for layer in fp8], dim=-1)  # the reference path on the CPU
    assert torch.allclose(stack_layers(fp8)(x), want, rtol=1e-5, atol=1e-6)


def test_layers_that_differ_stay_apart_and_say_why():
    gen = torch.Generator().manual_seed(1)
    root = nn.Module()
    root.a, root.b = quant_linear(16, 64, gen), quant_linear(16, 64, gen, bits=3)
    root.c, root.d = quant_linear(16, 64, gen), nn.Linear(64, 16)
    root.e = quant_linear(16, 64, gen, input_scale=torch.rand(64, generator=gen) + 0.5)
    root.f = quant_linear(16, 64, gen, input_scale=torch.rand(64, generator=gen) + 0.5)
    before = dict(root.named_children())
    report = stack_linears(root, [("a", "b"), ("c", "d"), ("e", "f"), ("a",)])
    assert report.stacked == []
    reasons = dict(report.left)
    assert "bits" in reasons[("a", "b")]
    assert "different layers" in reasons[("c", "d")]
    assert "input scales" in reasons[("e", "f")]
    assert dict(root.named_children()) == before  # nothing replaced


def test_members_share_one_call_and_recompute_for_other_rows():
    """The first member called runs the stacked layer; the others take their slices of it. A
    member called again, or with other rows, or after an in-place write, runs it again."""
    gen = torch.Generator().manual_seed(2)
    root = nn.Module()
    root.q, root.k, root.v = (quant_linear(n, 64, gen) for n in (32, 16, 16))
    want = {name: getattr(root, name) for name in "qkv"}
    stack_linears(root, [("q", "k", "v")])
    stacked = root.q.stacked
    calls = []
    stacked.register_forward_hook(lambda *_: calls.append(1))
    x, other = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen)
    for name in "qkv":
        assert torch.equal(getattr(root, name)(x), want[name](x))
    assert len(calls) == 1 and root.q._group.waiting == set()  # done: the result is dropped
    assert torch.equal(root.k(other), want["k"](other))  # other rows: a new call
    assert torch.equal(root.k(x), want["k"](x))  # k again: a new call
    x.mul_(2)  # an in-place write between two readers: the version counter tells
    assert torch.equal(root.v(x), want["v"](x))
    assert len(calls) == 4
    with torch.inference_mode():
        z = torch.randn(3, 64)
        assert torch.equal(root.v(z), want["v"](z)) and torch.equal(root.q(z), want["q"](z))
    assert len(calls) == 5


def quantized_dream(tmp_path, scheme: str):
    """A tiny Dream (GQA: k and v narrower than q; q, k, v with biases) quantized by RTN and
    saved packed: INT8 W8A8 (activation path) or W4 g32 (weights only)."""
    source = write_family(tmp_path / "src", "dream")
    if scheme == "w8a8":
        model = hub.load(source)
        tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
        calib = CalibConfig(n_samples=4, seq_len=32, seed=0)
        report = quantize_activations(
            model, tokens, packed_act_config(ActCalibConfig("w8a8", "rtn")), calib
        )
        save_quantized(model, report, tmp_path / "p", None, fmt="packed")
        return tmp_path / "p"
    q = api.quantize(source, "rtn", bits=4, group_size=32, calib="c4", nsamples=2, seq_len=32)
    api.save(q, tmp_path / "p")
    return tmp_path / "p"


@pytest.mark.parametrize(("scheme", "backend"), [("w8a8", "int8"), ("w4", "dequant")])
def test_a_stacked_dream_matches_the_unstacked_one(tmp_path, scheme, backend):
    """A packed Dream loaded with stack=True runs q, k, v as one layer and gate, up as one:
    2 GEMMs where 5 ran, the same log-probs (INT8: the same bits), the same tokens with the
    dual K/V cache (whose steps call forward_cached outside the block hooks), and the state
    dict of the unstacked model."""
    directory = quantized_dream(tmp_path, scheme)
    plain = load_packed_model(directory, backend=backend)
    stacked = load_packed_model(directory, backend=backend, stack=True)
    members = [m for m in stacked.modules() if isinstance(m, StackedMember)]
    assert len(members) == 5 * len(stacked.blocks)
    calls = []
    for member in members:
        if member.index == 0:
            member.stacked.register_forward_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(4)
    x_t = torch.randint(0, 256, (2, 24), generator=gen)
    x_t[torch.rand(x_t.shape, generator=gen) < 0.5] = plain.mask_id
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        want, got = plain.log_probs(x_t, t), stacked.log_probs(x_t, t)
    assert len(calls) == 2 * len(stacked.blocks)
    if backend == "int8":
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, rtol=0, atol=1e-5)
    prompts = x_t[:, :8].clamp(max=200)
    sampler = SamplerConfig(
        sampler="low_confidence", steps=8, gen_length=16, block_length=8, cache="dual"
    )
    tokens = [generate(m, prompts, sampler, seed=1, trace=False).tokens for m in (plain, stacked)]
    assert torch.equal(tokens[0], tokens[1])
    want_state, got_state = plain.state_dict(), stacked.state_dict()
    assert list(got_state) == list(want_state)
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)


def test_a_float_model_stacks_its_linears(tmp_path):
    """stack=True on a float checkpoint stacks nn.Linear readers: the same log-probs within
    float32 rounding. Such a model is for inference: quantize refuses it in one line."""
    directory = write_family(tmp_path / "src", "llada")
    plain, stacked = hub.load(directory), hub.load(directory, stack=True)
    with pytest.raises(ConfigError, match="stack=True"):
        api.quantize(api.load(directory, stack=True), "rtn", calib="c4", nsamples=2, seq_len=16)
    assert sum(isinstance(m, StackedMember) for m in stacked.modules()) == 5 * len(stacked.blocks)
    x_t = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    x_t[:, ::2] = plain.mask_id
    with torch.no_grad():
        assert torch.allclose(stacked.log_probs(x_t), plain.log_probs(x_t), rtol=0, atol=1e-5)


def test_generate_stack_linears_gives_the_unstacked_tokens(tmp_path, capsys, monkeypatch):
    """`faircalib generate --stack-linears` on a packed INT8 W8A8 Dream stacks its readers and
    writes the tokens the unstacked model writes (the same integer GEMMs on the CPU)."""
    import json

    from faircalib.cli import main
    from faircalib.formats import packed

    reports = []
    original = packed.stack_readers
    monkeypatch.setattr(packed, "stack_readers", lambda m: reports.append(original(m)))

    directory = quantized_dream(tmp_path, "w8a8")
    shutil.copy(tmp_path / "src" / "tokenizer.json", directory / "tokenizer.json")
    args = ["generate", str(directory), "--prompt", "ab", "--gen-length", "8", "--steps", "8"]
    outs = []
    for extra in ([], ["--stack-linears"]):
        assert main([*args, *extra, "--json"]) in (0, None)
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert len(reports) == 1 and len(reports[0].stacked) == 2 * 2 and not reports[0].left


def test_a_shared_result_never_crosses_grad_autocast_or_inference_modes():
    """A stacked result computed under no_grad, autocast or inference mode is not handed to a
    member called under another mode (its grad, dtype or tensor kind would be wrong); rows that
    need a gradient are never shared and keep their graph."""
    root = nn.Module()
    root.q, root.k = nn.Linear(16, 8), nn.Linear(16, 4)
    want = {"q": root.q, "k": root.k}
    stack_linears(root, [("q", "k")])
    x = torch.randn(3, 16, requires_grad=True)
    with torch.no_grad():
        root.q(x)
    k = root.k(x)
    assert k.requires_grad and torch.allclose(k, want["k"](x))
    k.sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, want["k"].weight.sum(0).expand(3, 16))
    y = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert root.q(y).dtype == torch.bfloat16
    assert root.k(y).dtype == torch.float32
    with torch.inference_mode():
        root.q(y)
    assert not root.k(y).is_inference()


def test_state_dicts_views_loads_and_pending_results(tmp_path):
    """keep_vars gives views of the stacked tensors (the default gives copies, which
    safetensors can save); loading a state dict into a stacked model is refused in words; a
    layer named twice is not stacked; a block that raises between two members leaves no
    stacked result behind (`stack_readers`' hook)."""
    from safetensors.torch import save_file

    from faircalib.formats.packed import stack_readers

    model = hub.load(write_family(tmp_path / "src", "llada"))
    report = stack_readers(model)
    assert len(report.stacked) == 2 * len(model.blocks) and model.stack_report is report
    block = model.blocks[0]
    q = block.get_submodule(model.NAMES.block.q)
    views = model.state_dict(keep_vars=True)
    copies = model.state_dict()
    name = f"{model.NAMES.blocks}.0.{model.NAMES.block.k}.weight"
    stacked_weight = q.stacked.weight
    start = stacked_weight.data_ptr()
    end = start + stacked_weight.numel() * stacked_weight.element_size()
    assert start <= views[name].data_ptr() < end
    assert not start <= copies[name].data_ptr() < end
    save_file(copies, str(tmp_path / "w.safetensors"))
    with pytest.raises(RuntimeError, match="takes no state dict; load the checkpoint, then stack"):
        model.load_state_dict(copies)
    root = nn.Module()
    root.a = nn.Linear(4, 4)
    assert stack_linears(root, [("a", "a")]).left == [(("a", "a"), "a layer is named twice")]

    k = block.get_submodule(model.NAMES.block.k)
    k.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    x_t = torch.randint(0, 256, (1, 8))
    with pytest.raises(RuntimeError, match="boom"):
        model.log_probs(x_t)
    assert q._group.parts == () and q._group.waiting == set()
