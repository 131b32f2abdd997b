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


def write_slow_tokenizer(directory: Path, tokenizer_class: str, specials: list[str], **files):
    """vocab.json + merges.txt + tokenizer_config.json as Qwen2 / Dream repositories ship them:
    the byte alphabet and a few merges, the special tokens as `added_tokens_decoder`."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    added = {
        str(len(vocab) + i): {"content": tok, "special": True, "normalized": False}
        for i, tok in enumerate(specials)
    }
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges)
    )
    config = {"tokenizer_class": tokenizer_class, "added_tokens_decoder": added, **files}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def test_a_slow_only_tokenizer_is_rebuilt_as_transformers_converts_it(tmp_path):
    # Qwen2's vocab.json + merges.txt (Dream's DreamTokenizer is Qwen2's): the rebuilt fast
    # tokenizer gives transformers' own ids on text its regex and NFC normalisation touch
    transformers = pytest.importorskip("transformers")
    write_slow_tokenizer(tmp_path, "Qwen2Tokenizer", ["<|endoftext|>", "<|im_start|>", "<|mask|>"])
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = hub._slow_tokenizer(tmp_path)
    texts = [
        "Then the heat in the attic, I'm sure you'LL see: 12345 + 678.",
        "def f(x):\n\treturn  x**2\r\n\n\n   trailing   ",
        "日本語のテキスト、中文。 emoji 👩‍👩‍👧, Cafe\u0301 a\u00a0b",
        "<|im_start|>user\nthe<|mask|><|mask|> in<|endoftext|>",
    ]
    for text in texts:
        assert ours.encode(text).ids == reference.encode(text, add_special_tokens=False), text
        ids = ours.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids), text


def test_a_dream_download_without_tokenizer_json_runs_end_to_end(tmp_path, capsys):
    # Dream-org's repositories ship vocab.json + merges.txt and a remote-code DreamTokenizer,
    # no tokenizer.json: faircalib rebuilds it (never running tokenization_dream.py) and
    # writes it into the quantized copy, beside the slow files
    src = write_family(tmp_path / "dream", "dream")
    (src / "tokenizer.json").unlink()
    (src / "tokenization_dream.py").write_text("raise SystemExit('checkpoint code ran')\n")
    n_vocab = write_slow_tokenizer(
        src, "DreamTokenizer", ["<|endoftext|>", "<|mask|>"],
        auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
    )  # fmt: skip
    drop_config_keys(src, mask_token_id=n_vocab + 1)  # where the rebuilt tokenizer puts it
    tok = hub.load_tokenizer(src)
    assert tok.token_to_id("<|mask|>") == n_vocab + 1 and tok.encode(" the").ids == [n_vocab - 3]
    out = tmp_path / "q"
    argv = ["quantize", str(src), *QUANTIZE, "--format", "packed", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(tok.to_str())
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenization_dream.py"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    capsys.readouterr()
    assert main(["eval", str(out), "--seq-len", "32", "--limit", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 32


def test_an_unknown_slow_tokenizer_class_is_refused_in_one_line(tmp_path):
    src = write_family(tmp_path / "dream", "dream")
    (src / "tokenizer.json").unlink()
    write_slow_tokenizer(src, "LlamaTokenizer", ["<|endoftext|>", "<|mask|>"])
    with pytest.raises(CheckpointError, match="tokenizer_class 'LlamaTokenizer' is not one"):
        hub.load_tokenizer(src)


def test_packed_output_says_its_unquantized_tensors_are_bfloat16(tmp_path, capsys):
    # --dtype sets fake-quant weights; a packed copy stores embeddings, norms and the output
    # layer in bf16 (as stock readers deploy them): said, and recorded as what was written
    src = write_family(tmp_path / "dream", "dream")
    out = tmp_path / "q"
    argv = ["quantize", str(src), *QUANTIZE, "--format", "packed", "--dtype", "float16"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "--dtype float16 sets --format fake's weights" in capsys.readouterr().err
    assert json.loads((out / "recipe.json").read_text())["args"]["dtype"] == "bfloat16"
    assert json.loads((out / "quantization.json").read_text())["dtype"] == "bfloat16"
    assert "F16" not in stored_dtypes(out) and "BF16" in stored_dtypes(out)
