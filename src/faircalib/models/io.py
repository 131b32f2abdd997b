"""Model directories: config.json + safetensors shards (+ tokenizer.json), written atomically.

A directory is either complete or absent: we write into a temporary sibling and rename it
into place, so an interrupted save never leaves something that looks finished. Loading checks
every tensor's presence, shape, dtype and finiteness before any weight reaches the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from faircalib.errors import CheckpointError
from faircalib.models.base import DiffusionLM, read_json

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 15 * 2**20  # git- and transfer-friendly shards (< 16 MB)

FAMILIES: dict[str, Callable[[dict[str, Any]], DiffusionLM]] = {}
# upstream `model_type` -> family, for families whose native layout is upstream's own config
MODEL_TYPES: dict[str, str] = {}


def register_family(
    name: str, build: Callable[[dict[str, Any]], DiffusionLM], *, model_type: str | None = None
) -> None:
    """`model_type`: dispatch configs carrying this upstream `model_type` (and no `family`)."""
    FAMILIES[name] = build
    if model_type is not None:
        MODEL_TYPES[model_type] = name


def family_of(config: dict[str, Any]) -> str | None:
    """The registered family a config.json describes: its `family`, else its `model_type`'s."""
    if "family" in config:
        return config["family"]
    return MODEL_TYPES.get(config.get("model_type"))  # type: ignore[arg-type]


def build_model(config: dict[str, Any]) -> DiffusionLM:
    family = family_of(config)
    if family not in FAMILIES:
        raise CheckpointError(
            f"unknown model family {config.get('family', config.get('model_type'))!r}; "
            f"known: {sorted(FAMILIES)} (model types {sorted(MODEL_TYPES)})"
        )
    return FAMILIES[family](config)


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def save_tensors(
    tensors: dict[str, torch.Tensor], directory: Path, metadata: dict | None = None
) -> None:
    """Write `tensors` as shards of at most MAX_SHARD_BYTES plus an HF-style index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt", **(metadata or {})})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Read every tensor listed in the index (or a single model.safetensors)."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        weight_map: dict[str, str] = read_json(directory / INDEX).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").exists():
        weight_map, files = {}, ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory} has no {INDEX} or model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        path = directory / fname
        if not path.exists():
            raise CheckpointError(f"weight shard {path} listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    missing = set(weight_map) - set(tensors)
    if missing:
        raise CheckpointError(
            f"tensors listed in the index but absent from shards: {sorted(missing)[:5]}"
        )
    return tensors


def check_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse unless `tensors` matches `model` exactly in names and shapes and is finite."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source} does not match the model config: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, ref in expected.items():
        got = tensors[name]
        if got.shape != ref.shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(got.shape)}, config expects {tuple(ref.shape)}"
            )
        if not got.is_floating_point():
            raise CheckpointError(
                f"{source}: {name} has dtype {got.dtype}, expected a float tensor"
            )
        if not torch.isfinite(got).all():
            raise CheckpointError(f"{source}: {name} contains NaN or Inf values")


def save_model(
    model: DiffusionLM,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    extra_files: dict[str, Path | str | dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` to `out` atomically. `extra_files` maps names to source paths, text or JSON."""
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        write_json(
            tmp / CONFIG, {**model.config_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
        )
        tensors = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
        save_tensors(tensors, tmp)
        write_extra_files(tmp, extra_files)
    return Path(out)


def write_extra_files(directory: Path, extra_files: dict[str, Path | str | dict] | None) -> None:
    """Files beside the weights: a Path is copied, a dict written as JSON, a str as text."""
    for name, content in (extra_files or {}).items():
        if isinstance(content, dict):
            write_json(directory / name, content)
        elif isinstance(content, Path):
            shutil.copyfile(content, directory / name)
        else:
            (directory / name).write_text(content)


def load_model(
    directory: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> DiffusionLM:
    """Load a float model directory, validating everything before touching the model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a model directory")
    config = read_json(directory / CONFIG)
    model = build_model(config)
    tensors = load_tensors(directory)
    check_state_dict(model, tensors, str(directory))
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    return model.to(device).eval()
