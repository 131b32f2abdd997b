"""Resolve a model argument - a shipped name or a directory - and load it with its tokenizer.

This is where float, fake-quantized and packed model directories meet: `load` looks at the
directory's config and dispatches, so `eval`, `generate` and `quantize` accept any of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from faircalib.errors import CheckpointError, ConfigError
from faircalib.models import DiffusionLM
from faircalib.models.base import REDO, read_json

ASSETS = Path(__file__).parent / "assets"
SHIPPED_MODELS = ("mdlm-tiny", "mdlm-small")


# a Hugging Face repository id, "owner/name" (what is not a local directory and looks like one)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# weights, configs and tokenizer only: a checkpoint's remote code (modeling_*.py, auto_map) is
# never downloaded, let alone run; pickled weights (*.bin, *.pt) are not read either
HUB_FILES = ["*.json", "*.safetensors"]
MAX_TOKENIZER_BYTES = 256 * 2**20  # published tokenizer.json files are 1-20 MB


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
        "nor a Hugging Face repository id (owner/name); check the name or path"
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
    qconfig = read_json(Path(directory) / "config.json").get("quantization_config")
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors"


def check_device(device: str) -> torch.device:
    """`device` parsed, refusing names torch does not know and devices this machine lacks."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
            "use cuda:0 .. cuda:N-1"
        )
    return parsed


def load(
    model: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionLM:
    check_device(device)
    directory = resolve(model)
    if is_packed(directory):
        from faircalib.formats.packed import load_packed_model  # joins models and kernels

        return load_packed_model(directory, device=device, dtype=dtype)
    from faircalib.calib.fakequant_io import load_fake_quant  # re-applies activation quantization

    return load_fake_quant(directory, device=device, dtype=dtype)


def load_tokenizer(model: str | Path) -> Tokenizer:
    path = resolve(model) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path.parent} has no tokenizer.json; copy the model's tokenizer.json into it"
        )
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise CheckpointError(
            f"{path} is {path.stat().st_size:,} bytes, over the {MAX_TOKENIZER_BYTES:,} a "
            f"tokenizer may be; {REDO}"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable tokenizer ({reason}); {REDO}") from exc
