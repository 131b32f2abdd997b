"""The one interface every diffusion LM adapter implements.

A masked diffusion LM maps a partly masked sequence `x_t` (and, optionally, its noise
level `t`) to a distribution over the clean token at every position. Everything else in the
toolkit - samplers, the likelihood bound, layer-wise calibration - talks to models only
through this class, so a new dLLM family needs one adapter file and nothing else.

Layer-wise calibration needs to run a model one block at a time, so the forward pass is
split into three declared stages:

    h, ctx = model.stem(x_t, t)          # embeddings + anything blocks need (rotary, conditioning)
    for block in model.blocks:
        h = block(h, ctx)                 # every block has this signature
    log_probs = model.head(h, ctx, x_t)   # final norm, output projection, parameterisation

`quantizable_linears(block)` names the linear layers of a block in execution order.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from faircalib.errors import CheckpointError


@dataclass
class BlockContext:
    """Per-forward data shared by all blocks (never quantized, never calibrated)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> BlockContext:
        return BlockContext({k: v.to(device) for k, v in self.tensors.items()})

    def select(self, index: torch.Tensor | slice) -> BlockContext:
        """Rows `index` of every per-sequence tensor (those with a leading batch dim)."""
        out = {}
        for k, v in self.tensors.items():
            out[k] = v[index] if k.startswith("batch_") else v
        return BlockContext(out)


class DiffusionLM(nn.Module, ABC):
    """A masked (absorbing-state) diffusion language model.

    Attributes every adapter sets:
        vocab_size: size of the output distribution, mask token included.
        mask_id: id of the absorbing [MASK] token.
        seq_len: the sequence length the model was trained at.
        blocks: `nn.ModuleList` of transformer blocks, called as `block(h, ctx)`.
    """

    family: str = "base"
    vocab_size: int
    mask_id: int
    seq_len: int
    blocks: nn.ModuleList

    # --- the three stages -------------------------------------------------------------
    @abstractmethod
    def stem(self, x_t: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, BlockContext]:
        """x_t: [B, L] token ids, t: [B] in [0, 1] or None -> hidden [B, L, D], context."""

    @abstractmethod
    def head(self, h: torch.Tensor, ctx: BlockContext, x_t: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, D] -> log-probabilities [B, L, V] over clean tokens."""

    @abstractmethod
    def quantizable_linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        """The block's linear layers to quantize, as (name within block, module), in execution order."""

    # --- derived API --------------------------------------------------------------------
    def log_probs(self, x_t: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: [B, L] -> log p(x_0 | x_t): [B, L, V]. Committed (unmasked) positions are
        one-hot on their own token and the mask token always has probability 0 (SUBS)."""
        h, ctx = self.stem(x_t, t)
        for block in self.blocks:
            h = block(h, ctx)
        return self.head(h, ctx, x_t)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_probs(x_t, t)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def outside_blocks(self) -> list[nn.Module]:
        """The stem and head modules: the largest submodules that contain no block.

        Offloaded calibration keeps these on the device and moves blocks one at a time. In
        families whose blocks sit deeper in the tree (LLaDA: `model.transformer.blocks`), a
        top-level child contains the blocks, so `children()` is not the answer.
        (Parameters registered directly on a container that holds blocks are not covered; no
        family has any.)
        """
        blocks = self.blocks
        found: list[nn.Module] = []

        def walk(module: nn.Module) -> None:
            for child in module.children():
                if child is blocks:
                    continue
                if any(m is blocks for m in child.modules()):
                    walk(child)
                else:
                    found.append(child)

        walk(self)
        return found

    # --- persistence ----------------------------------------------------------------------
    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """JSON-serialisable config from which `from_config` rebuilds the same architecture."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> DiffusionLM:
        """Build a randomly initialised model from `config_dict()` output."""


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation (Sahoo et al. 2024): no mass on [MASK]; unmasked tokens carried over.

    logits: [B, L, V], x_t: [B, L] -> log-probs [B, L, V] (float32).
    """
    # made on the device (no host-to-device copy), so a CUDA graph can capture the forward
    mask_col = torch.full((1,), mask_id, device=logits.device, dtype=torch.long)
    log_probs = torch.log_softmax(logits.float().index_fill(-1, mask_col, float("-inf")), dim=-1)
    committed = (x_t != mask_id).unsqueeze(-1)  # [B, L, 1]
    carried = torch.full_like(log_probs, float("-inf")).scatter(-1, x_t.unsqueeze(-1), 0.0)
    return torch.where(committed, carried, log_probs)


# config, index and metadata files are kilobytes (an 8B model's index: ~100 KB); anything
# far larger is not one, and is refused before it is read
MAX_JSON_BYTES = 16 * 2**20
REDO = "re-download or re-export the checkpoint"


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in a model file; a missing, oversized, undecodable or non-object file
    is one CheckpointError line."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(
                f"{path} is {size:,} bytes, over the {max_bytes:,} a JSON metadata file may be; "
                f"it is not a valid model file: {REDO}"
            )
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{path} is missing; pass a complete model directory (config.json, safetensors "
            "weights, tokenizer.json)"
        ) from exc
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror or exc}); {REDO}") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError included
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not valid JSON ({reason}); {REDO}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(obj).__name__}, not an object of fields; {REDO}"
        )
    return obj


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)
