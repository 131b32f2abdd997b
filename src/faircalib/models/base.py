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
`extra_block_stacks()` declares further block stacks that calibration walks the same way (a
latent prior inside the stem, say); the default is none. `residual_layout()` optionally declares
how the residual stream is written and read, so a rotation of it can be folded offline
(QuaRot); the default None means it cannot be.
"""

from __future__ import annotations

import json
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from faircalib.errors import CheckpointError, ConfigError


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


@dataclass(frozen=True)
class VocabLayer:
    """One vocabulary-sized weight [V, D] of a model: the input embedding, the output
    projection, or one matrix that is both (tied).

    module: dotted path of the module holding it; param: the parameter's name in that module
    (`weight` for nn.Embedding / nn.Linear; MDLM's raw `embedding`). Rows are tokens, columns
    the hidden dim, so quantization groups run along D within one token's row, like a Linear's
    groups along its input features."""

    role: str  # "embedding", "output" or "tied"
    module: str
    param: str = "weight"

    @property
    def key(self) -> str:
        """The state-dict key of the weight."""
        return f"{self.module}.{self.param}"


@dataclass(frozen=True)
class VocabLayers:
    """What a family declares about its vocabulary layers (`DiffusionLM.vocab_layers`).

    layers: the embedding and output projection (one "tied" entry when they are one matrix).
    refusal: None when they may be quantized; else one line saying why not (then `layers`
    still names them, for byte accounting)."""

    layers: tuple[VocabLayer, ...]
    refusal: str | None = None


@dataclass(frozen=True)
class BlockStack:
    """A stack of blocks besides `DiffusionLM.blocks` that layer-wise calibration walks with
    the same code (`DiffusionLM.extra_block_stacks`).

    name: the stack's module path (e.g. `prior_blocks`), used in layer names
        (`<name>.<i>.<linear>`); blocks: its modules, each called as `block(h, ctx)`, whose
        linears `DiffusionLM.quantizable_linears(block)` names.
    inputs(x_t, t): the first block's input for a calibration batch - token ids [B, L] and
        levels [B], exactly what `stem` receives - as hidden states [B, R, D] and a context;
        R rows per sequence (need not be L).
    row_weights(weights): the calibration's per-token row weights [N, L] -> [N, R], the
        weight of each of the stack's rows in its layers' statistics.
    """

    name: str
    blocks: nn.ModuleList
    inputs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, BlockContext]]
    row_weights: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NormReaders:
    """An RMS norm of the residual stream, y = g * x / rms(x) (no centring, no bias), and the
    linears that read its output. Paths are module paths from the model's root; the norm's
    scale g is its `weight` [D]."""

    norm: str
    readers: tuple[str, ...]


@dataclass(frozen=True)
class ResidualLayout:
    """How a pre-norm family's residual stream is written and read
    (`DiffusionLM.residual_layout`), so that one orthogonal rotation of the stream can be
    folded into the weights offline (QuaRot; `calib.residual_rotation`).

    Exactly these ops touch the stream: the embedding writes its rows into it; each `writers`
    linear adds its output to it; each `norms` entry (and `final_norm`) reads it through an RMS
    norm whose output feeds only its readers (`head` for the final norm). Nothing else may read
    or modify the stream (no centring, no per-channel modulation, no gates), or the fold is
    wrong: a family that cannot promise this declares no layout.

    embedding: module path whose `weight` [V, D] rows start the stream.
    head: the output Linear reading final_norm(h); None when the output layer is the embedding
        matrix itself (tied). untie_head: tied families only: gives the output layer its own
        weight (a copy of the embedding's, architecture and config updated) and returns its
        path; the fold calls it when the final norm's scale is not one constant, which a tied
        matrix cannot absorb."""

    embedding: str
    norms: tuple[NormReaders, ...]
    writers: tuple[str, ...]
    final_norm: str
    head: str | None
    untie_head: Callable[[], str] | None = None


class DiffusionLM(nn.Module, ABC):
    """A masked (absorbing-state) diffusion language model.

    Attributes every adapter sets:
        vocab_size: size of the output distribution, mask token included.
        mask_id: id of the absorbing [MASK] token.
        seq_len: the sequence length the model was trained at.
        blocks: `nn.ModuleList` of transformer blocks, called as `block(h, ctx)`.
        max_positions: the longest sequence the model can take at all: the length of a learned
            position table (DiffusionLM, PLANNER); None (the default) where positions are
            rotary and any length runs, however far past `seq_len` it was trained.
    """

    family: str = "base"
    vocab_size: int
    mask_id: int
    seq_len: int
    blocks: nn.ModuleList
    max_positions: int | None = None

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

    def checkpoint_tensors(
        self, tensors: dict[str, torch.Tensor], source: str
    ) -> dict[str, torch.Tensor]:
        """A float checkpoint's tensors as this model names them, before they are checked
        against it: upstream may store what the model recomputes or ties (LLaDA / Dream:
        rotary `inv_freq` buffers, a copy of the tied output layer). Default: as stored."""
        return tensors

    def extra_block_stacks(self) -> list[BlockStack]:
        """Block stacks that calibration quantizes besides `blocks`, in the order the forward
        runs them (all of them run inside `stem`, before `blocks`). Default: none, so a family
        that declares none calibrates exactly as before. PLANNER declares its latent prior."""
        return []

    def named_calib_blocks(self) -> list[tuple[str, nn.Module]]:
        """Every block calibration quantizes, with the prefix of its layers' full names, in
        the order the engine walks them: extra stacks (`<stack>.<i>`), then `blocks.<i>`."""
        extra = [
            (f"{stack.name}.{i}", block)
            for stack in self.extra_block_stacks()
            for i, block in enumerate(stack.blocks)
        ]
        return [*extra, *((f"blocks.{i}", block) for i, block in enumerate(self.blocks))]

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

    # --- family hooks with defaults (added for families without a mask token) -------------
    # The likelihood bound, training and `frontier.samplers.generate` call these; the masked
    # families inherit the defaults, so nothing changes for them. A Gaussian family
    # (Diffusion-LM, PLANNER) overrides them; no caller learns which family it runs.
    def nelbo(self, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One-sample estimate of each sequence's negative ELBO in nats: x0 [B, L] clean ids,
        t [B] in [t_min, 1], u [B, L] uniforms (the caller's noise) -> [B]. Default: the
        masked-diffusion NELBO (`models.objective`)."""
        from faircalib.models.objective import masked_nelbo_per_sequence  # imports this module

        return masked_nelbo_per_sequence(self, x0, t, u)

    def training_loss(self, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per-sequence training loss [B] (nats): the NELBO unless the family trains with a
        simplified objective (Diffusion-LM's L_simple)."""
        return self.nelbo(x0, t, u)

    # The SamplerConfig fields the family's own `sample` reads; None: the family uses the
    # shared masked samplers, which read them all. The sampler warns about any other field set
    # away from its default, rather than ignore it silently.
    sampler_fields: frozenset[str] | None = None

    def sample(
        self,
        prompt_ids: torch.Tensor,
        cfg: Any,
        seed: int,
        *,
        trace: bool = True,
        record_states: bool = False,
        progress: Any = None,
    ) -> Any:
        """The family's own sampler (a `frontier.samplers.GenerationResult`), or None when the
        shared masked samplers apply (the default)."""
        return None

    def vocab_layers(self) -> VocabLayers:
        """The family's vocabulary layers (input embedding and output projection), declared by
        module path and parameter - never guessed - for `--quantize-head`. Families override
        it; a family that declares nothing cannot have its head quantized."""
        raise ConfigError(
            f"the {self.family} family declares no vocabulary layers, so --quantize-head cannot "
            "quantize them; leave --quantize-head off"
        )

    def residual_layout(self) -> ResidualLayout | None:
        """The residual stream's writers and readers, for the offline residual-stream rotation
        of QuaRot-style activation quantization; None (the default): the family's stream
        cannot take one fold (MDLM: LayerNorm and per-sequence adaLN modulation and gates),
        so every rotation runs online in front of its linear."""
        return None

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


def seq_len_warning(
    model: DiffusionLM, seq_len: int | None, model_name: str, risk: str
) -> str | None:
    """A --seq-len the model cannot take at all (past its learned position table) is a
    ConfigError; one past its training length, the warning to print (`risk`: what it costs);
    else None."""
    if seq_len is None or seq_len <= model.seq_len:
        return None
    if model.max_positions is not None and seq_len > model.max_positions:
        raise ConfigError(
            f"--seq-len {seq_len} is longer than {model_name} can take: its learned position "
            f"table has {model.max_positions} positions"
        )
    return (
        f"--seq-len {seq_len} is longer than {model_name}'s training length {model.seq_len}; "
        f"the model never saw positions past {model.seq_len} ({risk})"
    )


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation (Sahoo et al. 2024): no mass on [MASK]; unmasked tokens carried over.

    logits: [B, L, V], x_t: [B, L] -> log-probs [B, L, V] (float32).
    Without autograd the work is done in place: with an 8B model's 126k vocabulary one
    2048-token sequence's [L, V] is 1 GiB in float32, so every full-size temporary counts. The
    two paths give identical values (tested).
    """
    # made on the device (no host-to-device copy), so a CUDA graph can capture the forward
    mask_col = torch.full((1,), mask_id, device=logits.device, dtype=torch.long)
    committed = (x_t != mask_id).unsqueeze(-1)  # [B, L, 1]
    if torch.is_grad_enabled() and logits.requires_grad:
        log_probs = torch.log_softmax(logits.float().index_fill(-1, mask_col, float("-inf")), -1)
        carried = torch.full_like(log_probs, float("-inf")).scatter(-1, x_t.unsqueeze(-1), 0.0)
        return torch.where(committed, carried, log_probs)
    out = logits.float() if logits.dtype != torch.float32 else logits.clone()
    out.index_fill_(-1, mask_col, float("-inf"))
    out = torch.log_softmax(out, dim=-1)  # a fresh tensor; the input copy is freed on return
    out.masked_fill_(committed, float("-inf"))
    # committed rows get 0 at their own token; masked rows write -inf at [MASK] (already -inf)
    value = torch.zeros_like(x_t, dtype=out.dtype).masked_fill_(
        ~committed.squeeze(-1), float("-inf")
    )
    return out.scatter_(-1, x_t.unsqueeze(-1), value.unsqueeze(-1))


# config, index and metadata files are kilobytes (an 8B model's index: ~100 KB); anything
# far larger is not one, and is refused before it is read
MAX_JSON_BYTES = 16 * 2**20
REDO = "re-download or re-export the checkpoint"


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in a model file; a missing, oversized, undecodable or non-object file
    is one CheckpointError line."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise CheckpointError(f"{path} is not a regular file; {REDO}")
        size = info.st_size
        if size > max_bytes:
            raise CheckpointError(
                f"{path} is {size:,} bytes, over the {max_bytes:,} a JSON metadata file may be; "
                f"it is not a valid model file: {REDO}"
            )
        obj = json.loads(path.read_bytes().decode("utf-8-sig"))  # a BOM (Windows) is no content
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


# keys the toolkit adds to a config.json beside a family's own fields
TOOLKIT_CONFIG_KEYS = frozenset({"family", "torch_dtype", "quantization_config", "faircalib"})


def config_from_dict(cls: type, d: dict[str, Any], label: str) -> Any:
    """The config dataclass `cls` from a config.json dict; a field it does not know (beyond
    the toolkit's own keys) is one CheckpointError naming the family `label`."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known - TOOLKIT_CONFIG_KEYS
    if unknown:
        raise CheckpointError(f"unknown {label} config fields: {sorted(unknown)}; fix config.json")
    return cls(**{k: v for k, v in d.items() if k in known})
