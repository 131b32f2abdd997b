"""Which block linears get quantized: include / exclude glob patterns on full layer names.

A layer's full name is `<stack>.<i>.<name within the block>` (`blocks.0.attn_qkv`,
`blocks.3.mlp.2`, LLaDA's `blocks.5.q_proj`, PLANNER's prior `prior_blocks.1.mlp.0`), the names
`quantize`'s layer table prints.
Patterns are `fnmatch` globs (`*` also crosses dots): a layer is quantized when it matches some
`include` pattern (no include: every layer) and no `exclude` pattern. Embeddings and the output
layer are never among a model's `quantizable_linears`, so they stay in float whatever the
patterns say.

Two ways in:
* the engine filters each block's linears with `select_linears(model.quantizable_linears(block),
  i, calib_cfg)` (`calib_cfg.include` / `calib_cfg.exclude`);
* `restrict(model, include, exclude)` narrows `model.quantizable_linears` itself for a block of
  code, so everything that asks the model which layers are quantizable (layer checks, the
  engine, FAIR-Calib's noise model, resumable progress) sees the same selection.
"""

from __future__ import annotations

import contextlib
import fnmatch
import types
from collections.abc import Iterator, Sequence
from typing import Any

from faircalib.errors import ConfigError


def layer_selected(
    name: str, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> bool:
    """Whether the layer with full name `name` is quantized under the patterns."""
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def select_linears(linears: list[tuple[str, Any]], index: int, cfg: Any) -> list[tuple[str, Any]]:
    """The (name within block, module) pairs of block `index` that `cfg.include` /
    `cfg.exclude` (a CalibConfig; absent attributes mean no pattern) select."""
    include, exclude = getattr(cfg, "include", None), getattr(cfg, "exclude", None)
    if not include and not exclude:
        return linears
    return [(n, m) for n, m in linears if layer_selected(f"blocks.{index}.{n}", include, exclude)]


def check_patterns(patterns: Sequence[str] | None, flag: str) -> list[str] | None:
    """Patterns as a list of non-empty strings (None stays None), else one ConfigError line."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise ConfigError(f"{flag} takes glob patterns such as 'blocks.*.mlp.*', got {bad!r}")
    return list(patterns)


def selected_layers(
    model: Any, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(selected, left out) full names of `model`'s quantizable linears. Refuses patterns that
    select nothing, or an include pattern that matches no layer (a typo would otherwise quietly
    quantize less than asked)."""
    names = [
        f"{prefix}.{n}"
        for prefix, block in model.named_calib_blocks()  # extra stacks (PLANNER's prior) too
        for n, _ in type(model).quantizable_linears(model, block)
    ]
    for p in include or []:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ConfigError(
                f"--include {p!r} matches no quantizable layer; names look like {names[0]!r} "
                f"(all {len(names)}: blocks.<i>.<{', '.join(_short(names))}>)"
            )
    chosen = [n for n in names if layer_selected(n, include, exclude)]
    if not chosen:
        raise ConfigError("--include / --exclude leave no layer to quantize")
    return chosen, [n for n in names if n not in chosen]


def _short(names: list[str]) -> list[str]:
    return sorted({n.split(".", 2)[2] for n in names})


def _restricted_linears(self: Any, block: Any) -> list[tuple[str, Any]]:
    include, exclude = self._faircalib_selection
    prefix = next(p for p, b in self.named_calib_blocks() if b is block)
    linears = type(self).quantizable_linears(self, block)
    return [(n, m) for n, m in linears if layer_selected(f"{prefix}.{n}", include, exclude)]


@contextlib.contextmanager
def restrict(
    model: Any, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> Iterator[Any]:
    """Within the block, `model.quantizable_linears(block)` returns only the selected layers.
    A bound method on the instance, so deep copies of the model (FAIR-Calib's noisy copy and
    teacher) carry the same selection. No patterns: nothing changes."""
    if not include and not exclude:
        yield model
        return
    model._faircalib_selection = (list(include or []), list(exclude or []))
    model.quantizable_linears = types.MethodType(_restricted_linears, model)
    try:
        yield model
    finally:
        del model.quantizable_linears
        del model._faircalib_selection
