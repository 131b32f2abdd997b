"""Tiny random LLaDA and Dream checkpoints in exactly the published layouts (sharded bf16
safetensors with an index, config.json, tokenizer.json), for the tests.

Tensor names and shapes are written out here from upstream's modeling code (LLaDA's
`modeling_llada.py`, Dream's `modeling_dream.py`), not derived from faircalib's modules.
Config fields are the published configs' fields with tiny sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOS = "<|endoftext|>"
LLADA_MASK, DREAM_MASK = "<|mdm_mask|>", "<|mask|>"
BYTE_VOCAB = 256  # byte-level stand-in tokenizer: ids 0-255 are bytes, then EOS, then MASK
MASK_ID = BYTE_VOCAB + 1
ROWS = 264  # embedding rows, padded beyond the tokenizer as the real checkpoints are
D, LAYERS, HEADS, KV_HEADS, FFN, SEQ = 64, 2, 4, 2, 128, 192


def llada_config(**overrides) -> dict:
    """Field set of GSAI-ML/LLaDA-8B-Base's config.json, with tiny sizes."""
    config = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": D,
        "embedding_dropout": 0.0,
        "embedding_size": ROWS,
        "eos_token_id": BYTE_VOCAB,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": MASK_ID,
        "max_sequence_length": SEQ,
        "mlp_hidden_size": FFN,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": HEADS,
        "n_kv_heads": KV_HEADS,
        "n_layers": LAYERS,
        "pad_token_id": BYTE_VOCAB,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": ROWS,
        "weight_tying": False,
    }
    return {**config, **overrides}


def dream_config(**overrides) -> dict:
    """Field set of Dream-org/Dream-v0-Base-7B's config.json, with tiny sizes."""
    config = {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": BYTE_VOCAB,
        "eos_token_id": BYTE_VOCAB,
        "hidden_act": "silu",
        "hidden_size": D,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "mask_token_id": MASK_ID,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "model_type": "Dream",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": BYTE_VOCAB,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": ROWS,
    }
    return {**config, **overrides}


def _normal(gen: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _norm(gen: torch.Generator, dim: int) -> torch.Tensor:
    return 1 + _normal(gen, dim)  # away from 1 so the scale is exercised


def llada_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, hd = config["d_model"], config["d_model"] // config["n_heads"]
    kv, ffn, rows = config["n_kv_heads"] * hd, config["mlp_hidden_size"], config["embedding_size"]
    t = {"model.transformer.wte.weight": _normal(g, rows, d, scale=1.0)}
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        t[p + "attn_norm.weight"] = _norm(g, d)
        t[p + "q_proj.weight"] = _normal(g, d, d)
        t[p + "k_proj.weight"] = _normal(g, kv, d)
        t[p + "v_proj.weight"] = _normal(g, kv, d)
        if config["include_qkv_bias"]:
            for name, n in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
                t[p + f"{name}.bias"] = _normal(g, n)
        t[p + "attn_out.weight"] = _normal(g, d, d)
        t[p + "ff_norm.weight"] = _norm(g, d)
        t[p + "ff_proj.weight"] = _normal(g, ffn, d)
        t[p + "up_proj.weight"] = _normal(g, ffn, d)
        t[p + "ff_out.weight"] = _normal(g, d, ffn)
    t["model.transformer.ln_f.weight"] = _norm(g, d)
    if not config["weight_tying"]:
        t["model.transformer.ff_out.weight"] = _normal(g, rows, d, scale=0.3)
    return {k: v.to(torch.bfloat16) for k, v in t.items()}


def dream_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, hd = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"]
    kv, ffn, rows = (
        config["num_key_value_heads"] * hd,
        config["intermediate_size"],
        config["vocab_size"],
    )
    t = {"model.embed_tokens.weight": _normal(g, rows, d, scale=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _norm(g, d)
        for name, n in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
            t[p + f"self_attn.{name}.weight"] = _normal(g, n, d)
            t[p + f"self_attn.{name}.bias"] = _normal(g, n)
        t[p + "self_attn.o_proj.weight"] = _normal(g, d, d)
        t[p + "post_attention_layernorm.weight"] = _norm(g, d)
        t[p + "mlp.gate_proj.weight"] = _normal(g, ffn, d)
        t[p + "mlp.up_proj.weight"] = _normal(g, ffn, d)
        t[p + "mlp.down_proj.weight"] = _normal(g, d, ffn)
    t["model.norm.weight"] = _norm(g, d)
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = _normal(g, rows, d, scale=0.3)
    return {k: v.to(torch.bfloat16) for k, v in t.items()}


def write_checkpoint(
    directory: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 2
) -> Path:
    """Upstream's layout: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def byte_tokenizer(mask_token: str) -> Tokenizer:
    """Stand-in for the real tokenizers (not available offline): byte-level, no merges, so any
    text encodes; EOS = 256 and the family's mask token = 257, inside the model's rows."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, mask_token])
    assert tok.token_to_id(mask_token) == MASK_ID
    return tok


def write_family(directory: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A complete tiny checkpoint directory of `family` ('llada' or 'dream')."""
    if family == "llada":
        config = llada_config(**overrides)
        tensors, mask = llada_tensors(config, seed), LLADA_MASK
    else:
        config = dream_config(**overrides)
        tensors, mask = dream_tensors(config, seed), DREAM_MASK
    write_checkpoint(directory, config, tensors)
    byte_tokenizer(mask).save(str(directory / "tokenizer.json"))
    return directory
