"""FAIR-Calib's weighting, calibration inputs and fake-quant save/load on mdlm-tiny."""

import copy
import json
from pathlib import Path

import pytest
import torch

from faircalib import hub
from faircalib.calib import calibration_inputs, quantize
from faircalib.calib.engine import FakeQuantLinear
from faircalib.calib.fair import FrontierStates, row_weights
from faircalib.calib.fakequant_io import ACT_QUANT_JSON, load_fake_quant, save_quantized
from faircalib.cli import main
from faircalib.config import CalibConfig, FairCalibConfig, GPTQConfig, SmoothQuantConfig
from faircalib.data import calibration_batch
from faircalib.quant import LayerInputsAccumulator, quantize_linear

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    model = hub.load("mdlm-tiny")
    tok = hub.load_tokenizer("mdlm-tiny")
    return model, calibration_batch(tok, n_samples=6, seq_len=32, seed=0)


def _group_error(w_q: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.T - x @ w_q.T) ** 2).sum() / (x @ w.T).pow(2).sum())


def test_up_weighted_rows_end_with_lower_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)  # [out, in]
    # two row populations with different low-rank input correlations: GPTQ can compensate
    # rounding error inside one population's span, not inside both
    xa = torch.randn(256, 8, generator=gen) @ torch.randn(8, 64, generator=gen)
    xb = torch.randn(256, 8, generator=gen) @ torch.randn(8, 64, generator=gen)
    x = torch.cat([xa, xb])
    errs = {}
    for label, weight_a in (("uniform", 1.0), ("weighted", 20.0)):
        acc = LayerInputsAccumulator(64, 512, 0, "cpu")
        acc.add(x, torch.cat([torch.full((256,), weight_a), torch.ones(256)]))
        res = quantize_linear(w, acc.finish(), GPTQConfig(bits=3, group_size=32, act_order=False))
        errs[label] = _group_error(res.weight, w, xa)
    assert errs["weighted"] < 0.7 * errs["uniform"]  # measured 0.57


def test_row_weights_options():
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randint(2, 50, (3, 10), generator=gen)
    x_t[:, 5:] = 1  # masked tail
    frontier = torch.zeros(3, 10, dtype=torch.bool)
    frontier[:, 5] = True
    states = FrontierStates(x_t, torch.full((3,), 0.5), frontier)
    kl = torch.rand(3, 10, generator=gen) + 0.1
    margin = torch.rand(3, 10, generator=gen)
    cfg = FairCalibConfig(floor=0.5, gamma=1.0, max_weight=4.0)
    w = row_weights(states, kl, margin, cfg, mask_id=1)
    assert (w[~frontier] == 0.5).all()
    boost = (kl[:, 5] / kl[:, 5].mean()).clamp(max=4.0)
    assert torch.allclose(w[:, 5], 0.5 + boost)
    cfg.tokens = "all"
    w_all = row_weights(states, kl, margin, cfg, mask_id=1)
    assert (w_all[:, :5] == 0.5).all() and (w_all[:, 5:] > 0.5).all()
    cfg.weighting = "uniform"
    assert (row_weights(states, kl, margin, cfg, mask_id=1) == 1).all()


def test_calibration_inputs_are_seeded_with_unit_row_weights(setup):
    model, tokens = setup
    x1, t1, w1 = calibration_inputs(model, tokens, CalibConfig(seed=5))
    x2, t2, _ = calibration_inputs(model, tokens, CalibConfig(seed=5))
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    assert w1.shape == tokens.shape and (w1 == 1).all()
    assert t1.min() >= 0.05 and t1.max() <= 1.0


def test_smoothquant_fake_quant_round_trip(setup, tmp_path: Path):
    model, tokens = setup
    q = copy.deepcopy(model)
    report = quantize(q, SmoothQuantConfig(), tokens, CalibConfig(), progress=False)
    x_t, t, _ = calibration_inputs(model, tokens, CalibConfig(seed=9))
    with torch.no_grad():
        expected = q.log_probs(x_t, t)
    save_quantized(copy.deepcopy(q), report, tmp_path / "sq", None)
    meta = json.loads((tmp_path / "sq" / ACT_QUANT_JSON).read_text())
    assert len(meta["layers"]) == 16
    loaded = load_fake_quant(tmp_path / "sq")
    assert isinstance(loaded.blocks[0].attn_qkv, FakeQuantLinear)
    with torch.no_grad():
        got = loaded.log_probs(x_t, t)
    finite = expected.isfinite()
    assert torch.equal(finite, got.isfinite())
    assert (got[finite] - expected[finite]).abs().max().item() < 1e-4


def test_quantize_cli_fair_records_overhead(tmp_path: Path, capsys):
    out = tmp_path / "fair"
    args = ["quantize", "mdlm-tiny", "--method", "fair", "--bits", "4", "--group-size", "32"]
    args += ["--nsamples", "4", "--seq-len", "32", "--fair-steps", "4", "--fair-prefix-len", "8"]
    args += ["--recon-steps", "4", "--e2e-steps", "4", "--format", "fake"]
    assert main([*args, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"]["method"] == "fair" and len(summary["layers"]) == 16
    assert summary["timings"]["frontier_tracking_s"] > 0
    assert summary["timings"]["quantize_s"] > 0
    record = json.loads((out / "quantization.json").read_text())
    assert record["calib"]["fair"]["frontier_tokens"] > 0
    assert all(r["rel_error"] < 0.5 for r in summary["layers"])
    assert isinstance(hub.load(out).blocks[0].attn_qkv, torch.nn.Linear)
