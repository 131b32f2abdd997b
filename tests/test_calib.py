"""The layer-wise engine, FAIR-Calib and the quantize command on the shipped mdlm-tiny."""

import copy
import json
from pathlib import Path

import pytest
import torch

from faircalib import hub
from faircalib.calib import masked_inputs, quantize, sampler_levels
from faircalib.calib.engine import FakeQuantLinear, quant_results, quantize_model
from faircalib.calib.fair import row_weights, token_scores, track_frontier, weight_noise
from faircalib.cli import main
from faircalib.config import CalibConfig, FairCalibConfig, GPTQConfig, ReconConfig, RTNConfig
from faircalib.data import calibration_batch
from faircalib.errors import ConfigError
from faircalib.frontier import SamplerConfig, generate
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
    cfg = FairCalibConfig(  # the fast preset: the weighted base method and nothing else
        bits=4,
        group_size=32,
        weighting="uniform",
        inputs="states",
        steps=8,
        prefix_len=16,
        preset="fast",
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
    kl, _ = token_scores(model, states, weight_noise(cfg, 0))
    assert kl.abs().max().item() < 1e-6
    cfg.noise_scale = 1.0
    kl, margin = token_scores(model, states, weight_noise(cfg, 0))
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
        "--format",
        "fake",
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


# --- offloading -----------------------------------------------------------------------------
# "cpu:0" is the CPU under another name: tensors land on the CPU either way, but a spy on
# .to() can tell "to the calibration device" (cpu:0) from "back to the CPU" (cpu).
CALIB_DEVICE = "cpu:0"


def spy_moves(model):
    """Record every .to() of each block and non-block module, and the block resident on the
    calibration device when each block runs. Returns (moves, runs)."""
    moves, runs, resident = [], [], set()
    named = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    named += [(n, m) for n, m in model.named_children() if n != "blocks"]
    for name, module in named:

        def to(device, *args, _name=name, _to=module.to, **kwargs):
            target = str(torch.device(device))
            moves.append((_name, target))
            (resident.add if target == CALIB_DEVICE else resident.discard)(_name)
            return _to(device, *args, **kwargs)

        module.to = to
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(
            lambda _m, _a, i=i: runs.append((i, {r for r in resident if r.startswith("blocks")}))
        )
    return moves, runs


def test_offload_keeps_one_block_on_the_device_and_changes_nothing(setup):
    model, tokens, _ = setup
    cfg = GPTQConfig(bits=4, group_size=32)
    x_t, t = masked_inputs(model, tokens, CalibConfig())
    n_blocks = len(model.blocks)
    quantized = {}
    for offload in (False, True):
        q = copy.deepcopy(model)
        moves, runs = spy_moves(q)
        calib = CalibConfig(device=CALIB_DEVICE, offload=offload)
        report = quantize_model(q, cfg, x_t, t, calib_cfg=calib, progress=False)
        quantized[offload] = q
        # the moves are timed only when there are moves to time; the stages are disjoint
        # intervals of the run, so they cannot add up to more than its total
        tm = report.timings
        assert ("offload_s" in tm) == offload and ("home_s" in tm) == offload
        stages = ("stem_s", "stats_s", "quantize_s", "propagate_s", "offload_s", "home_s")
        assert sum(tm.get(k, 0.0) for k in stages) <= tm["total_s"] + 1e-3
        block_moves = [m for m in moves if m[0].startswith("blocks")]
        other_moves = [m for m in moves if not m[0].startswith("blocks")]
        stem_head = [n for n, _ in q.named_children() if n != "blocks"]
        if not offload:  # every block goes to the device once and stays there
            assert block_moves == [(f"blocks.{i}", CALIB_DEVICE) for i in range(n_blocks)]
            assert other_moves == [(n, CALIB_DEVICE) for n in stem_head]
            continue
        # block i: to the device, back to the CPU, and only then block i + 1
        expected = []
        for i in range(n_blocks):
            expected += [(f"blocks.{i}", CALIB_DEVICE), (f"blocks.{i}", "cpu")]
        assert block_moves == expected
        # stem and head: to the device before the first block, back to the CPU after the last
        assert other_moves == [(n, CALIB_DEVICE) for n in stem_head] + [
            (n, "cpu") for n in stem_head
        ]
        assert moves[: len(stem_head)] == other_moves[: len(stem_head)]
        assert moves[-len(stem_head) :] == other_moves[len(stem_head) :]
        # whenever a block ran (statistics and propagation), it was the only one on the device
        assert {i for i, _ in runs} == set(range(n_blocks))
        assert all(on_device == {f"blocks.{i}"} for i, on_device in runs)
        # codes and qparams moved with their modules
        for res in quant_results(q).values():
            assert res.codes.device.type == "cpu" and res.qparams.scale.device.type == "cpu"
    ref, off = quantized[False].state_dict(), quantized[True].state_dict()
    assert list(ref) == list(off)
    for k in ref:
        assert torch.equal(ref[k], off[k]), k
    codes_ref, codes_off = quant_results(quantized[False]), quant_results(quantized[True])
    assert codes_ref.keys() == codes_off.keys() and len(codes_ref) == 4 * n_blocks
    for k in codes_ref:
        assert torch.equal(codes_ref[k].codes, codes_off[k].codes), k


def test_fair_offload_tracks_on_the_device_then_returns_to_the_cpu(setup):
    model, tokens, _ = setup
    # block reconstruction on, the end-to-end stage off: offloading skips that stage
    stage2 = ReconConfig(steps=4, eval_every=2, e2e_steps=0)
    cfg = FairCalibConfig(bits=4, group_size=32, steps=4, prefix_len=16, n_prompts=4, recon=stage2)
    quantized = {}
    for offload in (False, True):
        q = copy.deepcopy(model)
        calls = []

        def to(device, *a, _calls=calls, _to=q.to, **kw):
            _calls.append(str(torch.device(device)))
            return _to(device, *a, **kw)

        q.to = to
        calib = CalibConfig(device=CALIB_DEVICE, offload=offload)
        quantize(q, cfg, tokens[:4], calib, progress=False)
        # without offload the whole model moves to the device once; with it, tracking places
        # the model itself (tests/test_streaming.py) and, the CPU being the device here, the
        # offloaded model is already there
        assert calls == ([] if offload else [CALIB_DEVICE])
        if offload:
            assert {str(p.device) for p in q.parameters()} == {"cpu"}
        quantized[offload] = q.state_dict()
    for k, v in quantized[False].items():
        assert torch.equal(v, quantized[True][k]), k


def test_quantize_cli_offload_and_sampler_masking(tmp_path: Path, capsys):
    out = tmp_path / "q"
    args = ["quantize", "mdlm-tiny", "--method", "gptq", "--nsamples", "4", "--seq-len", "32"]
    args += ["--group-size", "32", "--offload", "--masking", "sampler", "--sampler-steps", "8"]
    assert main([*args, "--out", str(out), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 16
    calib = json.loads((out / "quantization.json").read_text())["calib"]
    assert calib["offload"] is True and calib["masking"] == "sampler"
    assert calib["sampler_steps"] == 8
    loaded = hub.load(out)
    x = torch.full((1, 32), loaded.mask_id)
    assert torch.isfinite(loaded.log_probs(x, torch.ones(1)).logsumexp(-1)).all()
    bad = [*args[:-1], "0", "--out", str(tmp_path / "b")]
    assert main(bad) == 2 and not (tmp_path / "b").exists()
    assert "sampler_steps" in capsys.readouterr().err


# --- sampler-schedule masking ---------------------------------------------------------------
def test_sampler_levels_are_the_samplers_grid(setup):
    model, tokens, _ = setup
    steps = 8
    grid = sampler_levels(steps)
    assert torch.equal(grid, torch.arange(1, steps + 1) / steps)
    for sampler in ("ancestral", "low_confidence"):
        scfg = SamplerConfig(sampler=sampler, steps=steps, gen_length=16)
        res = generate(model, tokens[:2, :16], scfg, seed=0, trace=False, record_states=True)
        fed = torch.cat([t for _, t in res.states]).float()
        assert torch.isclose(fed[:, None], grid[None, :]).any(dim=1).all(), sampler
        assert torch.isclose(fed.unique()[:, None], grid[None, :]).any(dim=0).all(), sampler


def test_sampler_masking(setup):
    model, _, _ = setup
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.mask_id, (128, 256), generator=gen)
    steps = 16
    cfg = CalibConfig(masking="sampler", sampler_steps=steps, seed=5)
    x_t, t = masked_inputs(model, tokens, cfg)
    grid = sampler_levels(steps)
    # every t is a grid level; N = 128 >= 16 levels: each level exactly 128 / 16 = 8 times
    index = (t * steps).round().long() - 1
    assert torch.equal(grid[index], t)
    assert torch.equal(torch.bincount(index, minlength=steps), torch.full((steps,), 8))
    # mask fraction vs t: per sequence within 5 binomial std, per level (8 x 256 tokens) 4.5
    masked = x_t == model.mask_id
    assert torch.equal(x_t[~masked], tokens[~masked])
    frac = masked.float().mean(1)
    assert ((frac - t).abs() <= 5 * (t * (1 - t) / 256).sqrt() + 1e-6).all()
    for k in range(steps):
        level = grid[k]
        pooled = masked[index == k].float().mean()
        assert abs(pooled - level) <= 4.5 * (level * (1 - level) / (8 * 256)).sqrt() + 1e-6
    # deterministic for a seed; another seed moves the levels and the masks
    x2, t2 = masked_inputs(model, tokens, cfg)
    assert torch.equal(x_t, x2) and torch.equal(t, t2)
    x3, t3 = masked_inputs(model, tokens, CalibConfig(masking="sampler", sampler_steps=16, seed=6))
    assert not torch.equal(x_t, x3)
    # fewer sequences than levels: distinct, evenly spaced levels (every 64/8 = 8th)
    _, t_few = masked_inputs(model, tokens[:8], CalibConfig(masking="sampler", sampler_steps=64))
    gaps = torch.diff(torch.sort(t_few).values * 64).round()
    assert torch.equal(gaps, torch.full((7,), 8.0))
    with pytest.raises(ConfigError):
        CalibConfig(masking="sampler", sampler_steps=0)
