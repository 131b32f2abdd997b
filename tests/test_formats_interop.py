"""Packed checkpoints in stock readers: transformers' compressed-tensors integration loads a
Llama-layout checkpoint we wrote, and the config passes vLLM's scheme-matching rules."""

import copy
import json
import re
from dataclasses import dataclass

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import is_match
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from faircalib.config import GPTQConfig, QuantConfig
from faircalib.formats import load_packed_model, unpack_layer
from faircalib.formats.packed import save_packed_model, write_packed
from faircalib.models import MDLM, LLaDA, MDLMConfig
from faircalib.models.io import load_tensors
from faircalib.quant import quantize_gptq, quantize_rtn
from faircalib.quant.primitives import dequantize
from faircalib.quant.stats import LayerInputs
from llama_like_ckpt import llada_config


@dataclass
class BF16RTN(QuantConfig):
    scale_dtype: str | None = "bfloat16"  # the hook calibration sets for packed export


@dataclass
class BF16GPTQ(GPTQConfig):
    scale_dtype: str | None = "bfloat16"


# --- vLLM's matching rules ---------------------------------------------------------------------
# Re-implemented from vllm-project/vllm, vllm/model_executor/layers/quantization/
# compressed_tensors/utils.py (should_ignore_layer, find_matched_target, _find_first_match,
# _is_equal_or_regex_match, _match_fused_layer) and compressed_tensors.py
# (CompressedTensorsConfig.get_scheme: `ignore` first, then one target per layer, looked up in a
# {target: scheme} dict built group after group). vLLM cannot run here.
LLAMA_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _equal_or_regex(value: str, target: str, check_contains: bool = False) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    if check_contains:
        return target.lower() in value.lower()
    return target == value


def vllm_should_ignore(layer: str, ignore: list[str], fused: dict[str, list[str]]) -> bool:
    proj = layer.split(".")[-1]
    if proj in fused and layer not in ignore:
        shards = {
            any(_equal_or_regex(layer.replace(proj, s), t) for t in ignore) for s in fused[proj]
        }
        if len(shards) > 1:  # vLLM: "Found a different quantization schemes for ..."
            raise AssertionError(f"{layer}: some of its shards are ignored, some not")
        return shards.pop()
    return any(_equal_or_regex(layer, t) for t in ignore)


def vllm_find_matched_target(
    layer: str, class_name: str, targets: list[str], fused: dict[str, list[str]]
) -> str | None:
    first = next((t for t in targets if _equal_or_regex(layer, t)), None)
    by_class = next((t for t in targets if _equal_or_regex(class_name, t, True)), None)
    return first or by_class or _vllm_match_fused(layer, targets, fused)


def _vllm_match_fused(layer: str, targets: list[str], fused: dict[str, list[str]]) -> str | None:
    key = next((k for k in fused if layer.endswith(k)), None)
    if key is None:
        return None
    shard_targets = [
        next((t for t in targets if _equal_or_regex(layer.replace(key, s), t)), None)
        for s in fused[key]
    ]
    return shard_targets[0] if all(shard_targets) else None


def vllm_layer_groups(
    qc: dict, layers: dict[str, str], fused: dict[str, list[str]]
) -> dict[str, str | None]:
    """Layer name -> the config group vLLM would quantize it with (None: ignored). Raises
    AssertionError where vLLM fails ("Unable to find matching target") and where it would
    silently pick one of several rules (a target in two groups, fused shards in two groups)."""
    group_of: dict[str, str] = {}
    for group, scheme in qc["config_groups"].items():
        for target in scheme["targets"]:
            assert target not in group_of, f"{target} is in {group_of[target]} and {group}"
            group_of[target] = group
    result = {}
    for layer, class_name in layers.items():
        if vllm_should_ignore(layer, qc["ignore"], fused):
            result[layer] = None
            continue
        target = vllm_find_matched_target(layer, class_name, list(group_of), fused)
        assert target is not None, f"Unable to find matching target for {layer}"
        result[layer] = group_of[target]
        _check_fused_shards_agree(layer, group_of, fused)
    return result


def _check_fused_shards_agree(layer: str, group_of: dict[str, str], fused: dict) -> None:
    """vLLM quantizes a fused layer with its first shard's scheme: all shards must share it."""
    key = next((k for k in fused if layer.endswith(k)), None)
    if key is not None:
        groups = {group_of.get(layer.replace(key, s)) for s in fused[key]}
        assert len(groups) == 1, f"{layer}: shards in different config groups {groups}"


def hf_linears(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def vllm_llama_linears(model: LlamaForCausalLM) -> dict[str, str]:
    """The LinearBase layers vLLM's Llama builds (q/k/v and gate/up fused). Its lm_head is a
    ParallelLMHead, not a LinearBase: vLLM never looks up a scheme for it."""
    classes = {"qkv_proj": "QKVParallelLinear", "gate_up_proj": "MergedColumnParallelLinear"}
    layers = {}
    for name in hf_linears(model):
        if name == "lm_head":
            continue
        prefix, _, proj = name.rpartition(".")
        fused = next((k for k, shards in LLAMA_FUSED.items() if proj in shards), proj)
        layers[f"{prefix}.{fused}"] = classes.get(fused, "RowParallelLinear")
    return layers


def test_the_vllm_rule_helper_catches_what_vllm_refuses():
    """The helper is a real check: an unlisted linear, a split fused layer and a target in
    two groups each fail it."""
    weights = {"num_bits": 4}
    qc = {"config_groups": {"g0": {"targets": ["a.q_proj", "a.k_proj"], "weights": weights}}}
    with pytest.raises(AssertionError, match="Unable to find matching target"):
        vllm_layer_groups({**qc, "ignore": []}, {"lm_head": "Linear"}, {})
    with pytest.raises(AssertionError, match="shards"):  # v_proj unquantized, q/k quantized
        vllm_layer_groups({**qc, "ignore": ["a.v_proj"]}, {"a.qkv_proj": "X"}, LLAMA_FUSED)
    two = {"g1": {"targets": ["a.q_proj"], "weights": weights}, **qc["config_groups"]}
    with pytest.raises(AssertionError, match="is in"):
        vllm_layer_groups({"config_groups": two, "ignore": []}, {}, {})
    assert vllm_layer_groups({**qc, "ignore": ["lm_head"]}, {"lm_head": "Linear"}, {}) == {
        "lm_head": None
    }


# --- a Llama-layout model ------------------------------------------------------------------------
def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped KV heads: k/v narrower than q
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )
    # built in bf16 the way from_pretrained builds it (rotary frequencies stay float32)
    return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def quantize_llama(model: LlamaForCausalLM, attn_cfg, mlp_cfg) -> dict:
    """Every decoder-layer linear: GPTQ (random calibration rows) or RTN per the config."""
    gen = torch.Generator().manual_seed(1)
    results = {}
    for name in hf_linears(model):
        if name == "lm_head":
            continue
        w = model.get_submodule(name).weight.detach().float()  # [out, in]
        cfg = attn_cfg if ".self_attn." in name else mlp_cfg
        if isinstance(cfg, GPTQConfig):
            rows = torch.randn(512, w.shape[1], generator=gen)
            results[name] = quantize_gptq(w, LayerInputs.from_rows(rows), cfg, name=name)
        else:
            results[name] = quantize_rtn(w, cfg, name=name)
    return results


def reference_llama(model: LlamaForCausalLM, results: dict) -> LlamaForCausalLM:
    """The float Llama with our fake-quant weights copied in (rounded to the model's bf16)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, r in results.items():
            ref.get_submodule(name).weight.copy_(r.weight)
    return ref


def assert_same_as_reference(loaded: nn.Module, model: nn.Module, results: dict) -> None:
    ref = reference_llama(model, results)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # first: the default path decompresses on the first forward
        got, want = loaded(ids).logits, ref(ids).logits
    for name in results:  # stock dequantization, in bf16, is our weight rounded to bf16
        assert torch.equal(loaded.get_submodule(name).weight, ref.get_submodule(name).weight)
    params = dict(loaded.named_parameters())
    for key, value in model.state_dict().items():
        if key.removesuffix(".weight") not in results:
            assert torch.equal(params[key], value), key
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def assert_our_reader_gives_the_codes(directory, results: dict) -> None:
    """Our own per-layer reader decodes exactly the codes, scales and weights we wrote."""
    qc = QuantizationConfig.model_validate(
        json.loads((directory / "config.json").read_text())["quantization_config"]
    )
    tensors = load_tensors(directory)
    for scheme in qc.config_groups.values():
        for name in scheme.targets:
            parts = {
                k.removeprefix(f"{name}."): v
                for k, v in tensors.items()
                if k.startswith(f"{name}.w")
            }
            codes, qp = unpack_layer(parts, scheme.weights)
            assert torch.equal(codes, results[name].codes)
            assert torch.equal(dequantize(codes, qp), results[name].weight)


@pytest.fixture(scope="module")
def llama_sym(tmp_path_factory):
    """W4 g32 GPTQ (dynamic groups: scales rounded as the sweep reaches them) on attention, W8
    per-channel RTN on the MLP: two config groups, symmetric (see the asym test for why)."""
    model = tiny_llama()
    results = quantize_llama(
        model,
        BF16GPTQ(bits=4, group_size=32, symmetric=True, act_order=False),
        BF16RTN(bits=8, group_size=None, symmetric=True),
    )
    out = tmp_path_factory.mktemp("llama") / "w4-w8-sym"
    write_packed(model, results, model.config.to_dict(), out)
    return out, model, results


def test_config_keeps_the_architecture_and_covers_every_linear(llama_sym):
    out, model, results = llama_sym
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert isinstance(AutoConfig.from_pretrained(out), LlamaConfig)
    qc = config["quantization_config"]
    assert qc["ignore"] == ["lm_head"]
    # every HF Linear: exactly one of {a target, ignored}, by vLLM's and compressed-tensors' rules
    hf = vllm_layer_groups(qc, hf_linears(model), {})
    assert {n for n, g in hf.items() if g is not None} == set(results)
    parsed = QuantizationConfig.model_validate(qc)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            rules = [t for s in parsed.config_groups.values() for t in s.targets]
            hits = [t for t in rules + parsed.ignore if is_match(name, module, t)]
            assert len(hits) == 1, (name, hits)
    # vLLM's fused layers: each matched once, its shards in one group; attention != MLP group
    fused = vllm_layer_groups(qc, vllm_llama_linears(model), LLAMA_FUSED)
    assert len(fused) == 8 and None not in fused.values()
    assert fused["model.layers.0.self_attn.qkv_proj"] != fused["model.layers.0.mlp.gate_up_proj"]


def test_transformers_loads_the_packed_llama_like_our_weights(llama_sym):
    """AutoModelForCausalLM's default compressed-tensors path (compressed modules, decompressed
    after loading), on a CPU: weights bit-identical, logits identical."""
    out, model, results = llama_sym
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert_same_as_reference(loaded, model, results)
    assert_our_reader_gives_the_codes(out, results)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # dequantize=True is meant
def test_transformers_dequantizes_an_asymmetric_llama_like_our_weights(tmp_path):
    """Asymmetric RTN W4 g32 with the dequantize-on-load path. (The default path cannot load
    asymmetric pack-quantized checkpoints with compressed-tensors 0.20.1: its meta-device
    `compress` leaves weight_zero_point unpacked, [out, G], while the checkpoint - as its own
    non-meta `compress` writes it - packs it to [out * bits / 32, G]: a size mismatch, for
    llm-compressor's checkpoints too, see vllm-project/llm-compressor#1618.)"""
    model = tiny_llama(seed=3)
    cfg = BF16RTN(bits=4, group_size=32, symmetric=False)
    results = quantize_llama(model, cfg, cfg)
    out = write_packed(model, results, model.config.to_dict(), tmp_path / "w4-asym")
    dequantize_on_load = CompressedTensorsConfig(dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=dequantize_on_load)
    assert_same_as_reference(loaded, model, results)
    assert_our_reader_gives_the_codes(out, results)


# --- our native family ---------------------------------------------------------------------------
def test_packed_mdlm_config_passes_vllm_rules_and_names_its_model_type(tmp_path):
    torch.manual_seed(0)
    model = MDLM(
        MDLMConfig(vocab_size=40, mask_id=39, seq_len=16, hidden_dim=64, n_blocks=2, n_heads=4)
    )
    results = {
        f"blocks.{i}.{name}": quantize_rtn(linear.weight.detach(), BF16RTN(bits=4, group_size=32))
        for i, block in enumerate(model.blocks)
        for name, linear in model.quantizable_linears(block)
    }
    out = save_packed_model(model, results, tmp_path / "mdlm")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "faircalib-mdlm" and config["family"] == "mdlm"
    groups = vllm_layer_groups(config["quantization_config"], hf_linears(model), {})
    assert {n for n, g in groups.items() if g is not None} == set(results)
    assert {n for n, g in groups.items() if g is None} == {
        "sigma_map.mlp.0",
        "sigma_map.mlp.2",
        "blocks.0.adaLN_modulation",
        "blocks.1.adaLN_modulation",
        "output_layer.linear",
        "output_layer.adaLN_modulation",
    }


def test_packed_llada_keeps_upstream_config_and_loads_back_exactly(tmp_path):
    """A LLaDA-layout model (upstream module names and config.json): the packed checkpoint
    keeps upstream's model_type / architectures / auto_map, ignores its output layer, and our
    loader reproduces the fake-quant model's log-probs exactly."""
    torch.manual_seed(0)
    model = LLaDA.from_config(llada_config()).eval()
    with torch.no_grad():  # bf16 values: the bf16 checkpoint holds the float tensors exactly
        for p in model.parameters():
            p.copy_(p.bfloat16())
    results = {
        f"{model.NAMES.blocks}.{i}.{name}": quantize_rtn(linear.weight.detach(), BF16RTN(4, 32))
        for i, block in enumerate(model.blocks)
        for name, linear in model.quantizable_linears(block)
    }
    out = save_packed_model(model, results, tmp_path / "llada")
    config = json.loads((out / "config.json").read_text())
    source = llada_config()
    for key in ("model_type", "architectures", "auto_map"):
        assert config[key] == source[key], key
    assert "family" not in config  # dispatched on upstream's model_type
    groups = vllm_layer_groups(config["quantization_config"], hf_linears(model), {})
    assert [n for n, g in groups.items() if g is None] == ["model.transformer.ff_out"]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, r in results.items():
            reference.get_submodule(name).weight.copy_(r.weight)
    x_t = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    x_t[:, ::3] = model.mask_id
    with torch.no_grad():
        assert torch.equal(load_packed_model(out).log_probs(x_t), reference.log_probs(x_t))


# --- W4A8 / W4AFP8 / W4A4 groups (pack-quantized weights, per-token input activations) ----------
# vLLM's choice for a group with input activations, re-implemented from vllm-project/vllm,
# vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py
# `_get_scheme_from_parts` / `_is_fp8_w4a8` / `_is_dynamic_token_w4a8_int` (2025-26): on Hopper
# any 4-bit symmetric group-wise weight with dynamic per-token 8-bit activations goes to
# CompressedTensorsW4A8Fp8 (it reads `weight_packed` and runs e4m3 activations whatever the
# group's activation type; it needs group size 128); the INT W4A8 scheme (CPU kernels) is
# reached only under an activation format (int-quantized), so a pack-quantized group elsewhere,
# and any INT4-activation group, fails.
def vllm_act_scheme(group: dict, top_format: str, hopper: bool) -> str:
    w, a = group["weights"], group["input_activations"]
    fp8_w4a8 = (
        w["num_bits"] == 4
        and a["num_bits"] == 8
        and w["strategy"] == "group"
        and a["strategy"] == "token"
        and w["symmetric"]
        and a["symmetric"]
        and not w["dynamic"]
        and a["dynamic"]
    )
    if hopper and fp8_w4a8:
        assert w["group_size"] == 128, "W4A8 kernels require group size 128"
        return "CompressedTensorsW4A8Fp8"
    act_format = (group.get("format") or top_format) in ("naive-quantized", "int-quantized")
    if act_format and w["num_bits"] == 4 and a["num_bits"] == 8 and w["symmetric"]:
        return "CompressedTensorsW4A8Int"
    raise AssertionError("No compressed-tensors compatible scheme was found.")


def w4_llama() -> LlamaForCausalLM:
    """A Llama whose linears all take 128-wide groups (hidden 128, MLP 256)."""
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )
    return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def w4_act_results(model: nn.Module, act: str, group: int | None, symmetric: bool) -> dict:
    from faircalib.formats.packed import PackedActLayer

    cfg = BF16RTN(bits=4, group_size=group, symmetric=symmetric)
    results = {}
    for name in hf_linears(model):
        if name != "lm_head":
            r = quantize_rtn(model.get_submodule(name).weight.detach().float(), cfg, name=name)
            results[name] = PackedActLayer(act, r.codes, r.qparams, r.weight)
    return results


def test_the_vllm_act_scheme_helper_refuses_what_vllm_refuses():
    w = {"num_bits": 4, "strategy": "group", "group_size": 128, "symmetric": True}
    a = {"num_bits": 8, "strategy": "token", "symmetric": True, "dynamic": True}
    group = {"weights": {**w, "dynamic": False}, "input_activations": a}
    assert vllm_act_scheme(group, "pack-quantized", hopper=True) == "CompressedTensorsW4A8Fp8"
    with pytest.raises(AssertionError, match="No compressed"):  # off Hopper, pack-quantized
        vllm_act_scheme(group, "pack-quantized", hopper=False)
    assert vllm_act_scheme(group, "int-quantized", hopper=False) == "CompressedTensorsW4A8Int"
    asym = {**group, "weights": {**group["weights"], "symmetric": False}}
    with pytest.raises(AssertionError, match="No compressed"):
        vllm_act_scheme(asym, "pack-quantized", hopper=True)
    int4 = {**group, "input_activations": {**a, "num_bits": 4}}
    with pytest.raises(AssertionError, match="No compressed"):
        vllm_act_scheme(int4, "int-quantized", hopper=True)


@pytest.mark.parametrize(
    ("act", "group", "symmetric", "hopper_scheme"),
    [
        ("int8", 128, True, "CompressedTensorsW4A8Fp8"),  # W4A8: Hopper runs it with e4m3 acts
        ("fp8", 128, True, "CompressedTensorsW4A8Fp8"),  # W4AFP8
        ("int4", None, False, None),  # W4A4: no vLLM scheme
    ],
)
def test_w4_activation_groups_pass_the_matching_rules_and_load_in_transformers(
    tmp_path, act, group, symmetric, hopper_scheme
):
    """Every linear in exactly one group or `ignore` (fused shards together) by vLLM's and
    compressed-tensors' rules; vLLM's scheme choice for the group; transformers'
    compressed-tensors loader decompresses our codes to our weights bit for bit and runs
    the model (with its own emulated activation quantization: logits close, not equal)."""
    model = w4_llama()
    results = w4_act_results(model, act, group, symmetric)
    out = write_packed(model, results, model.config.to_dict(), tmp_path / act)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    hf = vllm_layer_groups(qc, hf_linears(model), {})
    assert {n for n, g in hf.items() if g is not None} == set(results)
    fused = vllm_layer_groups(qc, vllm_llama_linears(model), LLAMA_FUSED)
    assert len(fused) == 8 and None not in fused.values()
    parsed = QuantizationConfig.model_validate(qc)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            rules = [t for s in parsed.config_groups.values() for t in s.targets]
            assert len([t for t in rules + parsed.ignore if is_match(name, module, t)]) == 1
    for scheme in qc["config_groups"].values():
        if hopper_scheme is None:
            with pytest.raises(AssertionError, match="No compressed"):
                vllm_act_scheme(scheme, qc["format"], hopper=True)
        else:
            assert vllm_act_scheme(scheme, qc["format"], hopper=True) == hopper_scheme
    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=not symmetric)
    )
    ref = reference_llama(model, results)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # first: the default path decompresses on the first forward
        got, want = loaded(ids).logits.float(), ref(ids).logits.float()
    for name in results:
        assert torch.equal(loaded.get_submodule(name).weight, ref.get_submodule(name).weight)
    assert float((got - want).abs().max() / want.abs().max()) < 0.1
    assert_our_reader_gives_the_codes(out, results)
