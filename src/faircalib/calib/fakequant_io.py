"""Saving quantized models and loading fake-quant directories back.

A fake-quant directory is a plain float model directory (config.json + safetensors shards) whose
linear weights are the dequantized ones, so every float tool reads it. Weight-only layers fold
their input scale into the weights: (x / s) @ Wq.T == x @ (Wq / s).T. Layers that also quantize
activations (SmoothQuant W8A8) cannot fold s, because the per-token quantizer acts on x / s; they
keep Wq, and their input scales and activation bit widths go to `act_quant.safetensors` and
`act_quant.json`, which `load_fake_quant` re-applies.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from faircalib import atomic
from faircalib.calib.engine import FakeQuantLinear, QuantReport, _set_submodule, quant_results
from faircalib.errors import CheckpointError, ConfigError
from faircalib.models import load_model, save_model
from faircalib.models.base import REDO, DiffusionLM, read_json
from faircalib.models.io import read_safetensors

ACT_QUANT_JSON = "act_quant.json"
ACT_QUANT_TENSORS = "act_quant.safetensors"


@torch.no_grad()
def fold_fake_quant(model: DiffusionLM) -> dict[str, tuple[torch.Tensor, int]]:
    """Replace every FakeQuantLinear by a plain nn.Linear in place. Returns the layers that
    quantize activations: full name -> (input_scale [in], act_bits); their Linear holds Wq."""
    act_layers: dict[str, tuple[torch.Tensor, int]] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, FakeQuantLinear):
            continue
        weight = module.weight
        if module.act_bits is not None:
            scale = module.input_scale
            if scale is None:
                scale = torch.ones(module.in_features, device=weight.device)
            act_layers[name] = (scale.detach().float().cpu(), module.act_bits)
        elif module.input_scale is not None:
            weight = weight / module.input_scale  # [out, in] / [in]
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        _set_submodule(model, name, linear.to(weight.device))
    return act_layers


def save_quantized(
    model: DiffusionLM,
    report: QuantReport | dict[str, Any],
    out: Path,
    tokenizer_path: Path | None,
    overwrite: bool = False,
    *,
    fmt: str = "fake",
    record: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    extra_files: dict[str, Path | str | dict] | None = None,
) -> Path:
    """Write a quantized model atomically: 'fake' (float directory, see the module docstring) or
    'packed' (compressed-tensors via faircalib.formats.packed). quantization.json holds the
    report (method and calibration configs, per-layer table, timings) plus `record`.
    dtype: the fake-quant weights' dtype (the source model's keeps the directory no larger than
    the source; float32 keeps the dequantized weights exact). `extra_files`: more files beside
    the weights (recipe.json). The directory is readable by others (0755 / 0644 under umask 022)."""
    report_dict = report.to_dict() if isinstance(report, QuantReport) else dict(report)
    extra: dict[str, Path | str | dict] = {
        **(extra_files or {}),
        "quantization.json": {**(record or {}), "format": fmt, **report_dict},
    }
    if tokenizer_path is not None:
        extra["tokenizer.json"] = Path(tokenizer_path)
    model.cpu()
    if fmt == "packed":
        from faircalib.formats.packed import save_packed_model

        results = quant_results(model)
        # non-quantized tensors (embeddings, norms, output layer) in bf16: the deployed size
        path = save_packed_model(
            model, results, Path(out), dtype=torch.bfloat16, extra_files=extra, overwrite=overwrite
        )
        return atomic.share(path)
    if fmt != "fake":
        raise ConfigError(f"unknown output format {fmt!r}; use 'fake' or 'packed'")
    act_layers = fold_fake_quant(model)
    with tempfile.TemporaryDirectory() as tmp:
        if act_layers:
            tensors = {f"{name}.input_scale": s for name, (s, _) in act_layers.items()}
            save_file(tensors, str(Path(tmp) / ACT_QUANT_TENSORS))
            extra[ACT_QUANT_TENSORS] = Path(tmp) / ACT_QUANT_TENSORS
            extra[ACT_QUANT_JSON] = {
                "layers": {n: {"act_bits": b} for n, (_, b) in act_layers.items()}
            }
        path = save_model(model, Path(out), dtype=dtype, extra_files=extra, overwrite=overwrite)
        return atomic.share(path)


def load_fake_quant(
    directory: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionLM:
    """Load a float or fake-quant model directory; layers listed in act_quant.json become
    FakeQuantLinear modules with their input scale and per-token activation quantization."""
    directory = Path(directory)
    model = load_model(directory, device="cpu", dtype=dtype)
    meta_path = directory / ACT_QUANT_JSON
    if meta_path.exists():
        apply_act_quant(model, read_json(meta_path), directory / ACT_QUANT_TENSORS)
    return model.to(device).eval()


@torch.no_grad()
def apply_act_quant(model: DiffusionLM, meta: dict[str, Any], tensors_path: Path) -> None:
    if not tensors_path.exists():
        raise CheckpointError(
            f"{tensors_path.parent} lists act-quant layers but has no {tensors_path.name}; {REDO}"
        )
    scales = read_safetensors(tensors_path)
    modules = dict(model.named_modules())
    layers = meta.get("layers", {})
    if not isinstance(layers, dict):
        raise CheckpointError(
            f"{tensors_path.parent}/{ACT_QUANT_JSON}: layers must be an object; {REDO}"
        )
    for name, spec in layers.items():
        bits = spec.get("act_bits") if isinstance(spec, dict) else None
        if type(bits) is not int or not 2 <= bits <= 16:
            raise CheckpointError(
                f"{tensors_path.parent}/{ACT_QUANT_JSON}: act_bits of {name} must be an integer "
                f"in 2..16, got {bits!r}; {REDO}"
            )
        linear = modules.get(name)
        scale = scales.get(f"{name}.input_scale")
        if not isinstance(linear, nn.Linear) or scale is None:
            raise CheckpointError(
                f"{tensors_path}: act-quant layer {name} is missing or not a linear; {REDO}"
            )
        if scale.shape != (linear.in_features,) or not torch.isfinite(scale).all():
            raise CheckpointError(
                f"{tensors_path}: bad input scale for {name}: {tuple(scale.shape)}; {REDO}"
            )
        fq = FakeQuantLinear(linear.weight, linear.bias, scale.to(linear.weight.dtype), bits)
        _set_submodule(model, name, fq)
