"""Packed (compressed-tensors pack-quantized) checkpoints: layout, round trip, refusals."""

import copy
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from safetensors.torch import load_file, save_file
from torch import nn

from faircalib import hub
from faircalib.config import AWQConfig, QuantConfig, SmoothQuantConfig
from faircalib.errors import CheckpointError, ConfigError
from faircalib.formats import (
    load_packed_model,
    pack_layer,
    packed_nbytes,
    quantization_args,
    save_packed_model,
    unpack_layer,
)
from faircalib.formats import packed as packed_module
from faircalib.formats.packed import check_packable_method
from faircalib.kernels import QuantLinear
from faircalib.models import MDLM, MDLMConfig
from faircalib.quant import quantize_rtn
from faircalib.quant.primitives import (
    compute_qparams,
    dequantize,
    quantize,
    quantize_activations_per_token,
    round_scales,
)

SCHEMES = [(b, g, s) for b in (4, 8) for g in (32, 64, 128, None) for s in (True, False)]


@dataclass
class BF16Config(QuantConfig):
    """RTN whose scales are rounded to bf16 before codes are chosen (what packing needs)."""

    scale_dtype: str | None = "bfloat16"


def quantized(out_f, in_f, bits, group, sym, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.1
    qp = compute_qparams(w, QuantConfig(bits=bits, group_size=group, symmetric=sym))
    qp = round_scales(qp, torch.bfloat16)  # the explicit step; codes chosen after it
    return quantize(w, qp), qp


@pytest.mark.parametrize(("bits", "group", "sym"), [*SCHEMES, (3, 64, False), (2, 32, True)])
def test_pack_unpack_round_trip_is_exact(bits, group, sym):
    codes, qp = quantized(40, 256, bits, group, sym)  # 40 rows: zero points straddle words
    tensors = pack_layer(codes, qp)
    assert tensors["weight_packed"].dtype == torch.int32
    assert tensors["weight_packed"].shape == (40, 256 * bits // 32)
    assert ("weight_zero_point" in tensors) == (not sym)
    codes2, qp2 = unpack_layer(tensors, quantization_args(bits, group, sym))
    assert tensors["weight_scale"].dtype == torch.bfloat16  # the default checkpoint dtype
    assert torch.equal(codes2, codes)
    assert torch.equal(qp2.scale, qp.scale) and torch.equal(qp2.zero, qp.zero)
    assert (qp2.bits, qp2.group_size, qp2.symmetric) == (bits, group, sym)


def test_pack_layer_refuses_scales_the_checkpoint_dtype_cannot_hold():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=32))  # float32 scales
    with pytest.raises(ConfigError, match="not exactly representable in bfloat16"):
        pack_layer(quantize(w, qp), qp, name="blocks.0.attn_qkv")
    assert pack_layer(quantize(w, qp), qp, torch.float32)["weight_scale"].dtype == torch.float32


@pytest.mark.parametrize(("bits", "group", "sym"), SCHEMES)
def test_compressed_tensors_decompressor_reads_our_layout(bits, group, sym):
    """The package's own decompressor (what vLLM / transformers use) dequantizes in the scale
    dtype: it gives our fake-quant weight rounded to bf16, bit for bit."""
    codes, qp = quantized(32, 128, bits, group, sym, seed=1)
    scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(bits, group, sym))
    out = PackedQuantizationCompressor.decompress(pack_layer(codes, qp), scheme)
    w_hat = dequantize(codes, qp)
    assert out["weight"].dtype == torch.bfloat16
    assert torch.equal(out["weight"], w_hat.to(torch.bfloat16))


def test_int4_g128_packed_bytes_at_most_028_of_bf16():
    codes = torch.randint(0, 16, (4096, 4096), dtype=torch.uint8)  # a Llama-8B-sized layer
    qp = compute_qparams(torch.randn(4096, 4096), BF16Config(bits=4, group_size=128))
    ratio = packed_nbytes(pack_layer(codes, qp)) / (4096 * 4096 * 2)
    assert ratio <= 0.27, ratio  # bf16 scales: 0.2676x
    assert ratio >= 0.25  # the codes alone are 0.25x: the rest is scales and zero points


# --- whole models ----------------------------------------------------------------------------
def tiny_model(seed=0) -> MDLM:
    torch.manual_seed(seed)
    cfg = MDLMConfig(
        vocab_size=40,
        mask_id=39,
        seq_len=16,
        hidden_dim=64,
        cond_dim=16,
        n_blocks=2,
        n_heads=4,
        mlp_ratio=2,
    )
    model = MDLM(cfg)
    with torch.no_grad():  # random everything, including the zero-initialised output layer
        for p in model.parameters():
            # bf16 values: the bf16 checkpoint stores the float tensors losslessly
            p.copy_(torch.randn_like(p).mul(0.2).bfloat16())
    return model.eval()


class FakeQuantLinear(nn.Module):
    """The fake-quant reference: smoothing, activation fake-quant, dequantized float weight."""

    def __init__(self, result, bias):
        super().__init__()
        self.r, self.bias = result, bias
        self.out_features, self.in_features = result.codes.shape
        self.register_buffer("weight", result.weight)  # as calib's FakeQuantLinear keeps it

    def forward(self, x):
        if self.r.input_scale is not None:
            x = x / self.r.input_scale
        if self.r.act_bits is not None:
            x = quantize_activations_per_token(x, self.r.act_bits)
        return F.linear(x, self.r.weight, self.bias)


def quantize_model(model: MDLM) -> dict:
    """RTN (bf16 scales) every block linear with a mix of schemes."""
    schemes = [(4, 32, False), (4, None, True), (8, None, True), (4, 64, True)]
    results = {}
    for i, block in enumerate(model.blocks):
        for j, (name, linear) in enumerate(model.quantizable_linears(block)):
            bits, group, sym = schemes[(i + j) % len(schemes)]
            cfg = BF16Config(bits=bits, group_size=group, symmetric=sym)
            results[f"blocks.{i}.{name}"] = quantize_rtn(linear.weight.detach(), cfg)
    return results


def smoothed(result, seed=5):
    """A SmoothQuant-style W8A8 result (the layout format_version 1 wrote): input scale s."""
    s = torch.rand(result.codes.shape[1], generator=torch.Generator().manual_seed(seed)) + 0.5
    return SimpleNamespace(**{**vars(result), "input_scale": s, "act_bits": 8})


def fake_quant_model(model: MDLM, results: dict) -> MDLM:
    fq = copy.deepcopy(model)
    for name, r in results.items():
        parent, _, child = name.rpartition(".")
        setattr(fq.get_submodule(parent), child, FakeQuantLinear(r, fq.get_submodule(name).bias))
    return fq


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    model = tiny_model()
    results = quantize_model(model)
    out = tmp_path_factory.mktemp("packed") / "model"
    save_packed_model(
        model, results, out, extra_files={"tokenizer.json": "{}"}, metadata={"method": "rtn"}
    )
    return out, model, results


def test_round_trip_gives_identical_log_probs_to_fake_quant(packed_dir):
    out, model, results = packed_dir
    loaded = load_packed_model(out)
    reference = fake_quant_model(model, results)
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randint(0, 39, (3, 16), generator=gen)
    x_t[torch.rand(3, 16, generator=gen) < 0.5] = 39
    with torch.no_grad():
        got, want = loaded.log_probs(x_t), reference.log_probs(x_t)
    assert torch.equal(got, want)
    assert torch.isfinite(got[x_t == 39]).any()
    quant = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == len(results) == 8
    assert all(m.last_backend == "dequant" for m in quant)


def test_format_1_directories_with_input_scales_still_load(packed_dir, tmp_path):
    """Directories written before packing refused AWQ / SmoothQuant list smoothed layers in
    faircalib.input_scale / act_bits: the loader still applies them."""
    out, model, results = packed_dir
    directory = copy_dir(out, tmp_path)
    layer = "blocks.1.attn_out"
    old = smoothed(results[layer])
    rewrite_shard(directory, lambda t: t.update({f"{layer}.input_scale": old.input_scale}))
    edit_config(
        directory,
        lambda c: c["faircalib"].update(format_version=1, input_scale=[layer], act_bits={layer: 8}),
    )
    loaded = load_packed_model(directory)
    reference = fake_quant_model(model, {**results, layer: old})
    x_t = torch.randint(0, 39, (2, 16), generator=torch.Generator().manual_seed(6))
    x_t[:, 1::2] = 39
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x_t), reference.log_probs(x_t))
    quant = loaded.get_submodule(layer)
    assert quant.act_bits == 8 and torch.equal(quant.input_scale, old.input_scale)


def test_bf16_autocast_runs_the_int4_cpu_kernel_close_to_fake_quant(packed_dir):
    out, model, results = packed_dir
    loaded = load_packed_model(out, dtype=torch.bfloat16)
    reference = fake_quant_model(model, results)
    x_t = torch.randint(0, 39, (2, 16), generator=torch.Generator().manual_seed(2))
    x_t[:, ::2] = 39
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = loaded.log_probs(x_t)
    with torch.no_grad():
        want = reference.log_probs(x_t)
    masked = x_t == 39
    p_got, p_want = got[masked].float().exp(), want[masked].exp()
    # bf16 weights, activations and int4 kernel: total variation distance below 0.02
    # (measured 0.004; the fake-quant model itself moves 0.003 under bf16 autocast)
    assert float(0.5 * (p_got - p_want).abs().sum(-1).max()) <= 0.02
    backends = {m.last_backend for m in loaded.modules() if isinstance(m, QuantLinear)}
    assert backends == {"int4_cpu", "dequant"}  # 8-bit layers have no CPU kernel: dequant


def test_config_records_schema_writer_and_our_section(packed_dir):
    out, _, results = packed_dir
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["version"].startswith("0.20.")
    parsed = QuantizationConfig.model_validate(qc)
    targets = sorted(t for s in parsed.config_groups.values() for t in s.targets)
    assert targets == sorted(results)
    # one group per scheme: (4, g32, asym), (4, channel, sym), (8, channel, sym), (4, g64, sym)
    assert len(parsed.config_groups) == 4
    # every other Linear is ignored: the output layer, the adaLN and time-embedding linears
    linears = {n for n, m in tiny_model().named_modules() if isinstance(m, nn.Linear)}
    assert sorted(parsed.ignore) == sorted(linears - set(results))
    assert sorted(parsed.ignore) == sorted(
        ["sigma_map.mlp.0", "sigma_map.mlp.2", "output_layer.linear"]
        + [f"{b}.adaLN_modulation" for b in ("blocks.0", "blocks.1", "output_layer")]
    )
    assert config["model_type"] == "faircalib-mdlm" and config["family"] == "mdlm"
    assert config["torch_dtype"] == "bfloat16"
    section = config["faircalib"]
    assert section["format_version"] == 2
    assert "input_scale" not in section and "act_bits" not in section
    assert section["writer"]["compressed_tensors"].startswith("0.20.")
    assert section["metadata"] == {"method": "rtn"}
    assert (out / "tokenizer.json").read_text() == "{}"
    assert hub.is_packed(out)
    assert isinstance(hub.load(out).get_submodule("blocks.0.attn_qkv"), QuantLinear)


def test_saving_the_fake_quant_model_writes_the_same_tensors(packed_dir, tmp_path):
    out, model, results = packed_dir
    again = save_packed_model(fake_quant_model(model, results), results, tmp_path / "fq")
    first = {k: v for shard in out.glob("*.safetensors") for k, v in load_file(shard).items()}
    second = {k: v for shard in again.glob("*.safetensors") for k, v in load_file(shard).items()}
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_float_tensors_and_bias_live_in_the_same_shards(packed_dir):
    out, model, results = packed_dir
    tensors = {}
    for shard in out.glob("*.safetensors"):
        tensors.update(load_file(shard))
    assert "vocab_embed.embedding" in tensors and "output_layer.linear.weight" in tensors
    assert "blocks.0.mlp.0.bias" in tensors and "blocks.0.mlp.0.weight" not in tensors
    assert not any(k.endswith("input_scale") for k in tensors)
    assert {t.dtype for k, t in tensors.items() if k.endswith("weight_scale")} == {torch.bfloat16}
    assert tensors["blocks.0.norm1.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["blocks.0.norm1.weight"].float(), model.blocks[0].norm1.weight)


# --- refusals ----------------------------------------------------------------------------------
def copy_dir(src, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def rewrite_shard(directory, edit):
    shard = next(directory.glob("*.safetensors"))
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.fixture
def no_layer_built(monkeypatch):
    """Fail the test if the loader builds any QuantLinear before refusing the directory."""
    calls = []
    original = QuantLinear.from_codes

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(packed_module.QuantLinear, "from_codes", spy)
    yield calls
    assert calls == []


QKV = "blocks.0.attn_qkv"


def truncate_shard(d):
    shard = next(d.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def shrink_hidden_size(d):
    edit_config(d, lambda c: c.update(hidden_dim=32))


def group_config(c, group="group_0"):
    return c["quantization_config"]["config_groups"][group]["weights"]


def change_group_size(d):
    edit_config(d, lambda c: group_config(c).update(group_size=64))  # group_0 is g32


def change_bits(d):
    edit_config(d, lambda c: group_config(c).update(num_bits=8))


def scale_as_int(d):
    rewrite_shard(d, lambda t: t.update({f"{QKV}.weight_scale": t[f"{QKV}.weight_scale"].int()}))


def packed_as_float(d):
    rewrite_shard(
        d, lambda t: t.update({f"{QKV}.weight_packed": t[f"{QKV}.weight_packed"].float()})
    )


def drop(name):
    return lambda d: rewrite_shard(d, lambda t: t.pop(name))


def add_stray_tensor(d):
    rewrite_shard(d, lambda t: t.update(stray=torch.ones(3)))


def nan_norm(d):
    rewrite_shard(d, lambda t: t["blocks.0.norm2.weight"].fill_(float("nan")))


def zero_scale(d):
    rewrite_shard(d, lambda t: t["blocks.0.attn_out.weight_scale"].zero_())


def unknown_target(d):
    edit_config(
        d,
        lambda c: c["quantization_config"]["config_groups"]["group_0"]["targets"].append(
            "blocks.7.attn_qkv"
        ),
    )


def act_bits_on_float_layer(d):
    edit_config(d, lambda c: c["faircalib"].update(act_bits={"output_layer.linear": 8}))


def other_format(d):
    edit_config(d, lambda c: c["quantization_config"].update(format="int-quantized"))


CORRUPTIONS = {  # name -> (corrupt the directory, regex the CheckpointError must match)
    "truncated shard": (truncate_shard, "safetensors"),
    "hidden size in config": (shrink_hidden_size, "shape|does not divide"),
    "group size in config": (change_group_size, "shape"),
    "bits in config": (change_bits, "shape"),
    "scale dtype": (scale_as_int, "dtype"),
    "packed dtype": (packed_as_float, "dtype"),
    "missing float tensor": (drop("blocks.0.norm1.weight"), "absent"),
    "missing zero point": (drop(f"{QKV}.weight_zero_point"), "absent"),
    "extra tensor": (add_stray_tensor, "unexpected"),
    "nan float": (nan_norm, "NaN"),
    "zero scale": (zero_scale, "non-positive"),
    "unknown target": (unknown_target, "lacks"),
    "act_bits on float layer": (act_bits_on_float_layer, "not quantized"),
    "not pack-quantized": (other_format, "not supported"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_or_mismatched_directories_are_refused(
    packed_dir, tmp_path, no_layer_built, corruption
):
    corrupt, message = CORRUPTIONS[corruption]
    directory = copy_dir(packed_dir[0], tmp_path)
    corrupt(directory)
    with pytest.raises(CheckpointError, match=message):
        load_packed_model(directory)


def test_save_refuses_bad_results_and_existing_directories(packed_dir, tmp_path):
    out, model, results = packed_dir
    with pytest.raises(CheckpointError, match="already exists"):
        save_packed_model(model, results, out)
    r = results["blocks.0.attn_qkv"]
    wrong_shape = SimpleNamespace(
        weight=r.weight[:, :32], codes=r.codes[:, :32], qparams=r.qparams, input_scale=None
    )
    with pytest.raises(ConfigError):
        save_packed_model(model, {"blocks.0.attn_qkv": wrong_shape}, tmp_path / "a")
    with pytest.raises(ConfigError, match="not a linear layer"):
        save_packed_model(model, {"blocks.0.norm1": r}, tmp_path / "b")
    with pytest.raises(ConfigError, match="not a module"):
        save_packed_model(model, {"blocks.9.attn_qkv": r}, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_save_refuses_smoothing_results_and_methods(packed_dir, tmp_path):
    """AWQ / SmoothQuant input scales (and per-token activation bits) are refused with one
    line naming the way out, by the writer and, before calibration, by the CLI's check."""
    out, model, results = packed_dir
    layer = "blocks.1.attn_out"
    with pytest.raises(ConfigError, match=r"blocks.1.attn_out's AWQ/SmoothQuant input_scale") as e:
        save_packed_model(model, {**results, layer: smoothed(results[layer])}, tmp_path / "a")
    assert "\n" not in str(e.value) and "--format fake" in str(e.value)
    act_only = SimpleNamespace(**{**vars(results[layer]), "act_bits": 8})
    with pytest.raises(ConfigError, match="per-token activation quantization"):
        save_packed_model(model, {**results, layer: act_only}, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for cfg in (AWQConfig(), SmoothQuantConfig(), SimpleNamespace(method="fair", base="awq")):
        with pytest.raises(ConfigError, match="--format fake"):
            check_packable_method(cfg)
    check_packable_method(SimpleNamespace(method="fair", base="gptq"))  # accepted
    check_packable_method(QuantConfig())


def test_save_refuses_scales_and_weights_that_would_not_match(packed_dir, tmp_path):
    """What was evaluated is what is stored: float32 scales in a bf16 checkpoint, or a
    fake-quant weight the codes do not reproduce, are refused, not silently re-encoded."""
    out, model, results = packed_dir
    layer = "blocks.0.attn_out"
    w = model.get_submodule(layer).weight.detach()
    fp32 = quantize_rtn(w, QuantConfig(bits=4, group_size=32))  # unrounded scales
    with pytest.raises(ConfigError, match="scale_dtype='bfloat16'"):
        save_packed_model(model, {**results, layer: fp32}, tmp_path / "a")
    # the same result is exact in a float32 checkpoint
    save_packed_model(model, {**results, layer: fp32}, tmp_path / "b", dtype=torch.float32)
    moved = copy.copy(results[layer])
    moved.weight = moved.weight.clone()
    moved.weight[0, 0] += 1e-3
    with pytest.raises(ConfigError, match="do not reproduce the fake-quant weight"):
        save_packed_model(model, {**results, layer: moved}, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_format_spec_sizes_match_the_packed_tensors():
    """benchmarks/e2e.py sizes checkpoints from `expected_specs`: it must agree with packing."""
    from faircalib.formats.packed import expected_specs

    size = {"int32": 4, "int": 8, "float": 2}  # scales in the default bf16
    for bits, group, sym in SCHEMES:
        codes, qp = quantized(48, 256, bits, group, sym)
        tensors = pack_layer(codes, qp)
        specs = expected_specs(48, 256, quantization_args(bits, group, sym))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {
            k: s for k, (s, _) in specs.items()
        }
        assert packed_nbytes(tensors) == sum(
            torch.Size(s).numel() * size[kind] for s, kind in specs.values()
        )


def test_packed_weight_bytes_reads_the_headers_of_a_saved_model(packed_dir):
    """The directory helper counts exactly the packed layers' weight tensors (no bias, no
    input_scale, no float tensors); this model's 4/8-bit mix packs to ~0.34x of bf16."""
    from faircalib.formats import packed_weight_bytes

    out, model, results = packed_dir
    expected = sum(packed_nbytes(pack_layer(r.codes, r.qparams)) for r in results.values())
    assert packed_weight_bytes(out) == expected
    bf16 = sum(2 * r.codes.numel() for r in results.values())
    assert 0.25 < expected / bf16 < 0.40


def test_packed_weight_bytes_refuses_a_float_directory(tmp_path):
    from faircalib.formats import packed_weight_bytes
    from faircalib.models import save_model

    save_model(tiny_model(), tmp_path / "float")
    with pytest.raises(CheckpointError, match="no packed layers"):
        packed_weight_bytes(tmp_path / "float")


def test_shipped_mdlm_tiny_packed_int4_g128_matches_fake_quant(tmp_path):
    """The shipped checkpoint, every block linear RTN int4 g128 asym, saved packed and loaded
    back through the hub: log-probs equal the fake-quant model's to 1e-4."""
    model = hub.load("mdlm-tiny")
    with torch.no_grad():  # bf16 parameter values: what the bf16 checkpoint holds
        for p in model.parameters():
            p.copy_(p.bfloat16())
    cfg = BF16Config(bits=4, group_size=128, symmetric=False)
    results = {
        f"blocks.{i}.{name}": quantize_rtn(linear.weight.detach().float(), cfg)
        for i, block in enumerate(model.blocks)
        for name, linear in model.quantizable_linears(block)
    }
    out = save_packed_model(model, results, tmp_path / "tiny-int4")
    loaded = hub.load(out)
    assert all(isinstance(loaded.get_submodule(name), QuantLinear) for name in results)
    reference = fake_quant_model(model, results)
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randint(0, model.vocab_size, (2, model.seq_len), generator=gen)
    x_t[torch.rand(x_t.shape, generator=gen) < 0.6] = model.mask_id
    with torch.no_grad():
        got, want = loaded.log_probs(x_t), reference.log_probs(x_t)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert float((got[finite] - want[finite]).abs().max()) <= 1e-4
