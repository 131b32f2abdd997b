"""Loaders for public dLLM checkpoint layouts.

`mdlm-hf`: the Hugging Face layout of kuleshov-group's MDLM checkpoints (e.g. `mdlm-owt`):
config.json with `model_type: "mdlm"` and fields vocab_size, model_length, hidden_dim, cond_dim,
n_blocks, n_heads, dropout, time_conditioning; safetensors tensors named `backbone.<module>`,
where <module> is exactly our MDLM's module path (the DiT backbone: vocab_embed, sigma_map,
blocks.N.{norm1, attn_qkv, attn_out, norm2, mlp.0, mlp.2, adaLN_modulation}, output_layer).
The [MASK] token is the last id (GPT-2's 50,257 tokens + [MASK]). The original Lightning `.ckpt`
files are pickles and are not loaded here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from faircalib.errors import CheckpointError
from faircalib.models.base import read_json
from faircalib.models.io import check_state_dict, load_tensors, save_model
from faircalib.models.mdlm import MDLM, MDLMConfig

PREFIX = "backbone."
IGNORED = {"backbone.rotary_emb.inv_freq"}  # recomputed from the head size


def detect_format(directory: Path) -> str:
    config = read_json(Path(directory) / "config.json")
    if config.get("model_type") == "mdlm":
        return "mdlm-hf"
    if "family" in config:
        return "faircalib"
    raise CheckpointError(f"{directory}: config.json matches no known checkpoint layout")


def mdlm_hf_config(config: dict) -> MDLMConfig:
    required = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads")
    missing = [k for k in required if k not in config]
    if missing:
        raise CheckpointError(f"MDLM config.json lacks {missing}")
    return MDLMConfig(
        vocab_size=config["vocab_size"],
        mask_id=config["vocab_size"] - 1,
        seq_len=config["model_length"],
        hidden_dim=config["hidden_dim"],
        cond_dim=config["cond_dim"],
        n_blocks=config["n_blocks"],
        n_heads=config["n_heads"],
        dropout=0.0,
        time_conditioning=bool(config.get("time_conditioning", False)),
    )


def load_mdlm_hf(directory: Path, *, dtype: torch.dtype = torch.float32) -> MDLM:
    """Load an MDLM Hugging Face checkpoint directory; validates everything before loading."""
    directory = Path(directory)
    model = MDLM(mdlm_hf_config(read_json(directory / "config.json")))
    tensors = load_tensors(directory)
    foreign = sorted(k for k in tensors if not k.startswith(PREFIX) and k not in IGNORED)
    if foreign:
        raise CheckpointError(f"{directory}: tensors outside `backbone.`: {foreign[:5]}")
    state = {k[len(PREFIX) :]: v for k, v in tensors.items() if k not in IGNORED}
    check_state_dict(model, state, str(directory))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.eval()


def convert_mdlm_hf(src: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Rewrite an MDLM Hugging Face checkpoint in faircalib's native layout."""
    return save_model(load_mdlm_hf(src), out, overwrite=overwrite)
