"""`faircalib quantize / eval / generate` end to end on tiny LLaDA- and Dream-layout checkpoints
(published layouts, random weights, a byte-level stand-in tokenizer saved beside them)."""

import json
from pathlib import Path

import pytest
import torch

from faircalib import hub
from faircalib.cli import main
from faircalib.kernels import QuantLinear
from faircalib.models.chat import chat_prompt, llada_chat
from llama_like_ckpt import MASK_ID, write_family

GROUP = 32
PREFIX = {"llada": "model.transformer.blocks", "dream": "model.layers"}
FIRST = {"llada": "q_proj", "dream": "self_attn.q_proj"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    return {f: write_family(root / f, f) for f in ("llada", "dream")}


def quantize(src: Path, out: Path, method: str, fmt: str, capsys) -> dict:
    args = ["quantize", str(src), "--method", method, "--nsamples", "4", "--seq-len", "32"]
    args += ["--group-size", str(GROUP), "--format", fmt, "--out", str(out), "--json"]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def eval_and_generate(directory: Path, capsys) -> None:
    """Both commands run on `directory` and give a finite bound and a fully written sample."""
    assert main(["eval", str(directory), "--seq-len", "64", "--limit", "2", "--json"]) == 0
    bound = json.loads(capsys.readouterr().out)
    assert bound["tokens"] == 128 and 1 < bound["ppl"] < float("inf")
    gen = ["generate", str(directory), "--prompt", "Hello", "--gen-length", "16", "--steps", "8"]
    assert main([*gen, "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"][0]
    prompt = hub.load_tokenizer(directory).encode("Hello").ids
    assert tokens[: len(prompt)] == prompt and len(tokens) == len(prompt) + 16
    assert MASK_ID not in tokens


def levels_per_group(weight: torch.Tensor) -> int:
    """Most distinct values in any (row, group of GROUP inputs): <= 16 on a 4-bit grid."""
    groups = weight.reshape(weight.shape[0], -1, GROUP)
    return max(len(g.unique()) for row in groups for g in row)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_fake_quant_rtn_gptq_then_eval_and_generate(sources, tmp_path, capsys, family):
    src = sources[family]
    float_model = hub.load(src)
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        summary = quantize(src, out, method, "fake", capsys)
        assert len(summary["layers"]) == 2 * 7
        assert summary["layers"][0]["layer"] == f"blocks.0.{FIRST[family]}"
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == json.loads((src / "config.json").read_text())["model_type"]
        model = hub.load(out)
        quantized = {
            f"{PREFIX[family]}.{i}.{n}"
            for i in range(2)
            for n, _ in model.quantizable_linears(model.blocks[i])
        }
        reference = float_model.state_dict()
        for name, value in model.state_dict().items():
            layer = name.rpartition(".")[0]
            if layer in quantized and name.endswith(".weight"):
                assert levels_per_group(value) <= 16 and not torch.equal(value, reference[name])
            else:  # embedding, norms, biases, output layer: untouched
                assert torch.equal(value, reference[name]), name
    eval_and_generate(out, capsys)  # the gptq directory


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_packed_rtn_gptq_load_with_upstream_names_then_eval_and_generate(
    sources, tmp_path, capsys, family
):
    src = sources[family]
    source_config = json.loads((src / "config.json").read_text())
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        quantize(src, out, method, "packed", capsys)
        config = json.loads((out / "config.json").read_text())
        for key in ("model_type", "architectures", "auto_map"):
            assert config[key] == source_config[key]
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert f"{PREFIX[family]}.1.{FIRST[family]}.weight_packed" in weight_map
        model = hub.load(out)
        layer = model.blocks[1].get_submodule(FIRST[family])
        assert isinstance(layer, QuantLinear)
        if method == "rtn":
            eval_and_generate(out, capsys)


@pytest.mark.parametrize(
    "family,sampler", [("llada", "low_confidence"), ("dream", "entropy"), ("dream", "topk_margin")]
)
def test_generate_flags_guidance_orders_and_chat(sources, capsys, family, sampler):
    src = sources[family]
    args = ["generate", str(src), "--prompt", "Hi", "--chat", "--gen-length", "8", "--steps", "4"]
    args += ["--sampler", sampler, "--cfg-scale", "1.5", "--json"]
    if sampler != "low_confidence":
        args += ["--alg-temp", "0.5", "--temperature", "0.7"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    prompt = hub.load_tokenizer(src).encode(chat_prompt(family, "Hi")).ids
    tokens = out["tokens"][0]
    assert tokens[: len(prompt)] == prompt and len(tokens) == len(prompt) + 8
    assert MASK_ID not in tokens and out["trace"]["sampler"] == sampler
    assert sum(len(step["positions"][0]) for step in out["trace"]["steps"]) == 8


def test_chat_templates_render_the_published_prompts(capsys):
    # LLaDA's own likelihood script feeds this rendering of one user turn
    assert llada_chat("Lily can run 12 kilometers per hour.") == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
        "Lily can run 12 kilometers per hour.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # LLaDA-8B-Instruct's tokenizer_config.json chat_template (Llama 3's), rendered by jinja2:
    # it trims the message, so surrounding whitespace must not reach the prompt
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Template(
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    )
    for message in ("What is 2+2?", "  What is 2+2?\n", "\tTwo lines\nof text \n\n"):
        published = template.render(
            messages=[{"role": "user", "content": message}],
            bos_token="<|startoftext|>",
            add_generation_prompt=True,
        )
        assert llada_chat(message) == published, repr(message)
    assert chat_prompt("dream", "Hi") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert main(["generate", "mdlm-tiny", "--prompt", "Hi", "--chat", "--gen-length", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no chat template" in err
