"""Activation quantization walks PLANNER's latent prior (`extra_block_stacks`) as the weight-only
engine does: every prior linear becomes an ActQuantLinear (`prior_blocks.<i>.<name>`) through the
CLI, calibrated on the rows the float stem hands the prior; W8A8 keeps the bound next to the float
model's; save -> load is bit-exact; the outlier statistics and the A4 ablation list the prior's
layers; families without extra stacks calibrate as before."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from faircalib import hub
from faircalib.calib.activations import (
    ActCalibConfig,
    ActQuantLinear,
    a4_ablation,
    activation_outlier_stats,
    quantize_activations,
    quantize_activations_model,
    quantize_layer,
    summarize_stats,
)
from faircalib.calib.fakequant_io import save_quantized
from faircalib.calib.inputs import masked_inputs
from faircalib.calib.select import restrict
from faircalib.config import CalibConfig, RTNConfig
from faircalib.quant import LayerInputsAccumulator, quantize_rtn
from faircalib.quant.activations import ActQuantConfig, quantize_int_per_token
from faircalib.quant.flatquant import FlatQuantConfig
from test_act_cli import calib_text, run_cli

torch.set_num_threads(1)
N, SEQ = 8, 32
LINEARS = ("attn_qkv", "attn_out", "mlp.0", "mlp.2")


def planner_tiny():
    return hub.load("planner-tiny").float().eval()


def tokens_for(model, n: int = N, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.vocab_size, (n, SEQ), generator=gen)


def calib_rows(model) -> tuple[torch.Tensor, torch.Tensor]:
    return masked_inputs(model, tokens_for(model), CalibConfig(n_samples=N, seq_len=SEQ))


def prior_names(model) -> list[str]:
    """The prior's linears as the model itself declares them (not the walker's names)."""
    return [
        f"prior_blocks.{i}.{n}"
        for i, block in enumerate(model.prior_blocks)
        for n, _ in model.quantizable_linears(block)
    ]


def walk_order(model) -> list[str]:
    return [f"{p}.{n}" for p, b in model.named_calib_blocks() for n in LINEARS]


# --- the CLI path ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("planner_act")
    calib = calib_text(root)
    out = {}
    for scheme, method in (("w8a8", "rtn"), ("w4a4", "quarot")):
        argv = ["quantize", "planner-tiny", "--scheme", scheme, "--method", method]
        argv += ["--nsamples", "4", "--seq-len", "32", "--calib", str(calib), "--format", "fake"]
        code, stdout, err = run_cli([*argv, "--out", str(root / method), "--json"])
        assert code == 0, err
        out[method] = (root / method, json.loads(stdout))
    return out


@pytest.mark.parametrize("method", ["rtn", "quarot"])
def test_every_prior_linear_is_act_quantized_through_the_cli(cli_runs, method):
    directory, summary = cli_runs[method]
    loaded, ref = hub.load(directory), planner_tiny()
    assert [r["layer"] for r in summary["layers"]] == walk_order(ref)
    assert summary["quantized_layers"] == 16 and not summary["float_layers"]
    record = json.loads((directory / "quantization.json").read_text())
    assert set(prior_names(ref)) <= set(record["activation_quant"]["layers"])
    for name in prior_names(ref):
        module = loaded.get_submodule(name)
        assert isinstance(module, ActQuantLinear), name
        assert module.act.bits == (8 if method == "rtn" else 4)
        assert (module.rotation is not None) == (method == "quarot")
    # the prior's input, time and output layers stay float, as every family's stem and head
    for name in ("prior_in", "prior_time.0", "prior_out.1"):
        layer = loaded.get_submodule(name)
        assert type(layer) is torch.nn.Linear
        assert torch.equal(layer.weight.float(), ref.get_submodule(name).weight)


def test_w8a8_prior_weights_are_symmetric_int8_rtn_of_the_float_weights(cli_runs):
    """RTN's weight grid ignores the inputs: each prior module's weight is quant/'s own
    symmetric per-channel INT8 RTN of the float weight (scheme w8a8)."""
    loaded, ref = hub.load(cli_runs["rtn"][0]), planner_tiny()
    for name in prior_names(ref):
        w = ref.get_submodule(name).weight.detach().float()
        expected = quantize_rtn(w, RTNConfig(bits=8, group_size=None, symmetric=True)).weight
        assert torch.equal(loaded.get_submodule(name).weight, expected), name


# --- which rows the prior is calibrated on -----------------------------------------------------


def _stem_rows(model, module, x_t, t, batch: int) -> list[torch.Tensor]:
    """The input of `module` in each calibration batch while the model's own stem runs."""
    rows = []
    handle = module.register_forward_pre_hook(lambda _m, args: rows.append(args[0].detach()))
    try:
        with torch.no_grad():
            for k in range(0, len(x_t), batch):
                model.stem(x_t[k : k + batch], t[k : k + batch])
    finally:
        handle.remove()
    return rows


def test_prior_block_0_is_calibrated_on_the_rows_the_float_stem_hands_it():
    """QuaRot (GPTQ weights): each first-block module equals `quantize_layer` on the statistics
    of the inputs that the float prior records during the stem's own call, not the decoder's
    stream (block index 0, layer j: seed j, as in the main stack)."""
    model = planner_tiny()
    ref = copy.deepcopy(model)
    x_t, t = calib_rows(model)
    cfg = ActCalibConfig("w4a4", "quarot", batch=3)  # several batches: the stream is sliced
    quantize_activations_model(model, x_t, t, cfg)
    for j, (name, lin) in enumerate(ref.quantizable_linears(ref.prior_blocks[0])):
        acc = LayerInputsAccumulator(lin.in_features, cfg.max_rows, cfg.seed, "cpu")
        for rows in _stem_rows(ref, lin, x_t, t, cfg.batch):
            acc.add(rows, torch.ones(rows.shape[:-1]))
        expected, _ = quantize_layer(f"prior_blocks.0.{name}", lin, acc.finish(), cfg, j)
        got = dict(model.quantizable_linears(model.prior_blocks[0]))[name]
        assert torch.equal(got.weight, expected.weight), name
        assert torch.equal(got.rotation.signs, expected.rotation.signs), name


def test_narrow_prior_layers_take_one_group_per_row_under_w4a8():
    """W4A8 groups 128 columns; the prior's 64-wide layers are quantized per row (the weight-only
    engine's rule), its 128-wide mlp.2 and the decoder keep g128 (RTN: the inputs do not matter)."""
    model, ref = planner_tiny(), planner_tiny()
    x_t, t = calib_rows(model)
    rows = {
        r["layer"]: r for r in quantize_activations_model(model, x_t, t, ActCalibConfig("w4a8"))
    }
    for name in [*prior_names(ref), "blocks.0.attn_qkv"]:
        w = ref.get_submodule(name).weight.detach().float()
        group = None if w.shape[1] < 128 else 128
        expected = quantize_rtn(w, RTNConfig(bits=4, group_size=group, symmetric=True)).weight
        assert torch.equal(model.get_submodule(name).weight, expected), name
        assert rows[name].get("group_size", 128) == group, name


# --- the bound -------------------------------------------------------------------------------


def _bound_terms(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randint(2, model.vocab_size, (16, SEQ), generator=gen)
    t = model.cfg.t_min + (1 - model.cfg.t_min) * torch.rand(16, generator=gen)
    with torch.no_grad():
        return model.bound_terms(x0, t, torch.rand(16, generator=gen))


def _nelbo(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    prior = terms["diffusion"] + terms["prior"] + terms["latent_recon"]
    return terms["decoder"] + prior - terms["entropy"]


def _quantized(scheme: str, exclude: list[str] | None = None):
    model = planner_tiny()
    x_t, t = calib_rows(model)
    with restrict(model, None, exclude):
        quantize_activations_model(model, x_t, t, ActCalibConfig(scheme, "rtn"))
    return model


def test_w8a8_keeps_the_bound_next_to_the_float_models():
    """Against the float model on the same (x0, t, u): W8A8 moves the mean bound by < 0.1% (a
    per-layer output error ~5e-5; measured ~0.04%) and by < 1/16 of W4A4's move - 16x finer
    steps for weights and activations, so a change first order in the step is 16x smaller,
    one of higher order smaller still (measured ~1/50)."""
    float_bound = _nelbo(_bound_terms(planner_tiny())).mean()
    move8 = (_nelbo(_bound_terms(_quantized("w8a8"))).mean() - float_bound).abs()
    move4 = (_nelbo(_bound_terms(_quantized("w4a4"))).mean() - float_bound).abs()
    assert 0 < move8 < 1e-3 * float_bound.abs()
    assert move8 < move4 / 16


def test_quantizing_only_the_prior_moves_only_the_prior_diffusion_term():
    """With the decoder excluded, the bound's decoder, prior-KL, latent-recon and entropy terms
    are the float model's bits (they never run the prior); the diffusion term, the prior's own
    noise prediction, moves."""
    float_terms = _bound_terms(planner_tiny())
    terms = _bound_terms(_quantized("w4a4", exclude=["blocks.*"]))
    for key in ("decoder", "prior", "latent_recon", "entropy"):
        assert torch.equal(terms[key], float_terms[key]), key
    assert (terms["diffusion"] - float_terms["diffusion"]).abs().max() > 0


# --- save / load -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "method", "fmt"),
    [("w8a8", "rtn", "fake"), ("w4a4", "quarot", "fake"), ("w4a4", "flatquant", "fake")]
    + [("w8a8", "rtn", "packed")],
)
def test_save_load_round_trip_is_bit_exact(tmp_path, scheme, method, fmt):
    model = hub.load("planner-tiny").eval()  # the shipped dtype: what packed export keeps
    cfg = ActCalibConfig(scheme, method, flat=FlatQuantConfig(steps=2), block_steps=2)
    calib = CalibConfig(n_samples=N, seq_len=SEQ)
    if fmt == "packed":
        from faircalib.calib.fakequant_io import packed_act_config

        cfg = packed_act_config(cfg)
    report = quantize_activations(model, tokens_for(model), cfg, calib)
    if cfg.block_wise:  # the block-wise stage tuned the prior's blocks too, named by stack
        blocks = [b["block"] for b in report["blocks"]]
        assert blocks == ["prior_blocks.0", "prior_blocks.1", 0, 1]
    x, t = tokens_for(model, 4, seed=5), torch.tensor([0.1, 0.4, 0.7, 0.95])
    z_t = torch.randn(4, model.cfg.n_latents, model.cfg.latent_dim)
    with torch.no_grad():  # before saving: the fake writer folds the modules in place
        want = (model.denoise_eps(z_t, t), model.log_probs(x, t), _bound_terms(model))
    assert any(isinstance(model.get_submodule(n), ActQuantLinear) for n in prior_names(model))
    save_quantized(model, report, tmp_path / "q", None, fmt=fmt)
    loaded = hub.load(tmp_path / "q")
    for name in prior_names(model):
        assert type(loaded.get_submodule(name)) is not torch.nn.Linear, name
    with torch.no_grad():
        assert torch.equal(loaded.denoise_eps(z_t, t), want[0])
        assert torch.equal(loaded.log_probs(x, t), want[1])
    got = _bound_terms(loaded)
    assert all(torch.equal(got[k], want[2][k]) for k in want[2])


# --- statistics and the A4 ablation -------------------------------------------------------------


def test_outlier_stats_list_the_prior_and_match_a_direct_computation():
    model = planner_tiny()
    x_t, t = calib_rows(model)
    rows = activation_outlier_stats(model, x_t, t, batch=3, t_bins=3)
    assert [r["layer"] for r in rows] == walk_order(model)
    stats = {r["layer"]: r for r in rows}
    name, lin = "prior_blocks.1.mlp.2", model.prior_blocks[1].mlp[2]
    x = torch.cat([r.reshape(-1, r.shape[-1]) for r in _stem_rows(model, lin, x_t, t, N)])
    # the prior's rows are the K codes of each sequence: no mask rows, all clean
    assert "masked" not in stats[name] and stats[name]["clean"]["tokens"] == N * model.cfg.n_latents
    clean = stats[name]["clean"]
    assert clean["max_abs"] == pytest.approx(float(x.abs().max()), rel=1e-6)
    err = ((x - quantize_int_per_token(x, 4)) ** 2).sum(1)
    assert clean["int4_rel_err"] == pytest.approx(float(err.sum() / (x**2).sum()), rel=1e-4)
    seq_bins = (t * 3).long().clamp(0, 2).repeat_interleave(model.cfg.n_latents)
    for b in range(3):
        sel = seq_bins == b
        got = clean["int4_rel_err_by_t"][b]
        if not sel.any():
            assert got is None
            continue
        assert got == pytest.approx(float(err[sel].sum() / (x[sel] ** 2).sum()), rel=1e-4)
    kinds = summarize_stats(rows)
    assert {"attn_qkv", "prior_blocks.attn_qkv"} <= set(kinds)


def test_a4_ablation_lists_the_prior_and_one_prior_layer_equals_a_swapped_module():
    """PLANNER's inputs carry no [MASK] (its schedule never masks), so the KL is read at
    positions set to the mask id by hand; quantizing one prior layer's input must equal swapping
    that layer for an A4 ActQuantLinear in a copy."""
    model = planner_tiny()
    x_t, t = calib_rows(model)
    x_t = x_t[:4].clone()
    t = t[:4]
    x_t[:, ::3] = model.mask_id
    res = a4_ablation(model, x_t, t, batch=2, leave_one_out=False)
    only = {r["layer"]: r["only"] for r in res["layers"]}
    assert list(only) == walk_order(model)
    q = copy.deepcopy(model)
    lin = q.prior_blocks[0].mlp[0]
    q.prior_blocks[0].mlp[0] = ActQuantLinear(lin.weight, lin.bias, ActQuantConfig("int", 4))
    with torch.no_grad():
        ref, got = model.log_probs(x_t, t), q.log_probs(x_t, t)
    masked = x_t == model.mask_id
    p = ref.exp()
    kl = torch.where(ref > float("-inf"), p * (ref - got), torch.zeros_like(p)).sum(-1)[masked]
    assert float(kl.mean()) > 0
    assert only["prior_blocks.0.mlp.0"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7)


# --- families and paths without the prior --------------------------------------------------------


def test_planner_without_its_prior_stack_is_the_old_decoder_only_path():
    """The stack disabled: only the decoder is quantized and the prior stays float. Decoder
    block 0's qkv reads the text only, so it is the same either way; the layers after it read
    the plan, now the quantized prior's."""
    model, old = planner_tiny(), planner_tiny()
    old.extra_block_stacks = lambda: []
    x_t, t = calib_rows(model)
    cfg = ActCalibConfig("w4a4", "quarot")
    new_rows = quantize_activations_model(model, x_t, t, cfg)
    old_rows = quantize_activations_model(old, x_t, t, cfg)
    assert [r["layer"] for r in old_rows] == [f"blocks.{i}.{n}" for i in (0, 1) for n in LINEARS]
    assert not any(isinstance(m, ActQuantLinear) for m in old.prior_blocks.modules())
    assert len(new_rows) == len(old_rows) + 8
    assert torch.equal(model.blocks[0].attn_qkv.weight, old.blocks[0].attn_qkv.weight)
    assert not torch.equal(model.blocks[1].mlp[2].weight, old.blocks[1].mlp[2].weight)


def test_diffusionlm_tiny_has_no_extra_stack_and_is_walked_as_before():
    """diffusionlm-tiny declares no extra stack: the walk is `blocks` alone, and block 0's
    modules equal `quantize_layer` on the statistics of the stem's own outputs."""
    model = hub.load("diffusionlm-tiny").float().eval()
    ref = copy.deepcopy(model)
    assert model.extra_block_stacks() == []
    x_t, t = masked_inputs(model, tokens_for(model), CalibConfig(n_samples=N, seq_len=SEQ))
    cfg = ActCalibConfig("w4a4", "quarot", batch=3)
    rows = quantize_activations_model(model, x_t, t, cfg)
    assert [r["layer"] for r in rows] == [
        f"blocks.{i}.{n}" for i in range(len(ref.blocks)) for n in LINEARS
    ]
    block = ref.blocks[0]
    for j, (name, lin) in enumerate(ref.quantizable_linears(block)):
        acc = LayerInputsAccumulator(lin.in_features, cfg.max_rows, cfg.seed, "cpu")

        def record(_module, args, acc=acc):
            acc.add(args[0], torch.ones(args[0].shape[:-1]))

        handle = lin.register_forward_pre_hook(record)
        with torch.no_grad():
            for k in range(0, len(x_t), cfg.batch):
                h, ctx = ref.stem(x_t[k : k + cfg.batch], t[k : k + cfg.batch])
                block(h, ctx)
        handle.remove()
        expected, _ = quantize_layer(f"blocks.0.{name}", lin, acc.finish(), cfg, j)
        got = dict(model.quantizable_linears(model.blocks[0]))[name]
        assert torch.equal(got.weight, expected.weight), name
