"""Resolve a model argument - a shipped name or a directory - and load it with its tokenizer.

This is where float, fake-quantized and packed model directories meet: `load` looks at the
directory's config and dispatches, so `eval`, `generate` and `quantize` accept any of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from faircalib.errors import CheckpointError
from faircalib.models import DiffusionLM
from faircalib.models.base import read_json

ASSETS = Path(__file__).parent / "assets"
SHIPPED_MODELS = ("mdlm-tiny", "mdlm-small")


def resolve(model: str | Path) -> Path:
    """A shipped model name or a path -> the model directory."""
    if str(model) in SHIPPED_MODELS:
        path = ASSETS / "models" / str(model)
        if not path.is_dir():
            raise CheckpointError(f"shipped model {model} is not installed at {path}")
        return path
    path = Path(model)
    if not path.is_dir():
        raise CheckpointError(
            f"{model} is neither a shipped model ({', '.join(SHIPPED_MODELS)}) nor a model directory"
        )
    return path


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
