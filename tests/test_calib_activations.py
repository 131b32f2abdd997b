"""The activation-quantization join on a real (tiny) MDLM, and the benchmark's smoke mode."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from benchmark_scripts import load_benchmark
from faircalib import hub
from faircalib.calib.activations import (
    ActCalibConfig,
    ActQuantLinear,
    a4_ablation,
    activation_outlier_stats,
    quantize_activations_model,
    rotate_model,
)
from faircalib.calib.inputs import masked_inputs
from faircalib.config import CalibConfig
from faircalib.data import calibration_batch
from faircalib.quant.activations import ActQuantConfig, quantize_int_per_token

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    model = hub.load("mdlm-tiny")
    tok = hub.load_tokenizer("mdlm-tiny")
    tokens = calibration_batch(tok, "c4", "train", 4, 32, seed=0)
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=4))
    return model, x_t, t


def _log_probs64(stem_model, model64, x_t, t):
    """log p of a float64 model through the declared stages, its stem run by the float32
    model (the stem's sinusoidal features are computed in float32)."""
    h, ctx = stem_model.stem(x_t, t)
    h, ctx = h.double(), type(ctx)({k: v.double() for k, v in ctx.tensors.items()})
    for block in model64.blocks:
        h = block(h, ctx)
    return model64.head(h, ctx, x_t)


def test_rotated_model_has_the_float_models_log_probs(tiny):
    model, x_t, t = tiny
    model64 = copy.deepcopy(model).double()
    rotated64 = rotate_model(copy.deepcopy(model64), seed=3)  # folded in float64
    n = sum(isinstance(m, ActQuantLinear) for m in rotated64.modules())
    assert n == 4 * len(model.blocks)
    ref, got = _log_probs64(model, model64, x_t, t), _log_probs64(model, rotated64, x_t, t)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got))
    assert (ref[finite] - got[finite]).abs().max() < 1e-9  # float64: exact up to rounding
    rotated = rotate_model(copy.deepcopy(model), seed=3)  # folded in float32
    ref32, got32 = model.log_probs(x_t, t), rotated.log_probs(x_t, t)
    assert (ref32[finite] - got32[finite]).abs().max() < 1e-3  # float32


def test_act_quant_linear_without_quantizers_is_the_linear():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)
    s = torch.rand(16) + 0.5
    module = ActQuantLinear(lin.weight * s, lin.bias, None, smooth=s)  # (x / s)(W diag s)^T
    torch.testing.assert_close(module(x), lin(x), rtol=1e-5, atol=1e-6)
    expected = F.linear(quantize_int_per_token(x, 4), lin.weight, lin.bias)
    got = ActQuantLinear(lin.weight, lin.bias, ActQuantConfig("int", 4))(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_w4a4_rotation_lowers_the_layer_errors(tiny):
    model, x_t, t = tiny
    errors = {}
    for method in ("rtn", "quarot-rtn"):
        q = copy.deepcopy(model)
        rows = quantize_activations_model(q, x_t, t, ActCalibConfig("w4a4", method))
        assert len(rows) == 4 * len(model.blocks)
        assert all(
            isinstance(lin, ActQuantLinear) for b in q.blocks for _, lin in q.quantizable_linears(b)
        )
        errors[method] = sum(r["rel_error"] for r in rows) / len(rows)
        # the table's error is the module's own error, recomputed on fresh rows of the last layer
        assert all(0 < r["rel_error"] < 1 for r in rows)
    assert errors["quarot-rtn"] < 0.6 * errors["rtn"], errors


def test_outlier_stats_match_a_direct_computation(tiny):
    model, x_t, t = tiny
    stats = {r["layer"]: r for r in activation_outlier_stats(model, x_t, t, batch=3)}
    seen = []
    handle = model.blocks[1].mlp[2].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model.log_probs(x_t, t)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    masked = (x_t == model.mask_id).reshape(-1)
    row = stats["blocks.1.mlp.2"]
    for kind, sel in (("masked", masked), ("clean", ~masked)):
        xs = x[sel]
        assert row[kind]["tokens"] == int(sel.sum())
        assert row[kind]["max_abs"] == pytest.approx(float(xs.abs().max()), rel=1e-5)
        err4 = ((xs - quantize_int_per_token(xs, 4)) ** 2).sum() / (xs**2).sum()
        assert row[kind]["int4_rel_err"] == pytest.approx(float(err4), rel=1e-3)
        cmax = xs.abs().amax(0)
        assert row[kind]["channel_ratio"] == pytest.approx(
            float(cmax.max() / cmax.median()), rel=1e-5
        )


def test_a4_ablation_one_layer_equals_a_swapped_module(tiny):
    model, x_t, t = tiny
    res = a4_ablation(model, x_t, t, batch=2, leave_one_out=False)
    only = {r["layer"]: r["only"] for r in res["layers"]}
    assert res["all"] > max(only.values()) > 0
    q = copy.deepcopy(model)
    lin = q.blocks[0].mlp[2]
    q.blocks[0].mlp[2] = ActQuantLinear(lin.weight, lin.bias, ActQuantConfig("int", 4))
    with torch.no_grad():
        ref, got = model.log_probs(x_t, t), q.log_probs(x_t, t)
    masked = x_t == model.mask_id
    p = ref.exp()
    kl = torch.where(ref > float("-inf"), p * (ref - got), torch.zeros_like(p)).sum(-1)[masked]
    assert only["blocks.0.mlp.2"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7)


def test_w4a4_benchmark_smoke(tmp_path):
    module = load_benchmark("w4a4")
    out = module.main(["--smoke", "--block-steps", "0,2", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "w4a4.json").read_text())
    assert on_disk["record"]["command"].startswith("python benchmarks/w4a4.py --smoke")
    assert {"git_commit", "device", "date", "torch"} <= set(on_disk["record"])
    pairs = {(r["scheme"], r["method"]) for r in out["rows"][1:]}
    assert ("w4a4", "fair") in pairs and ("w8a8fp8", "quarot") in pairs
    # the block-wise stage: one more row per learned-transform method, never for the others
    assert {("w4a4", "fair+block2"), ("w4a4", "flatquant+block2")} <= pairs
    # the lease's paths: fair-gptq with a weighting variant, both eval sets on every row
    assert ("w4a4", "fair-gptq+gamma0.5+block2") in pairs
    assert all(set(r["ppl_by_data"]) == {"wikitext2", "c4"} for r in out["rows"])
    assert not any(m.startswith(("rtn+", "quarot+")) for _, m in pairs)
    for r in out["rows"]:
        assert r["ppl"] > 1 and r["ppl"] == r["ppl"]
    assert all("flip_rate" in r for r in out["rows"][1:] if r["scheme"] == "w4a4")
    assert len(out["a4_ablation"]["layers"]) == 16 and out["activation_stats"]["layers"]
    assert "| w4a4 | quarot |" in (tmp_path / "w4a4.md").read_text()
