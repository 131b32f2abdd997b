"""QuaRot's offline residual-stream rotation, applied to a model that declares its layout.

The join of `quant.rotation` (the math) with `DiffusionLM.residual_layout` (which modules write
and read the stream). For one randomized Hadamard Q of the model width:

1. every RMS norm's scale g is folded into the columns of the linears that read it
   (W -> W diag(g)) and set to 1; an RMS norm without scale commutes with Q (rms(x Q) = rms(x));
2. the embedding's rows are rotated (E -> E Q), every writer's output too (W -> Q^T W,
   b -> b Q), so the stream carries h Q instead of h;
3. every reader (q, k, v, gate, up, the output layer) is folded with Q (W -> W Q).

In exact arithmetic the model's outputs do not change. The readers' inputs then arrive already
rotated, so QuaRot-style activation quantization needs no online Hadamard in front of them
(`reads_rotated_stream` marks them); the other linears (attention output, down projection:
their inputs come from attention and SwiGLU, not from the stream) keep their own online
rotation. A tied output layer is the embedding matrix itself and already reads E Q; only a
final norm whose scale is not one constant cannot be absorbed by it, and then the output layer
is untied first (`ResidualLayout.untie_head`: V x D more float weights).

Precision: every fold is computed in float64. A folded tensor is then stored in the narrowest
float dtype that held its original exactly (bfloat16 for a bf16 checkpoint calibrated in
float32), so a directory saved in the checkpoint's dtype holds exactly the model that was
calibrated and reloads bit for bit (`keep_precision`; off: the parameter's own dtype).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from faircalib.errors import ConfigError
from faircalib.models.base import DiffusionLM, NormReaders, ResidualLayout
from faircalib.quant.rotation import (
    Rotation,
    fold_embedding_rotation,
    fold_input_rotation,
    fold_norm_scale,
    fold_output_rotation,
    random_hadamard,
)

_MARK = "_faircalib_reads_rotated_stream"
_NARROW = (torch.bfloat16, torch.float16)


@dataclass
class ResidualFold:
    """What `fold_residual_rotation` did (recorded in quantization.json)."""

    folded: bool
    reason: str | None = None  # why not, when not folded
    seed: int | None = None
    width: int | None = None  # model width D = Q's size
    hadamard_block: int | None = None  # D itself, or the block-diagonal fallback's block
    norms: int = 0  # RMS norms whose scale went into their readers (final norm included)
    readers: int = 0  # linears folded with Q (output layer included)
    writers: int = 0  # linears folded with Q^T
    untied_head: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def reads_rotated_stream(module: nn.Module) -> bool:
    """Whether `module` is a linear whose input is the rotated residual stream (its weight
    already folded with Q): it needs no online rotation."""
    return bool(getattr(module, _MARK, False))


@torch.no_grad()
def fold_residual_rotation(
    model: DiffusionLM, seed: int = 0, *, keep_precision: bool = True
) -> ResidualFold:
    """Rotate `model`'s residual stream by one randomized Hadamard Q (`random_hadamard(D,
    seed)`), in place, if its family declares a `residual_layout`; the outputs are unchanged
    up to float rounding. Returns what was done; `folded` False (and the model untouched) for
    a family that declares no layout."""
    layout = model.residual_layout()
    if layout is None:
        return ResidualFold(
            False,
            reason=f"the {model.family} family declares no residual layout: every rotation "
            "runs online",
        )
    _check(model, layout)  # before anything changes: a refused model stays as it was
    table = _param(model, layout.embedding, "weight")
    rot = random_hadamard(table.shape[1], seed=seed).to(table.device)
    head, untied = _output_layer(model, layout)
    groups = [(nr.norm, nr.readers) for nr in layout.norms]
    if head is not None:  # the final norm's scale goes into the output layer
        groups.append((layout.final_norm, (head,)))
    readers = 0
    for norm, linears in groups:
        scale = _param(model, norm, "weight")
        for path in linears:
            _fold_reader(_linear(model, path), scale, rot, keep_precision)
        scale.fill_(1.0)
        readers += len(linears)
    _store(table, fold_embedding_rotation(table.double(), rot), keep_precision)
    for path in layout.writers:
        _fold_writer(_linear(model, path), rot, keep_precision)
    return ResidualFold(
        True,
        seed=seed,
        width=rot.width,
        hadamard_block=rot.block,
        norms=len(groups),
        readers=readers,
        writers=len(layout.writers),
        untied_head=untied,
    )


def _check(model: DiffusionLM, layout: ResidualLayout) -> None:
    """Every declared tensor exists and every linear is still a float nn.Linear."""
    width = _param(model, layout.embedding, "weight").shape[1]
    for nr in (*layout.norms, NormReaders(layout.final_norm, ())):
        if _param(model, nr.norm, "weight").shape != (width,):
            raise ConfigError(f"residual layout: {nr.norm} is not {width} wide")
    paths = [p for nr in layout.norms for p in nr.readers] + list(layout.writers)
    for path in paths + ([layout.head] if layout.head is not None else []):
        _linear(model, path)


def _output_layer(model: DiffusionLM, layout: ResidualLayout) -> tuple[str | None, bool]:
    """(path of the output Linear to fold, whether it was untied for that). A tied output
    layer reads E Q with the embedding; it needs its own weight only when the final norm's
    scale c * 1 is not constant, since diag(g) does not commute with Q but c I does."""
    if layout.head is not None:
        return layout.head, False
    scale = _param(model, layout.final_norm, "weight")
    if bool((scale == scale[0]).all()):
        return None, False
    if layout.untie_head is None:
        raise ConfigError(
            f"the {model.family} family ties its output layer to the embedding and declares no "
            "way to untie it, so its final norm's scale cannot be folded"
        )
    return layout.untie_head(), True


def _fold_reader(linear: nn.Linear, scale: torch.Tensor, rot: Rotation, keep: bool) -> None:
    weight = fold_input_rotation(fold_norm_scale(linear.weight.double(), scale.double()), rot)
    _store(linear.weight, weight, keep)
    setattr(linear, _MARK, True)


def _fold_writer(linear: nn.Linear, rot: Rotation, keep: bool) -> None:
    bias = None if linear.bias is None else linear.bias.double()
    weight, bias = fold_output_rotation(linear.weight.double(), bias, rot)
    _store(linear.weight, weight, keep)
    if bias is not None:
        _store(linear.bias, bias, keep)


def _store(param: torch.Tensor, value: torch.Tensor, keep_precision: bool) -> None:
    """param <- value (float64), rounded first to the narrowest dtype that held param exactly
    (unless that overflows: float16's range is small)."""
    if keep_precision:
        narrow = value.to(_exact_dtype(param))
        value = narrow if bool(torch.isfinite(narrow).all()) else value
    param.copy_(value.to(param.dtype))


def _exact_dtype(t: torch.Tensor) -> torch.dtype:
    """The narrowest of bfloat16 / float16 that represents every entry of t exactly, else
    t's own dtype (a float32 model loaded from a bf16 checkpoint: bfloat16)."""
    for dtype in _NARROW:
        if dtype.itemsize < t.dtype.itemsize and torch.equal(t.to(dtype).to(t.dtype), t):
            return dtype
    return t.dtype


def _param(model: nn.Module, path: str, name: str) -> torch.Tensor:
    value = getattr(model.get_submodule(path), name, None)
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"residual layout: {path} has no {name} tensor")
    return value


def _linear(model: nn.Module, path: str) -> nn.Linear:
    module = model.get_submodule(path)
    if type(module) is not nn.Linear:
        raise ConfigError(
            f"residual layout: {path} is a {type(module).__name__}, not a float nn.Linear; "
            "fold the residual rotation before quantizing"
        )
    return module
