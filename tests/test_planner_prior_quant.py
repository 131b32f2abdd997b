"""PLANNER's latent prior is quantized by the engine through the family-neutral
`extra_block_stacks` interface: every prior block linear ends on its grid with every weight-only
method, its GPTQ result equals GPTQ on the Hessian of the inputs the float prior records
during the stem's own call, a packed planner-tiny reloads to the fake-quant model's log-probs,
and families that declare no extra stack (MDLM, Diffusion-LM) calibrate exactly as before."""

from __future__ import annotations

import copy

import pytest
import torch

from faircalib import hub
from faircalib.calib import masked_inputs, quantize
from faircalib.calib.engine import FakeQuantLinear, quant_results
from faircalib.config import (
    AWQConfig,
    CalibConfig,
    FairCalibConfig,
    GPTQConfig,
    ReconConfig,
    ReconMethodConfig,
    RTNConfig,
    SmoothQuantConfig,
)
from faircalib.formats.packed import load_packed_model, save_packed_model
from faircalib.models import build_model
from faircalib.quant import LayerInputs, quantize_gptq, quantize_rtn

N, SEQ = 8, 16
LINEARS = ("attn_qkv", "attn_out", "mlp.0", "mlp.2")
SMALL_RECON = ReconConfig(steps=4, eval_every=2, e2e_steps=2, batch=2, e2e_batch=2)


def planner_tiny():
    return hub.load("planner-tiny").float().eval()


def calib_tokens(model, n: int = N, seq: int = SEQ) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(2, model.vocab_size, (n, seq), generator=gen)


def method_configs() -> dict[str, object]:
    fair = dict(bits=4, group_size=32, steps=4, prefix_len=8, n_prompts=4)
    return {
        "rtn": RTNConfig(bits=4, group_size=32),
        "gptq": GPTQConfig(bits=4, group_size=32),
        "awq": AWQConfig(bits=4, group_size=32, n_grid=4, n_clip_grid=4),
        "smoothquant": SmoothQuantConfig(),
        "recon": ReconMethodConfig(**fair, recon=SMALL_RECON),
        "fair": FairCalibConfig(**fair, recon=SMALL_RECON),
    }


def prior_linears(model) -> dict[str, torch.nn.Module]:
    return {
        f"prior_blocks.{i}.{n}": m
        for i, block in enumerate(model.prior_blocks)
        for n, m in model.quantizable_linears(block)
    }


@pytest.mark.parametrize("method", list(method_configs()))
def test_every_prior_linear_is_on_its_grid_after_each_method(method):
    model = planner_tiny()
    config = method_configs()[method]
    report = quantize(model, config, calib_tokens(model), CalibConfig(n_samples=N, seq_len=SEQ))
    layers = prior_linears(model)
    assert len(layers) == 4 * model.cfg.n_prior_blocks
    named = [r["layer"] for r in report.layers]
    # the engine's walk: the prior's blocks first (the stem runs them), then the decoder's
    assert named == [f"{p}.{n}" for p, b in model.named_calib_blocks() for n in LINEARS]
    for name, fq in layers.items():
        assert isinstance(fq, FakeQuantLinear) and name in named
        qp, codes = fq.result.qparams, fq.result.codes
        assert int(codes.min()) >= 0 and int(codes.max()) <= 2**qp.bits - 1
        # the decode written out: scale and zero repeated over each group's columns
        width = fq.in_features if qp.group_size is None else qp.group_size
        scale = qp.scale.float().repeat_interleave(width, dim=1)
        zero = qp.zero.float().repeat_interleave(width, dim=1)
        assert torch.equal(fq.result.weight.float(), scale * (codes.float() - zero)), name
        assert torch.equal(fq.weight, fq.result.weight.to(fq.weight.dtype))


def _record_inputs(model, module, x_t, t) -> torch.Tensor:
    """Every input row the module sees while the model's stem runs on (x_t, t)."""
    rows = []
    handle = module.register_forward_pre_hook(lambda _m, args: rows.append(args[0].detach()))
    try:
        with torch.no_grad():
            model.stem(x_t, t)
    finally:
        handle.remove()
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).float()


def _gptq_reference(weight: torch.Tensor, x: torch.Tensor, cfg: GPTQConfig):
    """GPTQ straight from quant/ on H = X^T X / n of the recorded rows (uniform weights)."""
    hessian = ((x.T @ x).double() / len(x)).float()
    inputs = LayerInputs(
        hessian=hessian,
        sample=x,
        sample_weights=torch.ones(len(x)),
        act_absmax=x.abs().amax(0),
        act_absmean=x.abs().mean(0),
        n_rows=len(x),
    )
    return quantize_gptq(weight.detach().float(), inputs, cfg)


def test_prior_gptq_equals_gptq_on_the_hessian_of_its_recorded_inputs():
    model = planner_tiny()
    ref = copy.deepcopy(model)
    cfg = GPTQConfig(bits=4, group_size=32)
    calib = CalibConfig(n_samples=N, seq_len=SEQ)
    tokens = calib_tokens(model)
    quantize(model, cfg, tokens, calib, progress=False)
    x_t, t = masked_inputs(ref, tokens, calib)  # the engine's calibration rows
    checked = []
    # block 0: every linear sees the float prior's stream (statistics come from the float block)
    for name, lin in ref.quantizable_linears(ref.prior_blocks[0]):
        expected = _gptq_reference(lin.weight, _record_inputs(ref, lin, x_t, t), cfg)
        got = dict(model.quantizable_linears(model.prior_blocks[0]))[name].result
        assert torch.equal(got.codes, expected.codes), name
        assert torch.equal(got.weight, expected.weight), name
        checked.append(name)
    # block 1's first linear sees the output of the quantized block 0 (sequential calibration)
    float_qkv = ref.prior_blocks[1].attn_qkv
    rows = _record_inputs(model, model.prior_blocks[1].attn_qkv, x_t, t)
    expected = _gptq_reference(float_qkv.weight, rows, cfg)
    assert torch.equal(model.prior_blocks[1].attn_qkv.result.codes, expected.codes)
    assert checked == list(LINEARS)


def test_packed_planner_round_trip_includes_the_prior(tmp_path):
    model = planner_tiny()
    cfg = GPTQConfig(bits=4, group_size=32, scale_dtype="bfloat16")
    quantize(model, cfg, calib_tokens(model), CalibConfig(n_samples=N, seq_len=SEQ))
    results = quant_results(model)
    assert set(prior_linears(model)) <= set(results)
    out = save_packed_model(model, results, tmp_path / "packed", dtype=torch.float32)
    loaded = load_packed_model(out).float().eval()
    for name in prior_linears(model):  # the packed prior is read back as packed layers
        assert type(loaded.get_submodule(name)) is not torch.nn.Linear, name
    z_t, t_z = torch.randn(2, model.cfg.n_latents, model.cfg.latent_dim), torch.tensor([0.2, 0.9])
    with torch.no_grad():  # the prior alone, then the whole model
        assert torch.equal(loaded.denoise_eps(z_t, t_z), model.denoise_eps(z_t, t_z))
    x = calib_tokens(model, 2, SEQ)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x, t), model.log_probs(x, t))


def _tiny(family: str):
    torch.manual_seed(0)
    if family == "mdlm":
        cfg = dict(vocab_size=40, mask_id=39, seq_len=16, hidden_dim=32, cond_dim=16)
        return build_model({"family": "mdlm", **cfg, "n_blocks": 2, "n_heads": 2}).eval()
    return hub.load("diffusionlm-tiny").float().eval()


def _without_extra_stacks(model):
    model.extra_block_stacks = lambda: []  # the engine then walks `blocks` only: the old path
    return model


@pytest.mark.parametrize("family", ["mdlm", "diffusion_lm"])
@pytest.mark.parametrize("method", list(method_configs()))
def test_families_without_extra_stacks_quantize_bit_identically(family, method):
    plain = _tiny(family)
    assert plain.extra_block_stacks() == []
    old = _without_extra_stacks(copy.deepcopy(plain))
    tokens = calib_tokens(plain)
    calib = CalibConfig(n_samples=N, seq_len=SEQ)
    reports = [quantize(m, method_configs()[method], tokens, calib) for m in (plain, old)]
    drop = ("seconds",)
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in rep.layers] for rep in reports]
    assert rows[0] == rows[1]
    for (name, a), b in zip(plain.named_buffers(), old.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_planner_without_its_prior_stack_is_the_old_decoder_only_path():
    """Disabling the stack gives the old behaviour (float prior), and the prior's quantization
    is what changes the decoder's calibration: it now sees the quantized prior's plan."""
    model, old = planner_tiny(), _without_extra_stacks(planner_tiny())
    tokens = calib_tokens(model)
    calib = CalibConfig(n_samples=N, seq_len=SEQ)
    new_report = quantize(model, GPTQConfig(bits=4, group_size=32), tokens, calib)
    old_report = quantize(old, GPTQConfig(bits=4, group_size=32), tokens, calib)
    assert all(not r["layer"].startswith("prior_blocks") for r in old_report.layers)
    assert not any(isinstance(m, FakeQuantLinear) for m in old.prior_blocks.modules())
    assert len(new_report.layers) == len(old_report.layers) + 4 * model.cfg.n_prior_blocks

    # decoder block 0's attn_qkv reads the text only (the plan enters through mem_kv): same
    # inputs, same result; every later layer reads the plan's effect, now the quantized prior's
    def decoder_weights(m):
        return [
            (f"blocks.{i}.{n}", lin.result.weight)
            for i, block in enumerate(m.blocks)
            for n, lin in m.quantizable_linears(block)
        ]

    now, before = decoder_weights(model), dict(decoder_weights(old))
    assert now[0][0] == "blocks.0.attn_qkv"
    assert torch.equal(now[0][1], before["blocks.0.attn_qkv"])
    assert all(not torch.equal(w, before[n]) for n, w in now[1:])


def test_prior_layers_narrower_than_the_group_are_quantized_per_row():
    """planner-tiny's prior is 64 wide: at the default group of 128 its 64-input layers get one
    group spanning the row (plain per-row RTN), its 128-input mlp.2 keeps g128."""
    model, ref = planner_tiny(), planner_tiny()
    report = quantize(model, RTNConfig(bits=4), calib_tokens(model), CalibConfig(n_samples=4))
    groups = {r["layer"]: r["group_size"] for r in report.layers}
    for name, fq in prior_linears(model).items():
        float_weight = ref.get_submodule(name).weight.detach().float()
        group = None if float_weight.shape[1] < 128 else 128
        assert groups[name] == group == fq.result.qparams.group_size, name
        expected = quantize_rtn(float_weight, RTNConfig(bits=4, group_size=group))
        assert torch.equal(fq.result.codes, expected.codes), name
    assert {groups[f"blocks.0.{n}"] for n in LINEARS} == {128}  # the decoder: unchanged


def test_offloaded_calibration_quantizes_the_prior_to_the_same_bits():
    resident, offloaded = planner_tiny(), planner_tiny()
    tokens, cfg = calib_tokens(resident), GPTQConfig(bits=4, group_size=32)
    quantize(resident, cfg, tokens, CalibConfig(n_samples=N, seq_len=SEQ))
    quantize(offloaded, cfg, tokens, CalibConfig(n_samples=N, seq_len=SEQ, offload=True))
    for name, fq in prior_linears(resident).items():
        assert torch.equal(fq.result.codes, offloaded.get_submodule(name).result.codes), name


def test_include_exclude_patterns_reach_the_prior_stack():
    """--include/--exclude name the prior's layers `prior_blocks.<i>.<name>`: excluding them
    leaves every prior linear float and the decoder quantized; including only them does the
    reverse (names from the model's own walk, not from the selection code)."""
    from faircalib.calib.select import restrict, selected_layers

    model = planner_tiny()
    prior = set(prior_linears(model))
    chosen, skipped = selected_layers(model, None, ["prior_blocks.*"])
    assert set(skipped) == prior and prior.isdisjoint(chosen) and chosen
    chosen, skipped = selected_layers(model, ["prior_blocks.*"], None)
    assert set(chosen) == prior
    with restrict(model, None, ["prior_blocks.*"]):
        quantize(model, RTNConfig(bits=4, group_size=32), calib_tokens(model),
                 CalibConfig(n_samples=N), progress=False)  # fmt: skip
    assert not any(isinstance(m, FakeQuantLinear) for m in prior_linears(model).values())
    assert any(isinstance(m, FakeQuantLinear) for m in model.blocks.modules())
