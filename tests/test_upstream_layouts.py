"""Published-layout details a quantized copy must keep or refuse: the dtype of a config that
names none, a tensor stored twice, pickled-only weights, transformers 5's `dtype` key, and the
files beside the weights that stock readers use (tokenizer settings, remote-code modules)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from faircalib import hub
from faircalib.cli import main
from faircalib.errors import CheckpointError
from faircalib.models.io import load_tensors
from llama_like_ckpt import write_family

QUANTIZE = ["--method", "rtn", "--nsamples", "2", "--seq-len", "32", "--group-size", "32"]


def stored_dtypes(directory: Path) -> set[str]:
    found = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            found |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    return found


def drop_config_keys(directory: Path, *keys: str, **updates) -> None:
    config = json.loads((directory / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in keys} | updates
    (directory / "config.json").write_text(json.dumps(config))


def test_a_config_naming_no_dtype_keeps_its_shards_dtype(tmp_path, capsys):
    # LLaDA-8B-Instruct's published config.json has no torch_dtype; its shards are bf16
    src = write_family(tmp_path / "llada", "llada")
    drop_config_keys(src, "torch_dtype", "dtype")
    assert stored_dtypes(src) == {"BF16"}
    assert hub.resolve_dtype(src, "auto") == torch.bfloat16
    out = tmp_path / "q"
    assert main(["quantize", str(src), *QUANTIZE, "--format", "fake", "--out", str(out)]) == 0
    assert stored_dtypes(out) == {"BF16"}  # not a float32 copy twice the source's size
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_the_dtype_key_of_transformers_5_names_the_written_dtype(tmp_path):
    src = write_family(tmp_path / "llada", "llada")
    drop_config_keys(src, "torch_dtype", dtype="bfloat16")
    out = tmp_path / "q"
    argv = ["quantize", str(src), *QUANTIZE, "--format", "fake", "--dtype", "float32"]
    assert main([*argv, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert stored_dtypes(out) == {"F32"}
    assert (config["dtype"], config["torch_dtype"]) == ("float32", "float32")


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    src = write_family(tmp_path / "llada", "llada")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in set(index["weight_map"].values()) if s != shard)
    with safe_open(str(src / other), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(str(src / shard), "pt") as f:
        tensors[name] = torch.zeros_like(f.get_tensor(name))  # a second, different copy
    save_file(tensors, str(src / other))
    with pytest.raises(CheckpointError, match=f"{name} is stored in more than one shard"):
        load_tensors(src)


def test_pickled_only_weights_are_named_as_such_and_never_loaded(tmp_path, capsys):
    src = write_family(tmp_path / "llada", "llada")
    for path in src.glob("model*.safetensors*"):
        path.unlink()
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    assert main(["eval", str(src), "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only pickled weights (pytorch_model.bin)" in err[0]


def test_quantized_copies_keep_the_files_stock_readers_use(tmp_path, capsys):
    src = write_family(tmp_path / "dream", "dream")
    drop_config_keys(
        src, auto_map={"AutoConfig": "configuration_dream.DreamConfig",
                       "AutoModel": "modeling_dream.DreamModel"},
    )  # fmt: skip
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    (src / "generation_config.json").write_text(json.dumps({"max_length": 64}))
    # the module files are copied as bytes, never imported: these would raise if run
    for module in ("configuration_dream", "modeling_dream", "generation_utils"):
        (src / f"{module}.py").write_text("raise SystemExit('checkpoint code ran')\n")
    for fmt in ("fake", "packed"):
        out = tmp_path / fmt
        assert main(["quantize", str(src), *QUANTIZE, "--format", fmt, "--out", str(out)]) == 0
        for name in ("tokenizer_config.json", "generation_config.json", "generation_utils.py",
                     "configuration_dream.py", "modeling_dream.py", "tokenizer.json"):  # fmt: skip
            assert (out / name).read_bytes() == (src / name).read_bytes(), (fmt, name)
        assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"]
    capsys.readouterr()
    # a hub download holds no *.py: the copy is written, and the missing modules are named
    (src / "modeling_dream.py").unlink()
    out = tmp_path / "no-code"
    assert main(["quantize", str(src), *QUANTIZE, "--format", "fake", "--out", str(out)]) == 0
    assert "auto_map names modeling_dream.py, which it does not hold" in capsys.readouterr().err


def test_a_quantized_mdlm_owt_copy_carries_the_gpt2_tokenizer_it_loaded_with(tmp_path, capsys):
    from test_loaders import hf_config, hf_tensors, write_hf

    vocab = hub.GPT2_MASK_VOCAB  # mdlm-owt ships no tokenizer.json: GPT-2's tokens + [MASK]
    gen = torch.Generator().manual_seed(1)
    tensors = hf_tensors(0)
    for name in ("backbone.vocab_embed.embedding", "backbone.output_layer.linear.weight"):
        tensors[name] = torch.randn(vocab, tensors[name].shape[1], generator=gen) * 0.3
    tensors["backbone.output_layer.linear.bias"] = torch.zeros(vocab)
    src = write_hf(tmp_path / "owt", tensors, hf_config(vocab_size=vocab))
    out = tmp_path / "q"
    argv = ["quantize", str(src), "--method", "rtn", "--nsamples", "1", "--seq-len", "16"]
    assert main([*argv, "--group-size", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    written = json.loads((out / "tokenizer.json").read_text())
    assert written == json.loads(hub.load_tokenizer(src).to_str())
    assert main(["eval", str(out), "--seq-len", "16", "--limit", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 16
