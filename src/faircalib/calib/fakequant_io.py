"""Saving quantized models and loading fake-quant directories back.

A fake-quant directory is a plain float model directory (config.json + safetensors shards) whose
linear weights are the dequantized ones, so every float tool reads it. Weight-only layers fold
their input scale into the weights: (x / s) @ Wq.T == x @ (Wq / s).T. Layers that also quantize
activations (SmoothQuant W8A8) cannot fold s, because the per-token quantizer acts on x / s; they
keep Wq, and their input scales and activation bit widths go to `act_quant.safetensors` and
`act_quant.json`, which `load_fake_quant` re-applies.

Activation-quantized layers (`calib.activations.ActQuantLinear`: `quantize --scheme`) carry
more state than a weight: the fake-quantized weight in the transformed basis, bias, SmoothQuant
divisors, a static activation scale, a Hadamard rotation (signs, block size), a learned
transform (P1, P2, smoothing) and the activation quantizer's config. Their tensors go, exactly
as held in memory, to `act_linears.safetensors`; their configs to quantization.json's
`activation_quant` object; `load_fake_quant` rebuilds the modules from both (no pickle). The
float directory itself holds, for those layers, the weight-only equivalent W_q T^T (T the
online transform, computed in float64), so float tools read a weight-quantized model.

Format 'packed' takes ActQuantLinear layers whose math a compressed-tensors group describes (no
online transform, dynamic per-token INT8 / FP8 / INT4 activations, weights on the scheme's grid):
8-bit weights become `formats.packed.W8A8Layer`s, INT4 ones (W4A8, W4AFP8, W4A4)
`formats.packed.PackedActLayer`s on the grid the run's report names (`w8a8_results`);
`packed_act_config` calibrates for that form.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
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
ACT_LINEARS = "act_linears.safetensors"  # ActQuantLinear state (`activation_quant` in the record)
ACT_LINEARS_VERSION = 1
# version 2: a layer may list `transform_shift` and `offset` (an input shift,
# FlatQuantConfig.shift, and its share of the output); written only when one does, so readers
# of version 1 refuse such a file instead of dropping the shift
_SHIFT_TENSORS = ("transform_shift", "offset")
ACT_LINEARS_SHIFT_VERSION = 2
QUANTIZATION_JSON = "quantization.json"
# ActQuantLinear state tensor suffixes -> where they live on the module
_ACT_TENSORS = ("weight", "bias", "smooth", "act_scale", "offset")
_ROT_TENSORS = ("rotation_signs",)
_TF_TENSORS = ("transform_p1", "transform_p2", "transform_smooth", "transform_shift")


def _effective_weight(module, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q L^T [out, in], T(0) W_q^T [out]) in float64, T(x) = L x + T(0) the module's online
    input map (affine: a learned transform may shift its input first), so x @ W.T + origin ==
    transform_input(x) @ weight.T without activation quantization."""
    w = module.weight.detach().double()
    n = module.in_features
    origin = module.transform_input(torch.zeros(1, n, dtype=torch.float64, device=w.device))
    cols = []
    for i in range(0, n, chunk):
        c = min(chunk, n - i)
        eye = torch.zeros(c, n, dtype=torch.float64, device=w.device)
        eye[torch.arange(c), torch.arange(i, i + c)] = 1.0
        cols.append(w @ (module.transform_input(eye) - origin).T)  # [out, c]
    return torch.cat(cols, dim=1), (origin @ w.T)[0]


@torch.no_grad()
def fold_act_linears(model: DiffusionLM) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Replace every ActQuantLinear by an nn.Linear holding its weight-only equivalent, in
    place. Returns the modules' exact state: tensors (name.suffix -> tensor) and the JSON
    object quantization.json records as `activation_quant`."""
    from faircalib.calib.activations import ActQuantLinear

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, ActQuantLinear):
            continue
        state = {k: getattr(module, k) for k in _ACT_TENSORS}
        if module.rotation is not None:
            state["rotation_signs"] = module.rotation.signs
        if module.transform is not None:
            tf = module.transform
            state.update(transform_p1=tf.p1, transform_p2=tf.p2, transform_smooth=tf.smooth)
            state["transform_shift"] = tf.shift
        for key, value in state.items():
            if value is not None:
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous().clone()
        layers[name] = {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "act": None if module.act is None else module.act.to_dict(),
            "rotation_block": None if module.rotation is None else module.rotation.block,
            "tensors": sorted(k for k, v in state.items() if v is not None),
        }
        weight = module.weight
        effective, origin = _effective_weight(module)
        # a shift's two terms, z W^T (offset) - T(z) W_q^T (origin), i.e. z (W - W_eff)^T: the
        # weight error's effect on the shift; a layer without a bias of its own cannot carry
        # it, so its plain-reader weight is W_eff alone (docs/activation-quant.md)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear = linear.to(device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(effective.to(weight.dtype))
        if module.bias is not None:
            bias = module.bias.double() + origin
            if module.offset is not None:
                bias = bias + module.offset.double()
            linear.bias.copy_(bias.to(weight.dtype))
        _set_submodule(model, name, linear)
    shifted = any(set(_SHIFT_TENSORS) & set(layer["tensors"]) for layer in layers.values())
    version = ACT_LINEARS_SHIFT_VERSION if shifted else ACT_LINEARS_VERSION
    meta = {"version": version, "tensors": ACT_LINEARS, "layers": layers}
    return tensors, meta


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
    tokenizer: Path | str | None,
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
        QUANTIZATION_JSON: {**(record or {}), "format": fmt, **report_dict},
    }
    if tokenizer is not None:  # a tokenizer.json to copy, or its JSON text to write
        extra["tokenizer.json"] = tokenizer if isinstance(tokenizer, str) else Path(tokenizer)
    # W8A8 grids are recovered where the weights are (a GPU fits them in seconds, not minutes)
    w8a8 = w8a8_results(model, report_dict) if fmt == "packed" else {}
    model.cpu()
    if fmt == "packed":
        from faircalib.formats.packed import save_packed_model

        results = {**quant_results(model), **w8a8}
        # non-quantized tensors (embeddings, norms, output layer) in bf16: the deployed size
        path = save_packed_model(
            model, results, Path(out), dtype=torch.bfloat16, extra_files=extra, overwrite=overwrite
        )
        return atomic.share(path)
    if fmt != "fake":
        raise ConfigError(f"unknown output format {fmt!r}; use 'fake' or 'packed'")
    act_tensors, act_meta = fold_act_linears(model)
    act_layers = fold_fake_quant(model)
    with tempfile.TemporaryDirectory() as tmp:
        if act_tensors:
            save_file(act_tensors, str(Path(tmp) / ACT_LINEARS))
            extra[ACT_LINEARS] = Path(tmp) / ACT_LINEARS
            extra[QUANTIZATION_JSON] = {**extra[QUANTIZATION_JSON], "activation_quant": act_meta}
        if act_layers:
            tensors = {f"{name}.input_scale": s for name, (s, _) in act_layers.items()}
            save_file(tensors, str(Path(tmp) / ACT_QUANT_TENSORS))
            extra[ACT_QUANT_TENSORS] = Path(tmp) / ACT_QUANT_TENSORS
            extra[ACT_QUANT_JSON] = {
                "layers": {n: {"act_bits": b} for n, (_, b) in act_layers.items()}
            }
        path = save_model(model, Path(out), dtype=dtype, extra_files=extra, overwrite=overwrite)
        return atomic.share(path)


def w8a8_results(model: nn.Module, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every ActQuantLinear of `model` as the layer the packed writer takes: a
    `formats.packed.W8A8Layer` (8-bit weights), or a `PackedActLayer` (INT2-7 weights: W4A8,
    W4AFP8, W4A4) on the weight grid the run's `report` names (its scheme, and a layer row's
    own group size where it differs). Only what a stock reader computes has that form: no
    online transform, no static or clipped activation scale, dynamic per-token activations and
    a weight on the grid. Anything else: ConfigError, one line."""
    from faircalib.calib.activations import ActQuantLinear

    grids = _module_keyed(model, _int_weight_grids(report))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ActQuantLinear):
            kind = _w8a8_kind(name, module)
            out[name] = _packed_act_layer(name, module, kind, grids.get(name))
    return out


def _int_weight_grids(report: dict[str, Any] | None) -> dict[str, tuple[int, int | None, bool]]:
    """Layer -> (bits, group size, symmetric) of a report whose scheme has INT weights of fewer
    than 8 bits ({} otherwise: W8A8's grids are recovered from the weights alone)."""
    from faircalib.calib.activations import SCHEMES

    scheme = SCHEMES.get(((report or {}).get("method") or {}).get("scheme"))
    if scheme is None or scheme.w_fmt != "int" or not scheme.w_bits or scheme.w_bits >= 8:
        return {}
    return {
        row["layer"]: (scheme.w_bits, row.get("group_size", scheme.w_group), scheme.w_symmetric)
        for row in report.get("layers", [])
    }


def _module_keyed(model: nn.Module, by_layer: dict[str, Any]) -> dict[str, Any]:
    """`by_layer` (keyed by the report's layer names, `<stack>.<i>.<name in block>`) keyed by
    module path instead: the two differ where the blocks do not sit at the model's top level
    (LLaDA's `model.transformer.blocks.<i>`, Dream's `model.layers.<i>`)."""
    if not by_layer:
        return {}
    path_of = {id(m): n for n, m in model.named_modules()}
    out = {}
    for prefix, block in model.named_calib_blocks():
        for name, _ in type(model).quantizable_linears(model, block):
            if f"{prefix}.{name}" in by_layer:
                out[f"{path_of[id(block)]}.{name}"] = by_layer[f"{prefix}.{name}"]
    return out


def _packed_act_layer(
    name: str, module: Any, kind: str, grid: tuple[int, int | None, bool] | None
) -> Any:
    """One ActQuantLinear as a W8A8Layer (no grid) or a PackedActLayer on `grid`."""
    from faircalib.formats.packed import packed_act_layer_from_weight, w8a8_layer_from_weight

    if grid is not None:
        layer = packed_act_layer_from_weight(kind, module.weight, *grid)
        if layer is None:
            bits, group, sym = grid
            raise ConfigError(
                f"--format packed cannot store {name}: its weight is not on the "
                f"{'symmetric' if sym else 'asymmetric'} INT{bits} "
                f"{'per-channel' if group is None else f'g{group}'} grid with bf16 scales "
                "(quantize with --format packed or auto); use --format fake"
            )
        return layer
    if kind == "int4":
        raise ConfigError(
            f"--format packed cannot store {name}: INT4 activations with 8-bit weights have no "
            "packed form; use --format fake"
        )
    layer = w8a8_layer_from_weight(kind, module.weight)
    if layer is None:
        what = "symmetric INT8" if kind == "int8" else "FP8 e4m3"
        raise ConfigError(
            f"--format packed cannot store {name}: its weight is not on a {what} "
            "per-channel grid (W8A8 packed export calibrates symmetric weights: "
            "quantize with --format packed or auto); use --format fake"
        )
    return layer


def _w8a8_kind(name: str, module: Any) -> str:
    """int8 / fp8 / int4: the per-token activation kind of an ActQuantLinear that a packed
    group can describe, or the reason it has none."""
    act = module.act
    transforms = [
        label
        for label, value in (
            ("SmoothQuant divisors", module.smooth),
            ("a Hadamard rotation", module.rotation),
            ("a learned transform", module.transform),
        )
        if value is not None
    ]
    if transforms:
        why = f"its input runs through {transforms[0]}, which no stock reader applies"
    elif act is None or act.fmt is None:
        why = "it leaves activations in float"
    elif module.act_scale is not None or act.granularity != "token":
        why = "its static per-tensor activation scale is not dynamic per-token W8A8"
    elif act.clip_ratio != 1.0:
        why = f"its activation clip ratio {act.clip_ratio:.3g} has no compressed-tensors field"
    elif act.fmt == "int" and act.bits not in (4, 8):
        why = f"INT{act.bits} per-token activations have no compressed-tensors preset"
    else:
        return f"int{act.bits}" if act.fmt == "int" else "fp8"
    raise ConfigError(f"--format packed cannot store {name}: {why}; use --format fake")


# schemes and methods whose results `w8a8_results` can store (calib.activations names)
PACKED_ACT_SCHEMES = ("w8a8", "w8a8fp8", "w4a8", "w4a8fp8", "w4a8fp8-e8m0", "w4a4")
PACKED_ACT_METHODS = ("rtn", "gptq")


def packed_act_config(cfg: Any) -> Any:
    """`cfg` (an ActCalibConfig) calibrating for packed W8A8 export: INT weight scales rounded
    to the bf16 the checkpoint stores before the codes are chosen (`w8a8`'s weights are
    symmetric per channel in every format: activations.SCHEMES)."""
    return replace(cfg, weight_scale_dtype="bfloat16")


def has_act_linears(model: nn.Module) -> bool:
    from faircalib.calib.activations import ActQuantLinear

    return any(isinstance(m, ActQuantLinear) for m in model.modules())


def load_fake_quant(
    directory: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionLM:
    """Load a float or fake-quant model directory; layers listed in act_quant.json become
    FakeQuantLinear modules with their input scale and per-token activation quantization, and
    those in quantization.json's `activation_quant` become ActQuantLinear modules rebuilt from
    act_linears.safetensors (their tensors in the dtypes saved, whatever `dtype`)."""
    directory = Path(directory)
    model = load_model(directory, device="cpu", dtype=dtype)
    meta_path = directory / ACT_QUANT_JSON
    if meta_path.exists():
        apply_act_quant(model, read_json(meta_path), directory / ACT_QUANT_TENSORS)
    record_path = directory / QUANTIZATION_JSON
    if record_path.is_file():
        act_meta = read_json(record_path).get("activation_quant")
        if act_meta is not None:
            apply_act_linears(model, act_meta, directory)
    return model.to(device).eval()


def _bad(directory: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{directory}/{QUANTIZATION_JSON}: activation_quant {what}; {REDO}")


@torch.no_grad()
def apply_act_linears(model: DiffusionLM, meta: Any, directory: Path) -> None:
    """Rebuild the ActQuantLinear modules `meta` (quantization.json's `activation_quant`)
    lists from the tensors beside it."""
    from faircalib.calib.activations import ActQuantLinear
    from faircalib.quant.activations import ActQuantConfig
    from faircalib.quant.flatquant import LearnedTransform
    from faircalib.quant.rotation import Rotation, is_power_of_two

    directory = Path(directory)
    versions = (ACT_LINEARS_VERSION, ACT_LINEARS_SHIFT_VERSION)
    if not isinstance(meta, dict) or meta.get("version") not in versions:
        raise _bad(directory, f"must be an object of version {versions[0]} or {versions[1]}")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or meta.get("tensors") != ACT_LINEARS:
        raise _bad(directory, f"needs a layers object and tensors {ACT_LINEARS!r}")
    path = directory / ACT_LINEARS
    if not path.is_file():
        raise CheckpointError(
            f"{directory} lists activation-quantized layers but has no {ACT_LINEARS}; {REDO}"
        )
    tensors = read_safetensors(path)
    modules = dict(model.named_modules())
    for name, spec in layers.items():
        linear = modules.get(name)
        if not isinstance(spec, dict) or not isinstance(linear, nn.Linear):
            raise _bad(directory, f"layer {name} is not a linear of this model")
        shape = (linear.out_features, linear.in_features)
        if (spec.get("out_features"), spec.get("in_features")) != shape:
            raise _bad(directory, f"layer {name} has the wrong shape for {shape}")

        def get(key: str, size: tuple[int, ...] | None, *, name=name) -> torch.Tensor | None:
            value = tensors.get(f"{name}.{key}")
            if value is None:
                return None
            if (size is not None and tuple(value.shape) != size) or not torch.isfinite(value).all():
                raise CheckpointError(
                    f"{path}: bad {key} for {name}: shape {tuple(value.shape)}; {REDO}"
                )
            return value

        listed = spec.get("tensors")
        if not isinstance(listed, list) or "weight" not in listed:
            raise _bad(directory, f"layer {name} lists no weight")
        known = {*_ACT_TENSORS, *_ROT_TENSORS, *_TF_TENSORS}
        if meta["version"] == ACT_LINEARS_VERSION:  # the shift came with version 2
            known -= set(_SHIFT_TENSORS)
        unknown = sorted(set(map(str, listed)) - known)
        if unknown:
            raise _bad(directory, f"layer {name} lists unknown tensors {unknown}")
        missing = [k for k in listed if f"{name}.{k}" not in tensors]
        if missing:
            raise CheckpointError(f"{path}: {name} lacks {missing}; {REDO}")
        out_f, in_f = shape
        weight = get("weight", shape)
        bias = get("bias", (out_f,))
        try:
            act = None if spec.get("act") is None else ActQuantConfig(**spec["act"])
        except (TypeError, ConfigError) as exc:
            raise _bad(directory, f"layer {name} has a bad act config ({exc})") from exc
        rotation = None
        if "rotation_signs" in listed:
            block = spec.get("rotation_block")
            if type(block) is not int or not is_power_of_two(block) or in_f % block:
                raise _bad(directory, f"layer {name} has a bad rotation block {block!r}")
            rotation = Rotation(get("rotation_signs", (in_f,)), block)
        transform = None
        if "transform_p1" in listed:
            p1, p2 = get("transform_p1", None), get("transform_p2", None)
            if p1 is None or p2 is None or p1.ndim != 2 or p2.ndim != 2:
                raise CheckpointError(f"{path}: bad transform of {name}; {REDO}")
            if p1.shape[0] * p2.shape[0] != in_f:
                raise CheckpointError(f"{path}: transform of {name} is not {in_f} wide; {REDO}")
            transform = LearnedTransform(
                p1, p2, get("transform_smooth", (in_f,)), get("transform_shift", (in_f,))
            )
        module = ActQuantLinear(
            weight,
            bias,
            act,
            smooth=get("smooth", (in_f,)),
            rotation=rotation,
            transform=transform,
            act_scale=get("act_scale", None),
            offset=get("offset", (out_f,)),
        )
        _set_submodule(model, name, module)


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
