"""The layer-wise engine, FAIR-Calib and the quantize command on the shipped mdlm-tiny."""

import copy
import json
from pathlib import Path

import pytest
import torch

from faircalib import hub
from faircalib.calib import masked_inputs, quantize
from faircalib.calib.engine import FakeQuantLinear
from faircalib.calib.fair import noisy_copy, row_weights, token_scores, track_frontier
from faircalib.cli import main
from faircalib.config import CalibConfig, FairCalibConfig, GPTQConfig, RTNConfig
from faircalib.data import calibration_batch
from faircalib.models.objective import nelbo_per_sequence
from faircalib.quant import quantize_rtn

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    model = hub.load("mdlm-tiny")
    tok = hub.load_tokenizer("mdlm-tiny")
    tokens = calibration_batch(tok, n_samples=8, seq_len=64, seed=0)
    held = calibration_batch(tok, "c4", "validation", n_samples=8, seq_len=64, seed=1)
    return model, tokens, held


def output_kl(ref, model, x0) -> float:
    gen = torch.Generator().manual_seed(0)
    t = torch.full((len(x0),), 0.5)
    x_t = torch.where(torch.rand(x0.shape, generator=gen) < 0.5, ref.mask_id, x0)
    with torch.no_grad():
        lp, lq = ref.log_probs(x_t, t), model.log_probs(x_t, t)
    masked = x_t == ref.mask_id
    return (lp.exp() * (lp - lq).nan_to_num(0.0)).sum(-1)[masked].mean().item()


def test_engine_rtn_equals_direct_rtn(setup):
    model, tokens, _ = setup
    q = copy.deepcopy(model)
    quantize(q, RTNConfig(bits=4, group_size=32), tokens, CalibConfig(), progress=False)
    for block, qblock in zip(model.blocks, q.blocks, strict=True):
        for (name, lin), (_, qlin) in zip(
            model.quantizable_linears(block), q.quantizable_linears(qblock), strict=True
        ):
            assert isinstance(qlin, FakeQuantLinear), name
            direct = quantize_rtn(lin.weight.float(), RTNConfig(bits=4, group_size=32))
            assert torch.equal(qlin.weight, direct.weight)


def test_gptq_beats_rtn_at_3_bits_and_is_deterministic(setup):
    model, tokens, held = setup
    errs = {}
    for cfg in (RTNConfig(bits=3, group_size=32), GPTQConfig(bits=3, group_size=32)):
        q = copy.deepcopy(model)
        quantize(q, cfg, tokens, CalibConfig(), progress=False)
        errs[cfg.method] = output_kl(model, q, held)
    assert errs["gptq"] < errs["rtn"]
    q2 = copy.deepcopy(model)
    quantize(q2, GPTQConfig(bits=3, group_size=32), tokens, CalibConfig(), progress=False)
    q1 = copy.deepcopy(model)
    quantize(q1, GPTQConfig(bits=3, group_size=32), tokens, CalibConfig(), progress=False)
    for a, b in zip(q1.state_dict().values(), q2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_int8_rtn_bound_within_one_percent(setup):
    model, tokens, held = setup
    q = copy.deepcopy(model)
    quantize(q, RTNConfig(bits=8, group_size=None), tokens, CalibConfig(), progress=False)
    gen = torch.Generator().manual_seed(0)
    t, u = torch.rand(len(held), generator=gen), torch.rand(held.shape, generator=gen)
    with torch.no_grad():
        a = nelbo_per_sequence(model, held, t, u).mean().item()
        b = nelbo_per_sequence(q, held, t, u).mean().item()
    assert abs(b / a - 1) < 0.01


def test_masked_calibration_inputs(setup):
    model, tokens, _ = setup
    x_t, t = masked_inputs(model, tokens, CalibConfig(seed=3))
    frac = (x_t == model.mask_id).float().mean(1)
    assert torch.corrcoef(torch.stack([frac, t]))[0, 1] > 0.9  # masking follows t
    x_clean, t0 = masked_inputs(model, tokens, CalibConfig(masking="none"))
    assert torch.equal(x_clean, tokens) and (t0 == 0).all()


def test_fair_uniform_weights_reproduce_the_base_method(setup):
    model, tokens, _ = setup
    cfg = FairCalibConfig(
        bits=4, group_size=32, weighting="uniform", inputs="states", steps=8, prefix_len=16
    )
    fair = copy.deepcopy(model)
    quantize(fair, cfg, tokens, CalibConfig(), progress=False)
    states = track_frontier(model, tokens, cfg, seed=0, device="cpu")
    from faircalib.calib.engine import quantize_model

    base = copy.deepcopy(model)
    quantize_model(
        base, cfg.base_config(), states.x_t, states.t, None, calib_cfg=CalibConfig(), progress=False
    )
    for a, b in zip(fair.state_dict().values(), base.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_instability_is_zero_without_noise_and_weights_follow_it(setup):
    model, tokens, _ = setup
    cfg = FairCalibConfig(bits=4, group_size=32, steps=8, prefix_len=16, noise_scale=0.0)
    states = track_frontier(model, tokens[:4], cfg, seed=0, device="cpu")
    assert states.frontier.any()
    kl, _ = token_scores(model, noisy_copy(model, cfg, 0), states)
    assert kl.abs().max().item() < 1e-6
    cfg.noise_scale = 1.0
    kl, margin = token_scores(model, noisy_copy(model, cfg, 0), states)
    assert kl[states.frontier].mean() > 0
    w = row_weights(states, kl, margin, cfg, model.mask_id)
    assert (w[~states.frontier] == cfg.floor).all()
    assert (w[states.frontier] > cfg.floor).all()


def test_quantize_cli_writes_loadable_models_and_refuses_bad_input(tmp_path: Path, capsys):
    out = tmp_path / "q"
    args = [
        "quantize",
        "mdlm-tiny",
        "--method",
        "rtn",
        "--nsamples",
        "4",
        "--seq-len",
        "32",
        "--group-size",
        "32",
    ]
    assert main([*args, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["layers"]) == 16
    loaded = hub.load(out)
    assert isinstance(loaded.blocks[0].attn_qkv, torch.nn.Linear)
    assert json.loads((out / "quantization.json").read_text())["method"]["bits"] == 4
    assert main([*args, "--out", str(out)]) == 2  # exists
    assert main([*args[:-2], "--group-size", "48", "--out", str(tmp_path / "b")]) == 2
    assert main([*args, "--bits", "9", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert "unsupported" in capsys.readouterr().err
