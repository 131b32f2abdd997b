"""Packed INT2-8 checkpoints in the compressed-tensors `pack-quantized` layout (weight-only, and
W4A8 / W4AFP8 / W4A4 with per-token input activations), and W8A8 layers in its `int-quantized` /
`float-quantized` layouts.

A packed model directory is an ordinary model directory (config.json + safetensors shards +
index, written atomically by `faircalib.models.io`) whose quantized linear layers are stored the
way compressed-tensors stores them, so vLLM / transformers readers load it as-is:

    <layer>.weight_packed      int32 [out, ceil(in * bits / 32)]   codes, densely bit-packed
    <layer>.weight_scale       dtype [out, n_groups]               (n_groups = 1: per-channel)
    <layer>.weight_zero_point  int32 [ceil(out * bits / 32), n_groups]   asymmetric only
    <layer>.weight_shape       int64 [2] = (out, in)
    <layer>.bias               dtype [out]                          if the layer has a bias

`dtype` is the checkpoint dtype (bf16 by default): float tensors and scales alike, as vLLM keeps
scales in the model dtype. compressed-tensors stores signed values q = code - 2^(bits-1) and
zero points likewise, and dequantizes (q - zp) * scale; with our unsigned codes
(`faircalib.quant.primitives`) that is scale * (code - zero), the same number. Symmetric layers
have zero = 2^(bits-1), i.e. zp = 0, which is why compressed-tensors omits their zero point.
Unpacking uses the package's own `unpack_from_int32`; packing, `pack_codes`, which writes the
words its `pack_to_int32` writes (tested bit for bit against it) ~8x faster; the schema is its
pydantic `QuantizationConfig`: one config group per (bits, group size, symmetry) whose
`targets` are the exact names of its quantized linears, and `ignore` lists every other
nn.Linear, so every linear layer matches exactly one rule (vLLM refuses a linear that matches
neither).

Exactness: the writer stores scales as they are and refuses (ConfigError) a layer whose scales
are not representable in the checkpoint dtype, or whose codes and scales do not reproduce its
fake-quant weight bit for bit. Calibration must round scales before choosing codes
(`scale_dtype`, `faircalib.quant.primitives.round_scales`); then our loader reproduces the
fake-quant weight exactly and stock readers, which dequantize in the scale dtype, get it rounded
to that dtype, bit for bit.

config.json is the model's own config dict (`write_packed`): HF fields it holds
(`architectures`, `auto_map`, `model_type`) are kept; our native families get
`model_type: faircalib-<family>` next to `family`, which our loader reads.

AWQ / SmoothQuant results are refused: their per-input-channel scale s (the layer computes
(x / s) @ W_hat.T) has no compressed-tensors field that stock readers apply, and folding it into
the preceding op is impossible for most of our layers (see `_refuse_smoothing`). Directories
written before (format_version 1) may still list such layers under `faircalib.input_scale` /
`faircalib.act_bits`; our loader applies them.
W8A8 (`W8A8Layer`, from `quantize --scheme w8a8 / w8a8fp8` with rtn or gptq): a config group
equal to compressed-tensors' own preset INT8_W8A8 (format `int-quantized`) or FP8_DYNAMIC
(`float-quantized`) - symmetric static per-channel weights, dynamic symmetric per-token
`input_activations` - and per layer

    <layer>.weight        int8 / float8_e4m3fn [out, in]   the values v
    <layer>.weight_scale  [out, 1]   INT8: checkpoint dtype (rounded at calibration, as above);
                                     FP8: float32 (the e4m3 quantizer's abs-max / 448)

with W = v * scale; the top-level `format` is the groups' one (vLLM reads activation schemes
only under an activation format), `mixed-precision` if weight-only groups are mixed in. The
fake-quant model keeps only dequantized weights: `w8a8_layer_from_weight` recovers (v, scale)
from them, exactly or not at all. Loading gives QuantLinear(act_bits=8) for INT8 (what the
int8 W8A8 kernels run) and `FP8ActLinear` for FP8 (QuantLinear holds integer codes only).
Per-token activation quantization matches the fake quantizers (`quant.activations`): INT8
scale abs-max / 127, codes in +-127 (vLLM's too; transformers' emulation divides by 127.5),
FP8 abs-max / 448.

W4A8 / W4AFP8 / W4A4 (`PackedActLayer`, from `quantize --scheme w4a8 / w4a8fp8 / w4a4` with rtn
or gptq): the weight is written exactly as a weight-only layer (pack-quantized: codes, scales in
the checkpoint dtype, zero points if asymmetric) and the config group adds the
`input_activations` of compressed-tensors' own preset W4A8 (INT8), W4AFP8 (e4m3) or W4A4 (INT4):
dynamic symmetric per token. w4a8 / w4a8fp8 weights are symmetric INT4 g128, so their groups
equal the presets field for field; w4a4's are asymmetric per channel (no preset has those
weights; no stock reader runs INT4 activations: vLLM refuses the group). The weights are
recovered from the fake-quant weight alone (`packed_act_layer_from_weight`, exactly or not at
all); loading gives QuantLinear(act_bits=8, act_format "int" or "fp8") or (act_bits=4). Why
pack-quantized and not int-quantized, which compressed-tensors' own `infer_module_format` would
pick for an INT weight with input activations: vLLM's W4A8 GPU kernel (CompressedTensorsW4A8Fp8,
Hopper) loads only `weight_packed` int32, and it is the layout the weight-only export and our
loader already share; vLLM's CPU-only W4A8-int scheme wants int-quantized and does not read it.

Every other tensor (embeddings, norms, output layer, adaLN) is a float tensor in the same shards,
unless `--quantize-head` quantized the vocabulary layers: the output Linear is then an ordinary
target, and the embedding ([V, D], groups along D per token row) is a target too, stored with
the same four tensors under its module path - compressed-tensors 0.20 treats nn.Embedding like
nn.Linear (`COMPRESSIBLE_MODULE_TYPES`). A family whose embedding is a raw parameter (MDLM's
`vocab_embed.embedding`) is named by the module holding it; our loader maps it back through
the family's declared `vocab_layers`. What stock readers do with it: docs/models.md.

Loading validates every tensor's presence, dtype and shape (and finiteness) against the model
that the config describes before anything is built, then repacks the plain codes into
`QuantLinear` (which repacks again, lazily, into its kernel's layout).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import compressed_tensors
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import (
    FP8_DYNAMIC,
    INT8_W8A8,
    W4A4,
    W4A8,
    W4AFP8,
)
from compressed_tensors.utils.match import is_match, match_named_modules
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn import functional as F

import faircalib
from faircalib.errors import CheckpointError, ConfigError
from faircalib.kernels import QuantLinear, check_codes
from faircalib.kernels.backends import check_backend_name, fp8_w8a8_linear, fp8_w8a8_support
from faircalib.kernels.quant_linear import compute_dtype
from faircalib.kernels.shared_activations import share_activations
from faircalib.kernels.stacked_linears import StackedMember, StackReport, stack_linears
from faircalib.models.base import REDO, DiffusionLM, read_json
from faircalib.models.io import (
    CONFIG,
    _cast_checkpoint_tensors,
    _recomputed_buffers,
    all_finite,
    atomic_directory,
    build_model,
    check_safetensors_header,
    dtype_fields,
    load_tensors,
    probe_model,
    save_tensors,
    write_extra_files,
    write_json,
)
from faircalib.quant.activations import FP8_E4M3_MAX, quantize_fp8_rows
from faircalib.quant.primitives import QParams, dequantize, grouped, scales_representable

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
FORMAT_VERSION = 2  # of our `faircalib` section (2: no input_scale / act_bits written)
PINNED_CT_MINOR = "0.20"  # pyproject pins compressed-tensors~=0.20.0: the layout we test
INPUT_SCALE = "input_scale"
NATIVE_MODEL_TYPE = "faircalib-{family}"  # model_type of families with no HF model_type
CHECKPOINT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# methods whose results carry per-input-channel scales (see _refuse_smoothing)
SMOOTHING_METHODS = ("awq", "smoothquant")
# W8A8 layers (see `W8A8Layer`): compressed-tensors' own formats and preset schemes
INT_FORMAT, FLOAT_FORMAT, MIXED_FORMAT = "int-quantized", "float-quantized", "mixed-precision"
W8A8_KINDS = {"int8": (INT_FORMAT, INT8_W8A8), "fp8": (FLOAT_FORMAT, FP8_DYNAMIC)}
W8A8_VALUE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# pack-quantized weights whose inputs are quantized per token at run time (`PackedActLayer`):
# activation kind -> the compressed-tensors preset whose `input_activations` its group copies,
# and what QuantLinear computes for it (act_bits, act_format)
PACKED_ACT_PRESETS = {"int8": W4A8, "fp8": W4AFP8, "int4": W4A4}
PACKED_ACT_QUANT = {"int8": (8, "int"), "fp8": (8, "fp8"), "int4": (4, "int")}


# --- one layer ------------------------------------------------------------------------------
def quantization_args(bits: int, group_size: int | None, symmetric: bool) -> QuantizationArgs:
    """The compressed-tensors description of our weight quantizer."""
    strategy = "channel" if group_size is None else "group"
    return QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy=strategy,
        group_size=group_size,
        dynamic=False,
    )


def pack_layer(
    codes: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.bfloat16, *, name: str = "layer"
) -> dict[str, torch.Tensor]:
    """[out, in] unsigned codes + QParams -> the compressed-tensors tensors of one layer
    (names without the layer prefix), scales in `dtype`. Scales that `dtype` cannot hold
    exactly are refused, never rounded here: the codes were chosen for the scales as they are."""
    check_codes(codes, qp)
    return _pack_checked(codes, qp, dtype, name)


def _pack_checked(
    codes: torch.Tensor, qp: QParams, dtype: torch.dtype, name: str
) -> dict[str, torch.Tensor]:
    """`pack_layer` for codes that `check_codes` already accepted (write_packed checks every
    layer before packing any: checking twice cost as much as packing)."""
    if not scales_representable(qp, dtype):
        raise ConfigError(
            f"{name}: scales are not exactly representable in {_dtype_name(dtype)}, the "
            f"checkpoint dtype; quantize with scale_dtype={_dtype_name(dtype)!r} "
            "(faircalib.quant.primitives.round_scales) so the codes match the stored scales"
        )
    tensors = {
        "weight_packed": pack_codes(codes.cpu(), qp.bits),
        "weight_scale": qp.scale.detach().float().cpu().to(dtype).contiguous(),
        "weight_shape": torch.tensor(tuple(codes.shape), dtype=torch.int64),
    }
    if not qp.symmetric:  # zero points are integers in [0, maxq] (check_codes)
        zero = qp.zero.detach().cpu().round().to(torch.uint8)  # [out, G]
        tensors["weight_zero_point"] = pack_codes(zero, qp.bits, packed_dim=0)
    return tensors


def pack_codes(codes: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """Unsigned codes [rows, cols] in [0, 2^bits) -> int32 words, exactly what
    compressed-tensors' `pack_to_int32` makes of the signed values code - 2^(bits-1) (it adds
    the offset back before packing): code i of a row at bit i * bits of the row's bit stream,
    words little-endian, the last word zero-padded. `packed_dim=0` packs along the rows (zero
    points). Bytes are assembled in uint8 rather than by scatter-adding int32 per code:
    ~8x faster and without [rows, cols] int32 temporaries."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"packing takes 1..8 bits, got {bits}")
    if codes.dim() != 2:
        raise ConfigError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    if packed_dim == 0:
        return pack_codes(codes.t(), bits).t().contiguous()
    if sys.byteorder != "little":  # our byte order is the words' only on little-endian hosts
        signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        return pack_to_int32(signed, bits)
    rows, cols = codes.shape
    padded = math.ceil(cols / 32) * 32  # whole words: 32 codes are `bits` words
    codes = codes.to(torch.uint8)
    if padded > cols:
        codes = torch.nn.functional.pad(codes, (0, padded - cols))
    stream = _byte_stream(codes.contiguous(), bits)  # [rows, padded * bits / 8] uint8
    return stream.view(torch.int32)[:, : math.ceil(cols * bits / 32)].contiguous()


def _byte_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] uint8 codes (cols a multiple of 8) -> their dense little-endian bit stream
    as [rows, cols * bits / 8] bytes."""
    rows, cols = codes.shape
    if 8 % bits == 0:  # whole codes per byte (1, 2, 4, 8 bits): shift and OR in uint8
        per_byte = 8 // bits
        grouped = codes.view(rows, cols // per_byte, per_byte)
        out = grouped[..., 0].clone()
        for j in range(1, per_byte):
            out |= grouped[..., j] << (j * bits)
        return out
    # 3, 5, 6, 7 bits: 8 codes fill exactly `bits` bytes; byte k ORs the codes overlapping
    # its bits [8k, 8k + 8), each shifted into place (uint8 shifts drop what spills over)
    grouped = codes.view(rows, cols // 8, 8)
    out = torch.empty(rows, cols // 8, bits, dtype=torch.uint8, device=codes.device)
    for k in range(bits):
        byte = torch.zeros_like(grouped[..., 0])
        for j in range(8):
            low = j * bits - 8 * k  # code j's lowest bit, relative to byte k's
            if -bits < low < 8:
                byte |= grouped[..., j] << low if low >= 0 else grouped[..., j] >> -low
        out[..., k] = byte
    return out.view(rows, -1)


def unpack_layer(
    tensors: dict[str, torch.Tensor], args: QuantizationArgs
) -> tuple[torch.Tensor, QParams]:
    """Inverse of `pack_layer` (shapes must already be validated): -> codes [out, in], QParams."""
    bits, offset = args.num_bits, 2 ** (args.num_bits - 1)
    shape = torch.Size(int(v) for v in tensors["weight_shape"])
    signed = unpack_from_int32(tensors["weight_packed"], bits, shape)  # [out, in] int8
    codes = (signed.to(torch.int16) + offset).to(torch.uint8)
    scale = tensors["weight_scale"].float()
    if args.symmetric:
        zero = torch.full_like(scale, float(offset))
    else:
        zp = unpack_from_int32(tensors["weight_zero_point"], bits, scale.shape, packed_dim=0)
        zero = zp.float() + offset
    group_size = args.group_size if args.strategy == "group" else None
    return codes, QParams(scale, zero, bits, group_size, bool(args.symmetric))


def packed_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes a layer's packed tensors occupy on disk (tensor payload, headers excluded)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def embedding_targets(module: nn.Module) -> dict[str, str]:
    """Module path -> parameter name of every embedding that may be a packed target: each
    nn.Embedding, and the embedding / tied vocabulary layers a DiffusionLM declares
    (`DiffusionLM.vocab_layers`; MDLM's is a raw parameter of a custom module)."""
    out = {n: "weight" for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    if isinstance(module, DiffusionLM):
        try:
            declared = module.vocab_layers().layers
        except ConfigError:  # a family that declares none
            declared = ()
        out.update({v.module: v.param for v in declared if v.role != "output"})
    return out


def _layer_shape(
    module: nn.Module, name: str, embeddings: Mapping[str, str]
) -> tuple[int | None, int | None]:
    """(out, in) of a quantizable layer: a Linear (or a stand-in for one), or an embedding's
    [V, D] (rows = tokens, groups along D)."""
    layer = module.get_submodule(name)
    if name in embeddings:
        return tuple(layer.get_parameter(embeddings[name]).shape)
    return getattr(layer, "out_features", None), getattr(layer, "in_features", None)


# the tensors of one packed layer that hold its weight (bias and input_scale are not weight)
WEIGHT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
_SAFETENSORS_ITEM_BYTES = {
    "I64": 8,
    "F64": 8,
    "I32": 4,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I8": 1,
    "U8": 1,
    "F8_E4M3": 1,
}


def packed_layer_bytes(
    out_f: int, in_f: int, bits: int, group_size: int | None, symmetric: bool, dtype: torch.dtype
) -> int:
    """Bytes of one packed layer's weight tensors (codes, scales, zero points, shape), exactly
    as `pack_layer` writes them (the layout of `expected_specs`)."""
    n_groups = 1 if group_size is None else in_f // group_size
    item = torch.empty(0, dtype=dtype).element_size()
    total = out_f * math.ceil(in_f * bits / 32) * 4  # weight_packed, int32
    total += out_f * n_groups * item  # weight_scale, checkpoint dtype
    total += 2 * 8  # weight_shape, int64 [2]
    if not symmetric:
        total += math.ceil(out_f * bits / 32) * n_groups * 4  # weight_zero_point, int32
    return total


def packed_checkpoint_bytes(
    module: nn.Module, schemes: Mapping[str, Any], dtype: torch.dtype = torch.bfloat16
) -> dict[str, int]:
    """Tensor bytes of the whole packed checkpoint `write_packed` would write for `module` with
    the layers in `schemes` (name -> object with bits, group_size, symmetric; or with `kind`
    "int8" / "fp8" for a W8A8 layer, as `W8A8Layer` has) quantized, from
    shapes alone: it works on a meta-device model (an 8B one costs nothing). Every other
    state-dict tensor is stored in `dtype` if it is a float, else as it is (biases of quantized
    layers included). Safetensors headers are not counted (`checkpoint_tensor_bytes` reads the
    same quantity from written files). -> {"quantized", "float", "total"}."""
    embeddings = embedding_targets(module)
    item = torch.empty(0, dtype=dtype).element_size()
    quantized, skip = 0, set()
    for name, cfg in schemes.items():
        out_f, in_f = _layer_shape(module, name, embeddings)
        if getattr(cfg, "kind", None) in W8A8_KINDS:  # a W8A8Layer, or anything with its kind
            quantized += w8a8_layer_bytes(out_f, in_f, cfg.kind, dtype)
        else:
            group = cfg.group_size
            quantized += packed_layer_bytes(out_f, in_f, cfg.bits, group, cfg.symmetric, dtype)
        skip.add(f"{name}.{embeddings.get(name, 'weight')}")
    floats = sum(
        t.numel() * (item if t.is_floating_point() else t.element_size())
        for key, t in module.state_dict().items()
        if key not in skip
    )
    return {"quantized": quantized, "float": floats, "total": quantized + floats}


def checkpoint_tensor_bytes(directory: Path) -> int:
    """Bytes of every tensor in a model directory's safetensors files (headers excluded), read
    from the headers only."""
    return sum(_tensor_sizes(Path(directory)).values())


def _tensor_sizes(directory: Path) -> dict[str, int]:
    """Tensor name -> payload bytes over a directory's safetensors shards (headers only)."""
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{directory} has no safetensors shards")
    sizes: dict[str, int] = {}
    for path in shards:
        check_safetensors_header(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    piece = f.get_slice(name)
                    if piece.get_dtype() not in _SAFETENSORS_ITEM_BYTES:
                        raise CheckpointError(f"{path}: {name} has dtype {piece.get_dtype()}")
                    item = _SAFETENSORS_ITEM_BYTES[piece.get_dtype()]
                    sizes[name] = math.prod(piece.get_shape()) * item
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    return sizes


def packed_weight_bytes(directory: Path) -> int:
    """Bytes the quantized layers' weights (codes, scales, zero points, shapes; a W8A8
    layer's int8 / e4m3 `weight` and its scales) occupy in a packed model directory, read
    from the safetensors headers only (no tensor is loaded). Every quantized layer has a
    `weight_scale`; a float layer never does."""
    directory = Path(directory)
    sizes = _tensor_sizes(directory)
    layers = {n.removesuffix(".weight_scale") for n in sizes if n.endswith(".weight_scale")}
    if not layers:
        raise CheckpointError(f"{directory} holds no packed layers (no *.weight_scale tensor)")
    suffixes = (*WEIGHT_SUFFIXES, "weight")
    return sum(sizes.get(f"{layer}.{suffix}", 0) for layer in layers for suffix in suffixes)


def expected_specs(
    out_f: int, in_f: int, args: QuantizationArgs
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Suffix -> (shape, dtype kind) the loader requires for one quantized layer."""
    bits = args.num_bits
    n_groups = 1 if args.strategy == "channel" else in_f // args.group_size
    specs = {
        "weight_packed": ((out_f, math.ceil(in_f * bits / 32)), "int32"),
        "weight_scale": ((out_f, n_groups), "float"),
        "weight_shape": ((2,), "int"),
    }
    if not args.symmetric:
        specs["weight_zero_point"] = ((math.ceil(out_f * bits / 32), n_groups), "int32")
    return specs


# --- W8A8 layers (int-quantized / float-quantized) ------------------------------------------
@dataclass
class W8A8Layer:
    """One W8A8 layer for `write_packed`, in compressed-tensors' `int-quantized` (INT8) or
    `float-quantized` (FP8 e4m3) layout: weight values on a symmetric per-output-channel grid,
    activations quantized per token at run time (dynamic: nothing stored for them).

    kind: "int8" or "fp8"; values [out, in] int8 or float8_e4m3fn; scale [out, 1] float32;
    weight [out, in]: the fake-quant weight evaluated, fl(values * scale) bit for bit (the
    writer checks it)."""

    kind: str
    values: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor | None  # None: not kept (a loaded layer)

    def dequantized(self) -> torch.Tensor:
        """fl(values * scale) in float32: the same op the fake quantizers end with."""
        return self.values.float() * self.scale.float()


# float32 neighbours of a row's candidate scale that are tried: the true scale s of a row
# whose largest |value| is a = fl(s * K) lies within one ulp of a / K (see `_fit_rows`)
_SCALE_ULPS = 3
_ULP_STEPS = (0, *(d * i for i in range(1, _SCALE_ULPS + 1) for d in (1, -1)))


def w8a8_layer_from_weight(kind: str, weight: torch.Tensor) -> W8A8Layer | None:
    """The grid a fake-quant W8A8 weight [out, in] lies on, recovered from the weight alone
    (calibration keeps only the dequantized weight): per row, a float32 scale s and values v
    (INT8 in [-128, 127], or e4m3) with fl(v * s) == weight bit for bit. None if some row lies
    on no such grid (an asymmetric INT8 grid, a learned clip, a weight changed afterwards).
    Runs on the weight's device; each row costs a few passes (most fit the first candidate)."""
    if kind not in W8A8_KINDS:
        raise ConfigError(f"W8A8 kind must be int8 or fp8, got {kind!r}")
    w = weight.detach().float()
    # the value of a row's abs-max element: e4m3's 448 (each row's abs-max maps there), or its
    # INT8 code K: 127 or -128 under RTN (symmetric min-max), anything after GPTQ
    ks = [FP8_E4M3_MAX] if kind == "fp8" else [127.0, 128.0, *range(126, 0, -1)]
    scale = torch.ones(w.shape[0], 1, device=w.device)  # all-zero rows: any scale encodes them
    values = torch.zeros(w.shape, dtype=W8A8_VALUE_DTYPES[kind], device=w.device)
    todo = torch.nonzero(w.abs().amax(dim=1) > 0).flatten()
    # first the exact quotient for the likeliest K (all rows of an RTN layer with rounded
    # scales fit there), then every K with the neighbouring scales
    exact_only = [(k, (0,)) for k in ks[:2]]
    for k, steps in exact_only + [(k, _ULP_STEPS) for k in ks]:
        if len(todo) == 0:
            break
        todo = _fit_rows(kind, w, todo, float(k), steps, scale, values)
    if len(todo):
        return None
    return W8A8Layer(kind, values.cpu(), scale.cpu(), weight.detach().cpu())


def _fit_rows(
    kind: str,
    w: torch.Tensor,
    todo: torch.Tensor,
    k: float,
    steps: tuple[int, ...],
    scale: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """Fit rows `todo` of w whose abs-max element is k times a float32 scale: the true scale s
    of such a row (a = fl(s * k)) lies within about one ulp of a / k, so a / k and its
    `steps` (ulps away from it) are tried, each on the rows still unfit. Fitted rows are
    written into `scale` / `values`; returns the rows still unfit."""
    base = w[todo].abs().amax(dim=1, keepdim=True) / k  # [n, 1]
    left = torch.arange(len(todo), device=w.device)  # positions in `todo` still unfit
    for step in steps:
        if len(left) == 0:
            break
        cand = _ulps_away(base[left], step)
        rows = w[todo[left]]
        v = _encode_w8a8(kind, rows, cand)
        ok = (v.float() * cand == rows).all(dim=1) & (cand.squeeze(1) > 0)
        hit = todo[left[ok]]
        scale[hit], values[hit] = cand[ok], v[ok]
        left = left[~ok]
    return todo[left]


def _ulps_away(x: torch.Tensor, n: int) -> torch.Tensor:
    direction = torch.full_like(x, math.inf if n > 0 else -math.inf)
    for _ in range(abs(n)):
        x = torch.nextafter(x, direction)
    return x


def _encode_w8a8(kind: str, rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = rows / scale
    if kind == "fp8":
        return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.round(x).clamp(-128, 127).to(torch.int8)


# --- W4A8 / W4AFP8 / W4A4 layers (pack-quantized weights, dynamic per-token activations) --------
@dataclass
class PackedActLayer:
    """One layer whose weight is written exactly as a weight-only layer (pack-quantized codes,
    scales, zero points if asymmetric) and whose input activations are quantized per token at
    run time: act "int8" (W4A8), "fp8" (W4AFP8, e4m3) or "int4" (W4A4). Its config group is
    the weight grid plus the `input_activations` of compressed-tensors' preset
    (`PACKED_ACT_PRESETS`). weight: the fake-quant weight the codes must reproduce (None: a
    loaded layer)."""

    act: str
    codes: torch.Tensor
    qparams: QParams
    weight: torch.Tensor | None

    @property
    def bits(self) -> int:
        return self.qparams.bits

    @property
    def group_size(self) -> int | None:
        return self.qparams.group_size

    @property
    def symmetric(self) -> bool:
        return self.qparams.symmetric


def packed_act_layer_from_weight(
    act: str,
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> PackedActLayer | None:
    """The codes and scales of a fake-quant INT weight [out, in] on the grid (bits, group size,
    symmetry) with `scale_dtype` scales, recovered from the weight alone (calibration keeps
    only the dequantized weight): per group a scale s and integers k with fl(s * k) == weight
    bit for bit, k in [-2^(bits-1), 2^(bits-1) - 1] (symmetric: code = k + 2^(bits-1)) or
    spanning at most 2^bits - 1 levels with 0 among them (asymmetric: zero = max(0, -min k),
    code = k + zero, which is where min-max RTN puts them). None if some group lies on no
    such grid. The smallest valid scale is taken, which is the quantizer's own unless every k
    of a group shares a factor (then another exact encoding of the same weight)."""
    if act not in PACKED_ACT_PRESETS:
        raise ConfigError(
            f"activation kind must be one of {sorted(PACKED_ACT_PRESETS)}, got {act!r}"
        )
    w = grouped(weight.detach().float(), group_size)  # [out, G, width]
    out_f, n_groups, width = w.shape
    w = w.reshape(-1, width)  # one row per group
    absmax = w.abs().amax(dim=1, keepdim=True)  # [N, 1]: |s * k| of the group's largest k
    scale = torch.ones_like(absmax)  # all-zero groups: any scale encodes them (k = 0)
    ints = torch.zeros_like(w)
    todo = torch.nonzero(absmax[:, 0] > 0).flatten()
    # largest |k| first (the smallest scale); most groups fit one of the first two, and later
    # passes look at the groups still unfit only
    for k in range(2 ** (bits - 1) if symmetric else 2**bits - 1, 0, -1):
        if len(todo) == 0:
            break
        cand = absmax[todo] / k  # exact when absmax = s * k (s has few significant bits)
        rows = w[todo]
        q = torch.round(rows / cand)
        fits = (q * cand == rows).all(dim=1) & _grid_range(q, bits, symmetric)
        fits &= (cand.to(scale_dtype).float() == cand)[:, 0]
        scale[todo[fits]], ints[todo[fits]] = cand[fits], q[fits]
        todo = todo[~fits]
    if len(todo):
        return None
    maxq = 2**bits - 1
    if symmetric:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = (-ints.amin(dim=1, keepdim=True)).clamp(0, maxq)
    codes = (ints + zero).reshape(weight.shape).to(torch.uint8)
    qp = QParams(
        scale.reshape(out_f, n_groups).cpu(),
        zero.reshape(out_f, n_groups).cpu(),
        bits,
        group_size,
        symmetric,
    )
    return PackedActLayer(act, codes.cpu(), qp, weight.detach().cpu())


def _grid_range(q: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """[N]: whether each group's integers (a row of q) fit the grid (see
    packed_act_layer_from_weight)."""
    lo, hi = q.amin(dim=1), q.amax(dim=1)
    if symmetric:
        return (lo >= -(2 ** (bits - 1))) & (hi <= 2 ** (bits - 1) - 1)
    return hi.clamp(min=0) - lo.clamp(max=0) <= 2**bits - 1


def w8a8_layer_bytes(out_f: int, in_f: int, kind: str, dtype: torch.dtype) -> int:
    """Bytes of one W8A8 layer's weight tensors: one byte per value, one scale per output
    channel in `w8a8_scale_dtype` (checkpoint dtype `dtype`)."""
    item = torch.empty(0, dtype=w8a8_scale_dtype(kind, dtype)).element_size()
    return out_f * in_f + out_f * item


def w8a8_quant_linear(layer: W8A8Layer, bias: torch.Tensor | None, **kwargs: Any) -> nn.Module:
    """The module a loaded W8A8 layer becomes: INT8 -> `QuantLinear` with act_bits=8 (codes
    = value + 128, symmetric per-channel: what its int8 / int8_w8a8 backends run); FP8 ->
    `FP8ActLinear` (QuantLinear holds integer codes only). kwargs: QuantLinear's backend and
    cache_dequant; an FP8 layer reads the backend as its own (`dequant` -> its exact reference,
    `fp8_w8a8` -> the FP8 GEMM, anything else -> `auto`)."""
    if layer.kind == "fp8":
        wanted = kwargs.get("backend")
        backend = {"dequant": "reference", "fp8_w8a8": "fp8_w8a8"}.get(wanted, "auto")
        return FP8ActLinear(layer.values, layer.scale, bias, backend=backend)
    codes = (layer.values.to(torch.int16) + 128).to(torch.uint8)
    out_f = codes.shape[0]
    qp = QParams(layer.scale.float(), torch.full((out_f, 1), 128.0), 8, None, True)
    return QuantLinear.from_codes(codes, qp, bias=bias, act_bits=8, **kwargs)


class FP8ActLinear(nn.Module):
    """A loaded FP8 W8A8 layer: y = (x8 * x_scale) @ (values * scale).T + bias, x8 and x_scale
    the per-token e4m3 quantization of x (`quantize_fp8_rows`' grid). Two paths compute it:

    * "reference": the fake-quant model's own ops - `quantize_fp8_rows`, the weight decoded in
      float32, F.linear - so CPU float32 results equal the fake-quant model's bit for bit;
    * "fp8_w8a8": the real FP8 GEMM, QuantLinear's `fp8_w8a8` backend code
      (`kernels.backends.fp8_w8a8_linear`: fused per-token e4m3 quantization, bit-identical
      operands, then torch._scaled_mm with per-token x per-channel scales, or the Triton fp8
      GEMM for layers of few output tiles: `fp8_w8a8_gemm`). Only accumulation order and the
      output rounding differ (on CUDA: fast accumulation, bf16 output cast to the compute
      dtype).

    `backend` "auto" takes "fp8_w8a8" on CUDA wherever it can run (in and out divisible by
    16, compute capability >= 8.9) and "reference" elsewhere: on the CPU the reference is
    the exact one and was measured faster than _scaled_mm's CPU kernel (2-core dev machine,
    2048x2048 bf16, M = 16 and 256: 1.3x and 2x). `last_backend` records the path taken.
    `values` (e4m3) and `scale` (float32) keep their dtypes through `model.to(dtype)`, as
    QuantLinear's scales do."""

    BACKENDS = ("auto", "reference", "fp8_w8a8")

    def __init__(
        self,
        values: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in self.BACKENDS:
            raise ConfigError(f"unknown FP8ActLinear backend {backend!r}; one of {self.BACKENDS}")
        self.out_features, self.in_features = values.shape
        self.register_buffer("weight", values.to(torch.float8_e4m3fn).contiguous())
        self.register_buffer("weight_scale", scale.float().reshape(-1, 1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.backend = backend
        self.last_backend: str | None = None
        # (backend, device, dtype, M) -> path: the checks cost more than a small-M GEMM
        self._choices: dict[tuple[str, torch.device, torch.dtype, int], str] = {}

    @classmethod
    def stacked(cls, layers: list[FP8ActLinear]) -> FP8ActLinear:
        """One layer whose output rows are the layers' in order (`kernels.stacked_linears`);
        ValueError naming what differs."""
        first = layers[0]
        for layer in layers[1:]:
            if (layer.in_features, layer.backend) != (first.in_features, first.backend):
                raise ValueError("their input widths or backends differ")
            if (layer.bias is None) != (first.bias is None):
                raise ValueError("some have a bias and some do not")
            if layer.weight.device != first.weight.device:
                raise ValueError("they lie on different devices")
        bias = None if first.bias is None else torch.cat([layer.bias.detach() for layer in layers])
        return cls(
            torch.cat([layer.weight for layer in layers]),
            torch.cat([layer.weight_scale for layer in layers]),
            bias,
            backend=first.backend,
        )

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        kept = {n: self._buffers[n] for n in ("weight", "weight_scale")}
        for name in kept:
            self._buffers[name] = None  # hidden from dtype casts; moved below
        try:
            out = super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(kept)  # a failed move leaves the layer as it was
            raise
        for name, t in kept.items():  # device moves apply, dtype casts do not
            self._buffers[name] = t.to(device=fn(t).device)
        return out

    def choose_backend(self, device: torch.device, dtype: torch.dtype, m: int) -> str:
        """The path a call with M token rows of compute dtype `dtype` on `device` takes."""
        key = (self.backend, device, dtype, m)
        if key not in self._choices:
            self._choices[key] = self._checked_choice(device.type, dtype, m)
        return self._choices[key]

    def _checked_choice(self, device_type: str, dtype: torch.dtype, m: int) -> str:
        if self.backend == "reference" or m == 0:  # no rows: nothing for a kernel to do
            return "reference"
        reason = fp8_w8a8_support(self.in_features, self.out_features, device_type, dtype, m)
        if self.backend == "auto":
            return "fp8_w8a8" if device_type == "cuda" and reason is None else "reference"
        if reason is not None:
            raise ConfigError(f"FP8ActLinear backend 'fp8_w8a8' cannot run this layer: {reason}")
        return "fp8_w8a8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)  # autocast's, as F.linear would run in
        rows = x.numel() // self.in_features
        name = self.choose_backend(x.device, dtype, rows)
        self.last_backend = name
        if name == "reference":
            return self._reference(x)
        bias = None if self.bias is None else self.bias.detach()
        # x as given (not cast to `dtype`): the reference quantizes it as given, too
        y = fp8_w8a8_linear(
            x.reshape(rows, self.in_features),
            self.weight,
            self.weight_scale.reshape(1, -1),  # [1, out]: a view of the [out, 1] buffer
            bias,
            dtype,
        )
        return y.reshape(*x.shape[:-1], self.out_features)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_fp8_rows(x)
        weight = (self.weight.float() * self.weight_scale).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, fp8 e4m3 W8A8 (per-token), "
            f"backend={self.backend}"
        )


# --- save ----------------------------------------------------------------------------------
def save_packed_model(
    model: DiffusionLM,
    results: Mapping[str, Any],
    out: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    extra_files: dict[str, Path | str | dict] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a DiffusionLM with the linears named in `results` packed: `write_packed` with the
    model's config dict (see `model_config`)."""
    return write_packed(
        model,
        results,
        model_config(model),
        out,
        dtype=dtype,
        extra_files=extra_files,
        metadata=metadata,
        overwrite=overwrite,
    )


def model_config(model: DiffusionLM) -> dict[str, Any]:
    """The model's config dict for config.json. HF fields it holds (a LLaDA / Dream source's
    `architectures`, `auto_map`, `model_type`) pass through; a family with no `model_type`
    (our native MDLM) gets `faircalib-<family>`, so AutoConfig and vLLM read a model type
    (unregistered, but named) while our loader keeps reading `family`."""
    config = dict(model.config_dict())
    config.setdefault("model_type", NATIVE_MODEL_TYPE.format(family=model.family))
    return config


def write_packed(
    module: nn.Module,
    results: Mapping[str, Any],
    config: Mapping[str, Any],
    out: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    extra_files: dict[str, Path | str | dict] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write any module with the linears named in `results` packed (see the module docstring).

    results: full module name ("blocks.0.attn_qkv") -> QuantResult-like object with .codes
    [out, in], .qparams (QParams), .weight (its fake-quant [out, in] weight) and optionally
    .input_scale / .act_bits, which must be None. The module at that name may be the float
    nn.Linear or a fake-quant stand-in with in_features / out_features.
    config: the config.json fields describing the architecture (a transformers config's
    `to_dict()`, a DiffusionLM's `model_config`); the writer adds the dtype, the
    `quantization_config` and our `faircalib` section. dtype: checkpoint dtype of the float
    tensors and the scales. metadata: JSON-serialisable provenance -> faircalib.metadata.
    """
    _check_ct_version()
    if dtype not in CHECKPOINT_DTYPES:
        raise ConfigError(f"checkpoint dtype must be bfloat16, float16 or float32, got {dtype}")
    if not results:
        raise ConfigError("no quantized layers to pack")
    embeddings = embedding_targets(module)
    layers = {name: _checked_result(module, name, res, embeddings) for name, res in results.items()}
    tensors = _float_tensors(module, layers, dtype)
    for name, res in layers.items():  # each already checked by _checked_result
        packed = _layer_tensors(res, dtype, name)
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
    config = {
        **config,
        **dtype_fields(config, dtype),
        "quantization_config": quantization_config(module, layers),
        "faircalib": _faircalib_section(metadata),
    }
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        save_tensors(tensors, tmp)
        write_extra_files(tmp, extra_files)
        write_json(tmp / CONFIG, config)  # last: without it no loader accepts the directory
    return Path(out)


def _layer_tensors(res: Any, dtype: torch.dtype, name: str) -> dict[str, torch.Tensor]:
    """A checked result's tensors: pack-quantized, or a W8A8 layer's values and its scales
    in `w8a8_scale_dtype` (never rounded here: the values were chosen for the scales as they
    are)."""
    if isinstance(res, W8A8Layer):
        scale_dtype = w8a8_scale_dtype(res.kind, dtype)
        scale = res.scale.float()
        if not torch.equal(scale.to(scale_dtype).float(), scale):
            raise ConfigError(
                f"{name}: INT8 W8A8 scales are not exactly representable in "
                f"{_dtype_name(scale_dtype)}, the checkpoint dtype; calibrate with "
                f"scale_dtype={_dtype_name(scale_dtype)!r} (calib.fakequant_io.packed_act_config)"
            )
        return {"weight": res.values.contiguous(), "weight_scale": scale.to(scale_dtype)}
    return _pack_checked(res.codes, res.qparams, dtype, name)


def w8a8_scale_dtype(kind: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a W8A8 layer's scales are stored in. INT8: the checkpoint dtype, as for
    pack-quantized layers (calibration rounds them first), so transformers, which allocates
    scales in the model dtype, decodes our weight rounded to it bit for bit. FP8: float32,
    because the e4m3 fake quantizer's scale (abs-max / 448) cannot be rounded before the values
    are chosen; vLLM keeps it exactly (float32 scale parameters), transformers rounds it to the
    model dtype."""
    return torch.float32 if kind == "fp8" else dtype


def check_packable_method(cfg: object) -> None:
    """Refuse, before any calibration, a method whose results the packed format cannot hold."""
    for method in (getattr(cfg, "method", "rtn"), getattr(cfg, "base", None)):
        if method in SMOOTHING_METHODS:
            raise ConfigError(_SMOOTHING_MESSAGE.format(what=f"method {method!r}"))


_SMOOTHING_MESSAGE = (
    "--format packed cannot store {what}: its per-input-channel scales have no "
    "compressed-tensors field that vLLM or transformers apply (weights would load up to 30% "
    "off); use --format fake, or --method rtn, gptq or fair with base gptq/rtn"
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_ct_version() -> None:
    version = compressed_tensors.__version__
    if not version.startswith(PINNED_CT_MINOR + "."):
        raise ConfigError(
            f"compressed-tensors {version} is installed; faircalib writes the {PINNED_CT_MINOR}.x "
            f"layout (pip install 'compressed-tensors~={PINNED_CT_MINOR}.0')"
        )


def _checked_result(
    module: nn.Module, name: str, res: Any, embeddings: Mapping[str, str] | None = None
) -> Any:
    try:
        layer = module.get_submodule(name)
    except AttributeError as exc:
        raise ConfigError(f"quantized layer {name!r} is not a module of the model") from exc
    # an nn.Linear of the float model, a stand-in for one (calib's FakeQuantLinear), or an
    # embedding (`embedding_targets`)
    shape = _layer_shape(module, name, embeddings or {})
    if not all(isinstance(v, int) for v in shape):
        raise ConfigError(
            f"quantized layer {name!r} is a {type(layer).__name__}, not a linear layer"
        )
    if isinstance(res, W8A8Layer):
        return _checked_w8a8(name, res, shape, embeddings or {})
    if isinstance(res, PackedActLayer):
        _check_packed_act(name, res, embeddings or {})
    if tuple(res.codes.shape) != shape:
        raise ConfigError(
            f"{name}: codes have shape {tuple(res.codes.shape)}, the layer is (out, in) = {shape}"
        )
    _refuse_smoothing(name, res)
    check_codes(res.codes, res.qparams)
    _check_reproduces_weight(name, res)
    return res


def _checked_w8a8(
    name: str, res: W8A8Layer, shape: tuple[int, int], embeddings: Mapping[str, str]
) -> W8A8Layer:
    """A W8A8 layer is a linear whose values and scales reproduce its fake-quant weight."""
    if name in embeddings:
        raise ConfigError(f"{name}: an embedding cannot quantize its activations (W8A8)")
    if res.kind not in W8A8_KINDS or res.values.dtype != W8A8_VALUE_DTYPES[res.kind]:
        raise ConfigError(f"{name}: W8A8 {res.kind!r} values of dtype {res.values.dtype}")
    if tuple(res.values.shape) != shape or tuple(res.scale.shape) != (shape[0], 1):
        raise ConfigError(
            f"{name}: W8A8 values {tuple(res.values.shape)} / scales {tuple(res.scale.shape)} "
            f"do not fit the layer's (out, in) = {shape}"
        )
    scale = res.scale.float()
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ConfigError(f"{name}: W8A8 scales must be finite and positive")
    weight = None if res.weight is None else res.weight.detach().cpu()
    if weight is None or not torch.equal(res.dequantized().to(weight.dtype), weight):
        raise ConfigError(
            f"{name}: W8A8 values and scales do not reproduce the fake-quant weight; the "
            "result was changed after its grid was chosen"
        )
    return res


def _check_packed_act(name: str, res: PackedActLayer, embeddings: Mapping[str, str]) -> None:
    """What only a PackedActLayer can get wrong: its activation kind, and being an embedding
    (a token lookup has no input activations to quantize)."""
    if name in embeddings:
        raise ConfigError(f"{name}: an embedding cannot quantize its activations")
    if res.act not in PACKED_ACT_PRESETS:
        raise ConfigError(
            f"{name}: activation kind {res.act!r} is not one of {sorted(PACKED_ACT_PRESETS)}"
        )


def _refuse_smoothing(name: str, res: Any) -> None:
    """Refuse AWQ / SmoothQuant results rather than fold their scales.

    Why not fold s into the preceding op: in our models the input of mlp.2 comes out of a GELU
    and that of attn_out out of softmax(QK^T) V, where no per-channel scale can be folded (into
    V's rows of attn_qkv only by changing that layer's already chosen codes); attn_qkv and mlp.0
    follow LayerNorm + adaLN modulate, where s would have to divide the norm weight and the
    adaLN shift rows, and q/k/v would have to share one s. Folding some layers and refusing the
    rest would be a format that works for some methods on some models. Per-token activation
    quantization alone is written (W8A8 layers, `W8A8Layer`: vLLM runs it from `int-quantized`
    weights, not `pack-quantized`), but SmoothQuant's without s would quantize the unsmoothed
    activations.
    """
    if getattr(res, "input_scale", None) is not None:
        raise ConfigError(_SMOOTHING_MESSAGE.format(what=f"{name}'s AWQ/SmoothQuant input_scale"))
    if getattr(res, "act_bits", None) is not None:
        raise ConfigError(
            f"--format packed cannot store {name}'s per-token activation quantization on a "
            "weight-only result (activation-quantized layers are written from `W8A8Layer`s / "
            "`PackedActLayer`s: quantize --scheme); use --format fake"
        )


def _check_reproduces_weight(name: str, res: Any) -> None:
    """The codes and scales to be written must give the fake-quant weight bit for bit: what
    was evaluated is what is deployed."""
    weight = getattr(res, "weight", None)
    if weight is None:
        raise ConfigError(f"{name}: the result has no fake-quant weight to check the codes against")
    if not reproduces_weight(res.codes, res.qparams, weight.detach()):
        # a model calibrated in bf16 keeps its fake-quant weights in bf16: the exact float32
        # decode rounded once, as a stock reader's bf16 dequantization gives it
        decoded = dequantize(res.codes.cpu(), res.qparams.to("cpu")).to(weight.dtype)
        diff = float((decoded.float() - weight.detach().float().cpu()).abs().max())
        raise ConfigError(
            f"{name}: codes and scales do not reproduce the fake-quant weight (max |diff| "
            f"{diff:.2e}); the result was changed after its codes were chosen"
        )


# rows decoded at a time by `reproduces_weight`: ~1M elements keep its float32 temporaries
# in cache instead of allocating four [out, in] float32 tensors per layer
_CHECK_ELEMENTS = 2**20


def reproduces_weight(codes: torch.Tensor, qp: QParams, weight: torch.Tensor) -> bool:
    """Whether `dequantize(codes, qp)` rounded to weight's dtype equals `weight` bit for bit.

    The same float32 arithmetic, element by element, as `dequantize` (scale * (code - zero),
    each op correctly rounded), so the same bits; but a group's scale and zero broadcast over
    its columns instead of being repeated into [out, in] tensors, and a block of rows at a
    time on the weight's device."""
    out_f, in_f = codes.shape
    if tuple(weight.shape) != (out_f, in_f):
        return False
    width = in_f if qp.group_size is None else qp.group_size
    if in_f % width:  # a ragged last group: the plain decode, as `dequantize` defines it
        decoded = dequantize(codes.cpu(), qp.to("cpu")).to(weight.dtype)
        return torch.equal(decoded, weight.cpu())
    device = weight.device
    scale, zero = qp.scale.to(device).unsqueeze(-1), qp.zero.to(device).unsqueeze(-1)
    step = max(1, _CHECK_ELEMENTS // max(in_f, 1))
    for start in range(0, out_f, step):
        rows = slice(start, start + step)
        block = codes[rows].to(device).reshape(-1, in_f // width, width)  # [rows, G, width]
        decoded = (scale[rows] * (block.float() - zero[rows])).to(weight.dtype)
        if not torch.equal(decoded.reshape(-1, in_f), weight[rows]):
            return False
    return True


def _float_tensors(
    module: nn.Module, layers: Mapping[str, Any], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the quantized layers, plus their biases; floats cast to
    `dtype`. (A fake-quant layer's own buffers - its float weight - are dropped: the packed
    tensors replace them.)"""
    out = {}
    for key, t in module.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf != "bias":
            continue
        t = t.detach().cpu()
        out[key] = t.to(dtype) if t.is_floating_point() else t
    return out


def quantization_config(module: nn.Module, layers: Mapping[str, Any]) -> dict[str, Any]:
    """compressed-tensors config: one group per distinct (bits, group size, symmetry) whose
    targets are its layers' exact names; every other nn.Linear of `module` in `ignore`."""
    groups: dict[tuple, list[str]] = {}
    for name, res in layers.items():
        groups.setdefault(_group_key(res), []).append(name)
    config_groups = {
        f"group_{i}": _group_scheme(key, names) for i, (key, names) in enumerate(groups.items())
    }
    formats = {scheme.format for scheme in config_groups.values()}
    ignore = [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and name not in layers
    ]
    qc = QuantizationConfig(
        config_groups=config_groups,
        quant_method=QUANT_METHOD,
        format=formats.pop() if len(formats) == 1 else MIXED_FORMAT,
        quantization_status="compressed",
        ignore=ignore,
    )
    return {"version": compressed_tensors.__version__, **qc.model_dump(mode="json")}


def _group_key(res: Any) -> tuple:
    """Layers sharing a key share a config group: ("w8a8", kind) or the weight grid."""
    if isinstance(res, W8A8Layer):
        return ("w8a8", res.kind)
    qp = res.qparams
    grid = (qp.bits, qp.group_size, bool(qp.symmetric))
    return ("act", res.act, *grid) if isinstance(res, PackedActLayer) else grid


def _group_scheme(key: tuple, names: list[str]) -> QuantizationScheme:
    """A W8A8 group is compressed-tensors' own preset (INT8_W8A8 / FP8_DYNAMIC: symmetric
    per-channel weights, dynamic symmetric per-token input activations) in its format."""
    if key[0] == "w8a8":
        fmt, preset = W8A8_KINDS[key[1]]
        return QuantizationScheme(targets=names, format=fmt, **copy.deepcopy(preset))
    if key[0] == "act":  # the weight grid, and the preset's own input_activations
        acts = copy.deepcopy(PACKED_ACT_PRESETS[key[1]]["input_activations"])
        return QuantizationScheme(
            targets=names,
            weights=quantization_args(*key[2:]),
            input_activations=acts,
            format=PACK_FORMAT,
        )
    return QuantizationScheme(targets=names, weights=quantization_args(*key), format=PACK_FORMAT)


def _faircalib_section(metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "writer": {
            "faircalib": faircalib.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "torch": torch.__version__.split("+")[0],
        },
        "metadata": metadata or {},
    }


# --- load ----------------------------------------------------------------------------------
def load_packed_model(
    directory: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    backend: str = "auto",
    cache_dequant: bool = False,
    stack: bool = False,
) -> DiffusionLM:
    """Load a packed directory into the float model with QuantLinear layers swapped in.

    Everything is validated before the model is touched; a mismatched, truncated or corrupt
    directory raises CheckpointError. Float tensors are rounded to `dtype` (the QuantLinear
    scales stay float32); `backend` and `cache_dequant` are passed to every QuantLinear.
    `stack`: the layers that read one norm's output (q, k, v; gate, up: the family's
    `residual_layout`) run as one stacked layer where their quantization matches
    (`kernels.stacked_linears`; same math, one GEMM; the state dict keeps its names).
    """
    check_backend_name(backend)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a model directory")
    config = read_json(directory / CONFIG)
    qconfig = _parse_quantization_config(config, directory)
    probe = probe_model(_builder_config(config))  # names and shapes only: no memory
    embeddings = embedding_targets(probe)
    schemes = _layer_schemes(probe, qconfig, directory, embeddings)
    section = _parse_faircalib_section(config.get("faircalib", {}), schemes, directory)
    tensors = load_tensors(directory)
    layers, used = _validated_layers(probe, schemes, section, tensors, directory, embeddings)
    floats = _validated_floats(probe, schemes, tensors, used, directory, embeddings)
    # validation is over: from here on nothing can fail on account of the files.
    state = {k: v.to(dtype) for k, v in floats.items()}
    for name, layer in layers.items():
        if name in embeddings:  # dequantized once into the float parameter (exact in float32)
            codes, qp, _, _ = layer  # (embeddings take no activation quantization)
            state[f"{name}.{embeddings[name]}"] = dequantize(codes, qp).to(dtype)
    model = _float_model(probe, config, state, dtype)
    kernel = {"backend": backend, "cache_dequant": cache_dequant}
    quantizes_activations = False
    for name, layer in layers.items():
        if name in embeddings:
            continue
        linear = model.get_submodule(name)
        bias = None if linear.bias is None else linear.bias.detach()
        if isinstance(layer, W8A8Layer):
            quant = w8a8_quant_linear(layer, bias, **kernel)
            quantizes_activations = True
        else:
            codes, qp, input_scale, act = layer
            quantizes_activations |= act is not None
            act_bits, act_format = act or (None, "int")
            quant = QuantLinear.from_codes(
                codes,
                qp,
                bias=bias,
                input_scale=input_scale,
                act_bits=act_bits,
                act_format=act_format,
                **kernel,
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, quant)
    if quantizes_activations:  # q, k, v (gate, up) quantize their shared input once
        share_activations(model.blocks)
    if stack:
        stack_readers(model)
    return model.to(device).eval()


def stack_readers(model: DiffusionLM) -> StackReport:
    """Stack the linears that read one norm's output (`DiffusionLM.residual_layout`; none for
    a family that declares no layout) where their layers allow (`kernels.stacked_linears`).
    Every block then drops, after its forward (also one that raised), any stacked result its
    members did not all take. The report is kept as `model.stack_report`."""
    layout = model.residual_layout()
    groups = [] if layout is None else [nr.readers for nr in layout.norms]
    report = stack_linears(model, groups)
    for block in model.blocks:
        members = [m for m in block.modules() if isinstance(m, StackedMember)]
        if members:
            block.register_forward_hook(_releaser(members), always_call=True)
    model.stack_report = report
    return report


def _releaser(members: list[StackedMember]) -> Any:
    def release(_module: nn.Module, _args: Any, _output: Any) -> None:
        for member in members:
            member.release_pending()

    return release


def _float_model(
    probe: DiffusionLM, config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype
) -> DiffusionLM:
    """The model with its float tensors loaded and kept in `dtype` (the embedding, norms and
    unquantized layers then run in the checkpoint dtype, and QuantLinear layers see inputs of
    that dtype: a bf16 load must not compute in float32). As models.io.load_model: the meta
    `probe` takes the tensors as they are (no random init, no float32 copy of an 8B model)
    unless the family computes buffers at construction; the quantized linears' weights stay
    on the meta device until QuantLinear layers replace them."""
    if _recomputed_buffers(probe):
        model = build_model(_builder_config(config))
        model.load_state_dict(state, strict=False)
        _cast_checkpoint_tensors(model, dtype)
        return model
    model = probe.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    return model


def _builder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config our family builders read: without the model_type `model_config` added for
    stock readers (a source model's own model_type stays: its builder knows it)."""
    native = NATIVE_MODEL_TYPE.format(family=config.get("family"))
    return {k: v for k, v in config.items() if not (k == "model_type" and v == native)}


def _parse_quantization_config(config: dict[str, Any], directory: Path) -> QuantizationConfig:
    raw = config.get("quantization_config")
    if not isinstance(raw, dict) or raw.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{directory}/config.json has no compressed-tensors quantization_config"
        )
    try:
        qconfig = QuantizationConfig.model_validate(raw)
    except ValidationError as exc:  # pydantic's message spans lines: keep the first problem
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "(top level)"
        raise CheckpointError(
            f"{directory}: invalid quantization_config at {where}: {first.get('msg')} "
            f"({exc.error_count()} problem(s)); {REDO}"
        ) from exc
    known = (PACK_FORMAT, INT_FORMAT, FLOAT_FORMAT, MIXED_FORMAT)
    if qconfig.format not in known:
        raise CheckpointError(
            f"{directory}: format {qconfig.format!r} is not supported, only {known}; "
            "re-export the model with faircalib quantize --format packed"
        )
    return qconfig


@dataclass(frozen=True)
class ActArgs:
    """A pack-quantized group that also quantizes its inputs per token: the weight grid and
    the activation kind (a key of `PACKED_ACT_PRESETS`)."""

    weights: QuantizationArgs
    act: str


def _check_scheme(
    group: str, scheme: QuantizationScheme, directory: Path, top_format: str | None = None
) -> QuantizationArgs | ActArgs | str:
    """A group's weight QuantizationArgs (weight-only, pack-quantized), its `ActArgs`
    (pack-quantized with per-token input activations), or the W8A8 kind ("int8" / "fp8") of
    an int-/float-quantized group."""
    if top_format not in (None, MIXED_FORMAT) and scheme.format not in (None, top_format):
        # readers that go by the top-level format (vLLM) would read this group differently
        raise CheckpointError(
            f"{directory}: config group {group}'s format {scheme.format!r} is not supported "
            f"under the config's format {top_format!r}; {REDO}"
        )
    packed_acts = scheme.input_activations is not None and (
        (scheme.format or top_format) == PACK_FORMAT
    )
    if scheme.input_activations is not None and not packed_acts:
        return _check_w8a8_scheme(group, scheme, directory, top_format)
    args = scheme.weights
    problems = []
    if args is None:
        problems.append("it quantizes no weights")
    elif args.type != "int" or not 2 <= args.num_bits <= 8:
        problems.append(f"weights are {args.type}{args.num_bits}, not int2..int8")
    elif args.strategy not in ("group", "channel") or args.dynamic:
        problems.append(
            f"weight strategy {args.strategy!r} (dynamic={args.dynamic}) is not group/channel"
        )
    act = _packed_act_kind(scheme.input_activations) if packed_acts else None
    if packed_acts and act is None:
        problems.append(
            "its input_activations are none of compressed-tensors' W4A8 / W4AFP8 / W4A4 "
            "dynamic per-token presets"
        )
    if scheme.output_activations is not None:
        problems.append("output activations are not quantized by any faircalib layer")
    if (scheme.format or top_format) != PACK_FORMAT:
        problems.append(f"format {scheme.format or top_format!r}")
    if problems:
        raise CheckpointError(
            f"{directory}: config group {group} is unsupported: {'; '.join(problems)}; {REDO}"
        )
    return ActArgs(args, act) if act is not None else args


def _packed_act_kind(acts: QuantizationArgs) -> str | None:
    """The `PACKED_ACT_PRESETS` kind whose input_activations `acts` equals, or None."""
    for act, preset in PACKED_ACT_PRESETS.items():
        if _same_args(acts, preset["input_activations"]):
            return act
    return None


def _check_w8a8_scheme(
    group: str, scheme: QuantizationScheme, directory: Path, top_format: str | None
) -> str:
    """The W8A8 kind of a group equal to compressed-tensors' INT8_W8A8 / FP8_DYNAMIC preset
    (what QuantLinear / FP8ActLinear compute) in its own format; anything else is refused."""
    fmt = scheme.format or top_format
    for kind, (kind_format, preset) in W8A8_KINDS.items():
        if (
            _same_args(scheme.weights, preset["weights"])
            and _same_args(scheme.input_activations, preset["input_activations"])
            and scheme.output_activations is None
            and fmt == kind_format
        ):
            return kind
    raise CheckpointError(
        f"{directory}: config group {group} quantizes activations but is not W8A8 INT8 "
        f"(int-quantized) or FP8 (float-quantized) with symmetric per-channel weights and "
        f"dynamic per-token activations (format {fmt!r}); {REDO}"
    )


_ARGS_FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")


def _same_args(args: QuantizationArgs | None, preset: QuantizationArgs) -> bool:
    if args is None:
        return False
    return all(getattr(args, f) == getattr(preset, f) for f in _ARGS_FIELDS)


def _layer_schemes(
    model: DiffusionLM,
    qconfig: QuantizationConfig,
    directory: Path,
    embeddings: Mapping[str, str] | None = None,
) -> dict[str, QuantizationArgs | ActArgs | str]:
    """Layer name -> its weight QuantizationArgs (or ActArgs, or W8A8 kind): the Linear layers
    (and the embeddings in `embeddings`) each group's targets match, each by one group."""
    embeddings = embeddings or {}
    schemes: dict[str, QuantizationArgs | ActArgs | str] = {}
    for group, scheme in qconfig.config_groups.items():
        args = _check_scheme(group, scheme, directory, qconfig.format)
        # as compressed-tensors and vLLM apply a scheme: to the Linear layers its targets
        # match, and here to an embedding a target names exactly (as `--quantize-head` writes
        # it); a regular expression over names also matches containers, norms, embeddings and
        # Dream's mlp.act_fn ("re:.*"), which it leaves alone
        matched = [
            (name, module)
            for name, module in match_named_modules(model, scheme.targets, qconfig.ignore)
            if isinstance(module, nn.Linear) or (name in embeddings and name in scheme.targets)
        ]
        unmatched = [
            t
            for t in scheme.targets
            if not any(is_match(n, m, t) for n, m in model.named_modules())
        ]
        if unmatched:
            raise CheckpointError(
                f"{directory}: config group {group} targets modules the model "
                f"lacks: {unmatched[:5]}; {REDO}"
            )
        if not matched:
            raise CheckpointError(
                f"{directory}: config group {group}'s targets {scheme.targets[:5]} match no "
                f"Linear layer; {REDO}"
            )
        for name, _ in matched:
            if name in schemes:
                raise CheckpointError(
                    f"{directory}: {name} is targeted by more than one config group; {REDO}"
                )
            if not isinstance(args, QuantizationArgs) and name in embeddings:
                raise CheckpointError(
                    f"{directory}: embedding {name} in an activation-quantizing group; {REDO}"
                )
            in_features = _layer_shape(model, name, embeddings)[1]
            weights = args.weights if isinstance(args, ActArgs) else args
            if isinstance(weights, QuantizationArgs) and (
                weights.strategy == "group" and in_features % weights.group_size
            ):
                raise CheckpointError(
                    f"{directory}: group size {weights.group_size} does not divide "
                    f"{name}'s {in_features} input features; {REDO}"
                )
            schemes[name] = args
    return schemes


def _parse_faircalib_section(
    section: dict[str, Any], schemes: dict[str, QuantizationArgs], directory: Path
) -> dict[str, Any]:
    smoothed = section.get(INPUT_SCALE, [])
    act_bits = section.get("act_bits", {})
    if not isinstance(smoothed, list) or not isinstance(act_bits, dict):
        raise CheckpointError(f"{directory}: faircalib.input_scale must be a list, act_bits a dict")
    unknown = sorted((set(smoothed) | set(act_bits)) - set(schemes))
    if unknown:
        raise CheckpointError(
            f"{directory}: faircalib section names layers that are not quantized: {unknown[:5]}"
        )
    for name, bits in act_bits.items():
        if not isinstance(bits, int) or not 2 <= bits <= 16:
            raise CheckpointError(
                f"{directory}: act_bits of {name} must be an integer in 2..16, got {bits!r}"
            )
    return {INPUT_SCALE: set(smoothed), "act_bits": act_bits}


def _check_tensor(
    key: str, t: torch.Tensor | None, shape: tuple[int, ...], kind: str, where: Path
) -> None:
    if t is None:
        raise CheckpointError(f"{where}: tensor {key} is missing; {REDO}")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"{where}: {key} has shape {tuple(t.shape)}, the config implies {tuple(shape)}; {REDO}"
        )
    ok = {
        "int32": t.dtype == torch.int32,
        "int": t.dtype in (torch.int32, torch.int64),
        "float": t.is_floating_point(),
    }[kind]
    if not ok:
        raise CheckpointError(f"{where}: {key} has dtype {t.dtype}, expected {kind}; {REDO}")
    if kind == "float" and not all_finite(t):
        raise CheckpointError(f"{where}: {key} contains NaN or Inf values; {REDO}")


def _validated_layers(
    model: DiffusionLM,
    schemes: dict[str, QuantizationArgs],
    section: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    where: Path,
    embeddings: Mapping[str, str] | None = None,
) -> tuple[dict[str, tuple], set[str]]:
    """Check and decode every quantized layer: name -> (codes, QParams, input_scale, act) with
    act = (act_bits, act_format) or None (a W8A8 layer: its W8A8Layer), and the set of tensor
    names they consumed."""
    layers, used = {}, set()
    for name, args in schemes.items():
        out_f, in_f = _layer_shape(model, name, embeddings or {})
        if isinstance(args, str):
            layers[name] = _validated_w8a8(name, args, (out_f, in_f), tensors, used, where)
            continue
        act = _layer_act(name, args, section, where)
        args = args.weights if isinstance(args, ActArgs) else args
        parts = {}
        for suffix, (shape, kind) in expected_specs(out_f, in_f, args).items():
            key = f"{name}.{suffix}"
            _check_tensor(key, tensors.get(key), shape, kind, where)
            parts[suffix] = tensors[key]
            used.add(key)
        if tuple(int(v) for v in parts["weight_shape"]) != (out_f, in_f):
            raise CheckpointError(
                f"{where}: {name}.weight_shape is {parts['weight_shape'].tolist()}, "
                f"the model's layer is {[out_f, in_f]}; {REDO}"
            )
        if not (parts["weight_scale"] > 0).all():
            raise CheckpointError(
                f"{where}: {name}.weight_scale has non-positive (zero or negative) scales; {REDO}"
            )
        input_scale = None
        if name in section[INPUT_SCALE]:
            key = f"{name}.{INPUT_SCALE}"
            _check_tensor(key, tensors.get(key), (in_f,), "float", where)
            input_scale = tensors[key].float()
            used.add(key)
            if not (input_scale > 0).all():
                raise CheckpointError(f"{where}: {key} has non-positive entries; {REDO}")
        codes, qp = unpack_layer(parts, args)
        layers[name] = (codes, qp, input_scale, act)
    return layers, used


def _layer_act(
    name: str, args: QuantizationArgs | ActArgs, section: dict[str, Any], where: Path
) -> tuple[int, str] | None:
    """(act_bits, act_format) of a pack-quantized layer: its group's input_activations, or a
    format-1 directory's faircalib.act_bits (INT); never both."""
    legacy = section["act_bits"].get(name)
    if isinstance(args, ActArgs):
        if legacy is not None:
            raise CheckpointError(
                f"{where}: {name} has input_activations and faircalib.act_bits; {REDO}"
            )
        return PACKED_ACT_QUANT[args.act]
    return None if legacy is None else (legacy, "int")


def _validated_w8a8(
    name: str,
    kind: str,
    shape: tuple[int, int],
    tensors: dict[str, torch.Tensor],
    used: set[str],
    where: Path,
) -> W8A8Layer:
    """A W8A8 layer's `weight` (int8 / e4m3 [out, in]) and `weight_scale` (float [out, 1]),
    checked: dtypes, shapes, finite values, positive scales."""
    values, scale = tensors.get(f"{name}.weight"), tensors.get(f"{name}.weight_scale")
    _check_tensor(f"{name}.weight_scale", scale, (shape[0], 1), "float", where)
    if values is None or tuple(values.shape) != shape:
        got = None if values is None else tuple(values.shape)
        raise CheckpointError(f"{where}: {name}.weight has shape {got}, expected {shape}; {REDO}")
    if values.dtype != W8A8_VALUE_DTYPES[kind]:
        raise CheckpointError(
            f"{where}: {name}.weight has dtype {values.dtype}, W8A8 {kind} stores "
            f"{W8A8_VALUE_DTYPES[kind]}; {REDO}"
        )
    if kind == "fp8" and not all_finite(values.float()):
        raise CheckpointError(f"{where}: {name}.weight contains NaN values; {REDO}")
    if not (scale > 0).all():
        raise CheckpointError(f"{where}: {name}.weight_scale has non-positive scales; {REDO}")
    used.update({f"{name}.weight", f"{name}.weight_scale"})
    scale = scale.float()
    return W8A8Layer(kind, values, scale, None)  # the decoded weight is not kept


def _validated_floats(
    model: DiffusionLM,
    schemes: dict[str, QuantizationArgs],
    tensors: dict[str, torch.Tensor],
    used: set[str],
    where: Path,
    embeddings: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """The float tensors: exactly the model's state dict minus the quantized weights; any
    tensor that is neither one of them nor consumed by a quantized layer is refused."""
    embeddings = embeddings or {}
    quantized_weights = {f"{name}.{embeddings.get(name, 'weight')}" for name in schemes}
    expected = {k: v for k, v in model.state_dict().items() if k not in quantized_weights}
    extra = sorted(set(tensors) - set(expected) - used)
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensors not in the model config: {extra[:5]}; {REDO}"
        )
    for key, ref in expected.items():
        _check_tensor(key, tensors.get(key), tuple(ref.shape), "float", where)
    return {k: tensors[k] for k in expected}
