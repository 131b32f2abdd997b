"""Resolve a model argument - a shipped name or a directory - and load it with its tokenizer.

This is where float, fake-quantized and packed model directories meet: `load` looks at the
directory's config and dispatches, so `eval`, `generate` and `quantize` accept any of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from faircalib.errors import CheckpointError
from faircalib.models import DiffusionLM
from faircalib.models.base import read_json

ASSETS = Path(__file__).parent / "assets"
SHIPPED_MODELS = ("mdlm-tiny", "mdlm-small")


# a Hugging Face repository id, "owner/name" (what is not a local directory and looks like one)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# weights, configs and tokenizer only: a checkpoint's remote code (modeling_*.py, auto_map) is
# never downloaded, let alone run; pickled weights (*.bin, *.pt) are not read either
HUB_FILES = ["*.json", "*.safetensors"]


def resolve(model: str | Path) -> Path:
    """A shipped model name, a path, or a Hugging Face repository id -> the model directory."""
    if str(model) in SHIPPED_MODELS:
        path = ASSETS / "models" / str(model)
        if not path.is_dir():
            raise CheckpointError(f"shipped model {model} is not installed at {path}")
        return path
    path = Path(model)
    if path.is_dir():
        return path
    if not path.exists() and HUB_ID.fullmatch(str(model)):
        return download(str(model))
    raise CheckpointError(
        f"{model} is neither a shipped model ({', '.join(SHIPPED_MODELS)}), a model directory "
        "nor a Hugging Face repository id (owner/name)"
    )


def download(repo_id: str) -> Path:
    """The local snapshot of hub repository `repo_id` (config, tokenizer, safetensors only)."""
    try:
        from huggingface_hub import snapshot_download  # only needed for hub ids

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated, disk full: one line either way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{repo_id} is not a local directory, and fetching it from the Hugging Face Hub "
            f"failed ({type(exc).__name__}: {reason}); download it where there is network access "
            "and pass the directory"
        ) from exc


def is_packed(directory: Path) -> bool:
    config = read_json(Path(directory) / "config.json")
    return config.get("quantization_config", {}).get("quant_method") == "compressed-tensors"


def load(
    model: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionLM:
    directory = resolve(model)
    if is_packed(directory):
        from faircalib.formats.packed import load_packed_model  # joins models and kernels

        return load_packed_model(directory, device=device, dtype=dtype)
    from faircalib.calib.fakequant_io import load_fake_quant  # re-applies activation quantization

    return load_fake_quant(directory, device=device, dtype=dtype)


def load_tokenizer(model: str | Path) -> Tokenizer:
    path = resolve(model) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path.parent} has no tokenizer.json")
    return Tokenizer.from_file(str(path))
