"""Issue 13 item 4, `--quantize-head`: the vocabulary layers each family declares, quantized
weight-only (INT8 per token row, INT4 g128 along the hidden dim), evaluated fake-quant, packed
and loaded back exactly, and counted byte for byte."""

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from faircalib import hub
from faircalib.calib import masked_inputs, quantize
from faircalib.calib.engine import FakeQuantLinear, head_config, quant_results, quantize_head
from faircalib.cli import main
from faircalib.config import AWQConfig, CalibConfig, GPTQConfig, QuantConfig, RTNConfig
from faircalib.errors import ConfigError
from faircalib.formats.packed import (
    checkpoint_tensor_bytes,
    load_packed_model,
    packed_checkpoint_bytes,
    save_packed_model,
)
from faircalib.models import MDLM, LLaDA, MDLMConfig
from faircalib.quant import LayerInputs, quantize_gptq
from llama_like_ckpt import llada_config, write_family


def tiny_mdlm(seed: int = 0) -> MDLM:
    torch.manual_seed(seed)
    cfg = MDLMConfig(vocab_size=96, mask_id=95, seq_len=16, hidden_dim=128, n_blocks=2, n_heads=4)
    model = MDLM(cfg).eval()
    with torch.no_grad():  # the output layer starts at zero: give it values; bf16-exact floats
        model.output_layer.linear.weight.normal_(0, 0.05)
        for p in model.parameters():
            p.copy_(p.bfloat16())
    return model


def tied_llada(seed: int = 0) -> LLaDA:
    torch.manual_seed(seed)
    model = LLaDA.from_config(llada_config(weight_tying=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())
    return model


def inputs(model, n: int = 2, seq: int = 16) -> torch.Tensor:
    x = torch.randint(0, model.mask_id, (n, seq), generator=torch.Generator().manual_seed(3))
    x[:, ::3] = model.mask_id
    return x


def reference_rtn(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Independent symmetric RTN of a [rows, D] matrix, groups along D within each row."""
    rows, d = w.shape
    g = w.float().reshape(rows, -1, d if group is None else group)
    half = g.abs().amax(dim=-1, keepdim=True)
    half = torch.where(half > 0, half, torch.ones_like(half))
    levels = 2**bits - 1
    scale = half / (levels / 2)
    mid = 2 ** (bits - 1)
    q = torch.clamp(torch.round(g / scale) + mid, 0, levels)
    return (scale * (q - mid)).reshape(rows, d)


def body_schemes(model, cfg) -> dict:
    prefix = next(n for n, m in model.named_modules() if m is model.blocks)
    return {
        f"{prefix}.{i}.{name}": cfg
        for i, block in enumerate(model.blocks)
        for name, _ in model.quantizable_linears(block)
    }


@pytest.mark.parametrize("mode,bits,group", [("int8", 8, None), ("int4", 4, 128)])
def test_quantized_embedding_and_head_equal_an_independent_rtn(mode, bits, group):
    model = tiny_mdlm()
    emb = model.vocab_embed.embedding.detach().clone()
    out = model.output_layer.linear.weight.detach().clone()
    rows = quantize_head(model, mode)
    assert [r["layer"] for r in rows] == ["vocab_embed.embedding", "output_layer.linear.weight"]
    assert torch.equal(model.vocab_embed.embedding, reference_rtn(emb, bits, group))
    head = model.output_layer.linear
    assert isinstance(head, FakeQuantLinear)
    assert torch.equal(head.weight, reference_rtn(out, bits, group))
    assert set(quant_results(model)) == {"vocab_embed", "output_layer.linear"}


def test_tied_llada_quantizes_its_one_matrix():
    model = tied_llada()
    w = model.model.transformer.wte.weight.detach().clone()
    rows = quantize_head(model, "int8")
    assert [(r["layer"], r["role"]) for r in rows] == [("model.transformer.wte.weight", "tied")]
    assert torch.equal(model.model.transformer.wte.weight, reference_rtn(w, 8, None))


@pytest.mark.parametrize("build,mode", [(tiny_mdlm, "int4"), (tied_llada, "int8")])
def test_packed_round_trip_is_exact(tmp_path: Path, build, mode):
    """Blocks RTN W4 g32 and the head at `mode`, scales in bf16 (as the packed CLI run
    sets): our loader's log-probs equal the fake-quant model's bit for bit, and the byte
    formula equals the written checkpoint's tensor bytes."""
    model = build()
    body = RTNConfig(bits=4, group_size=32, scale_dtype="bfloat16")
    schemes = {
        **body_schemes(model, body),
        **{v.module: head_config(mode) for v in model.vocab_layers().layers},
    }
    predicted = packed_checkpoint_bytes(model, schemes)["total"]
    tokens = torch.randint(0, model.mask_id, (4, 16), generator=torch.Generator().manual_seed(1))
    report = quantize(
        model,
        body,
        tokens,
        CalibConfig(n_samples=4, seq_len=16, quantize_head=mode),
        progress=False,
    )
    assert report.to_dict()["head"] and report.to_dict()["calib"]["quantize_head"] == mode
    out = save_packed_model(model, quant_results(model), tmp_path / "packed")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert {v.module for v in model.vocab_layers().layers} <= set(targets)
    assert checkpoint_tensor_bytes(out) == predicted
    loaded = load_packed_model(out)
    x = inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x), model.log_probs(x))


def test_off_by_default_leaves_everything_as_before():
    """Not set: vocab layers untouched, no head rows, no new record field; and setting it
    changes nothing but the vocab layers."""
    tokens = torch.randint(0, 95, (4, 16), generator=torch.Generator().manual_seed(1))
    assert "quantize_head" not in CalibConfig().to_dict()
    plain, headed = tiny_mdlm(), tiny_mdlm()
    float_emb = plain.vocab_embed.embedding.detach().clone()
    cfg = RTNConfig(bits=4, group_size=32)
    report = quantize(plain, cfg, tokens, CalibConfig(n_samples=4, seq_len=16), progress=False)
    assert "head" not in report.to_dict() and "quantize_head" not in report.to_dict()["calib"]
    assert torch.equal(plain.vocab_embed.embedding, float_emb)
    assert isinstance(plain.output_layer.linear, nn.Linear)
    calib = CalibConfig(n_samples=4, seq_len=16, quantize_head="int8")
    quantize(headed, cfg, tokens, calib, progress=False)
    vocab = {"vocab_embed.embedding", "output_layer.linear.weight"}
    a, b = plain.state_dict(), headed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) != (key in vocab), key
    # the step `quantize` runs is `quantize_head` on the calibrated model
    again = copy.deepcopy(plain)
    quantize_head(again, "int8")
    for key, value in again.state_dict().items():
        assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("mode,bits,group", [("int4", 4, 128), ("int8", 8, None)])
def test_gptq_blocks_quantize_the_output_layer_with_gptq_on_its_real_inputs(mode, bits, group):
    """GPTQ blocks + --quantize-head: the output layer's codes are quantize_gptq's on a Hessian
    of the head inputs collected here with a hook (the final hidden states of the calibrated
    model on the calibration rows), its output error on those inputs is at most RTN's, and the
    embedding stays RTN. Blocks and embedding equal a run whose head is plain RTN (RTN blocks)."""
    tokens = torch.randint(0, 95, (6, 16), generator=torch.Generator().manual_seed(1))
    body = GPTQConfig(bits=4, group_size=32)
    plain, headed = tiny_mdlm(), tiny_mdlm()
    emb = plain.vocab_embed.embedding.detach().clone()
    calib = CalibConfig(n_samples=6, seq_len=16)
    quantize(plain, body, tokens, calib, progress=False)
    headed_calib = CalibConfig(n_samples=6, seq_len=16, quantize_head=mode)
    report = quantize(headed, body, tokens, headed_calib, progress=False).to_dict()
    assert [(r["layer"], r["method"]) for r in report["head"]] == [
        ("vocab_embed.embedding", "rtn"),
        ("output_layer.linear.weight", "gptq"),
    ]
    assert "head_inputs" not in report
    assert torch.equal(headed.vocab_embed.embedding, reference_rtn(emb, bits, group))
    a, b = plain.state_dict(), headed.state_dict()
    for key in a:  # the blocks are the same: the head step runs after them
        if not key.startswith(("vocab_embed", "output_layer.linear")):
            assert torch.equal(a[key], b[key]), key

    # the head's inputs, collected independently: the calibrated blocks' final hidden states
    x_t, t = masked_inputs(plain, tokens, calib)
    rows = []
    lin = plain.output_layer.linear
    handle = lin.register_forward_pre_hook(lambda _m, args: rows.append(args[0].detach()))
    with torch.no_grad():
        plain.log_probs(x_t, t)
    handle.remove()
    x = torch.cat(rows).reshape(-1, lin.in_features).float()
    hessian = ((x.T @ x).double() / len(x)).float()
    ones = torch.ones(len(x))
    stats = LayerInputs(hessian, x, ones, x.abs().amax(0), x.abs().mean(0), len(x))
    cfg = GPTQConfig(bits=bits, group_size=group, symmetric=True)  # the blocks' GPTQ knobs
    w = lin.weight.detach().float()
    expected = quantize_gptq(w, stats, cfg)
    got = headed.output_layer.linear.result
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(headed.output_layer.linear.weight, expected.weight)

    def out_err(wq):
        return float(((x @ (wq - w).T) ** 2).sum())

    assert out_err(got.weight) <= out_err(reference_rtn(w, bits, group))
    gptq_row = report["head"][1]
    assert gptq_row["rel_error"] <= gptq_row["rtn_rel_error"]


@pytest.mark.parametrize("body", [RTNConfig(bits=4, group_size=32), AWQConfig(4, 32)])
def test_rtn_and_awq_blocks_keep_an_rtn_head(body):
    tokens = torch.randint(0, 95, (4, 16), generator=torch.Generator().manual_seed(1))
    model = tiny_mdlm()
    out = model.output_layer.linear.weight.detach().clone()
    calib = CalibConfig(n_samples=4, seq_len=16, quantize_head="int4")
    report = quantize(model, body, tokens, calib, progress=False).to_dict()
    assert {r["method"] for r in report["head"]} == {"rtn"}
    assert torch.equal(model.output_layer.linear.weight, reference_rtn(out, 4, 128))


def test_validation_errors_are_one_line():
    with pytest.raises(ConfigError) as err:
        CalibConfig(quantize_head="int3")
    assert "\n" not in str(err.value) and "quantize_head" in str(err.value)
    with pytest.raises(ConfigError) as err:
        head_config("int2")
    assert "\n" not in str(err.value)
    model = LLaDA.from_config(llada_config())  # hidden dim 64: no 128-group
    tokens = torch.randint(0, 200, (2, 8))
    with pytest.raises(ConfigError) as err:  # refused before any calibration
        quantize(model, QuantConfig(4, 32), tokens, CalibConfig(quantize_head="int4"))
    msg = str(err.value)
    assert "\n" not in msg and "does not divide" in msg and "int8" in msg
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: write_family(root / f, f) for f in ("llada", "dream")}


@pytest.mark.parametrize(
    "name,mode,refusal",
    [
        ("mdlm-tiny", "int4", None),
        ("llada", "int8", None),
        ("llada", "int4", "does not divide"),
        ("dream", "int8", None),
        ("diffusionlm-tiny", "int8", "data space"),
        ("planner-tiny", "int8", "data space"),
    ],
)
def test_each_family_quantizes_its_head_or_refuses_in_one_line(family_dirs, name, mode, refusal):
    model = hub.load(family_dirs.get(name, name))
    declared = model.vocab_layers()
    assert declared.layers and all(
        model.get_submodule(v.module).get_parameter(v.param).shape[0] >= model.vocab_size
        for v in declared.layers
    )
    if refusal:
        with pytest.raises(ConfigError) as err:
            quantize_head(model, mode)
        assert refusal in str(err.value) and "\n" not in str(err.value)
        return
    x = inputs(model)
    with torch.no_grad():
        before = model.log_probs(x)
        rows = quantize_head(model, mode)
        after = model.log_probs(x)
    assert {r["role"] for r in rows} == {"embedding", "output"}
    finite = torch.isfinite(after)
    assert torch.equal(finite, torch.isfinite(before)) and not torch.equal(before, after)


def test_cli_records_the_flag_and_says_which_readers_take_it(tmp_path: Path):
    out = tmp_path / "q"
    stdout = io.StringIO()
    argv = ["quantize", "mdlm-tiny", "--method", "rtn", "--nsamples", "2", "--seq-len", "16"]
    argv += ["--quantize-head", "int4", "--include", "blocks.0.attn_out", "--out", str(out)]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    text = stdout.getvalue()
    assert "head: vocab_embed.embedding" in text and "transformers" in text and "vLLM" in text
    assert json.loads((out / "recipe.json").read_text())["args"]["quantize_head"] == "int4"
    record = json.loads((out / "quantization.json").read_text())
    assert record["calib"]["quantize_head"] == "int4" and len(record["head"]) == 2
    loaded = hub.load(out)
    assert not isinstance(loaded.output_layer.linear, nn.Linear)  # a packed QuantLinear
