"""Loaders for public dLLM checkpoint layouts (read with safetensors only, never pickle).

`mdlm-hf` is the Hugging Face layout of kuleshov-group's MDLM checkpoints (`mdlm-owt`):

* config.json: `model_type: "mdlm"`, `vocab_size` ([MASK] included), `model_length`,
  `hidden_dim`, `cond_dim`, `n_blocks`, `n_heads`, `dropout`, `time_conditioning` (plus HF
  bookkeeping such as `architectures`, `auto_map`, `torch_dtype`, which are ignored). The MLP
  ratio (4), the sigma embedder's frequency size (256), the rotary base (10,000) and the
  LayerNorm eps (1e-5) are hard-coded upstream and match `faircalib.models.mdlm`.
* tensors: `backbone.<module path>` in `model.safetensors` or index-listed shards. The module
  paths are exactly ours, plus the persistent rotary buffer `backbone.rotary_emb.inv_freq`,
  which we recompute and only check.
* [MASK] is the last id: upstream appends it when the tokenizer has none (GPT-2: 50,257 tokens
  + [MASK] = 50,257). Tokenizers that own a mask token (bert-base-uncased: 103) keep their id;
  pass `mask_id` or put `mask_token_id` in config.json for those.

The original Lightning `.ckpt` files are pickles and are refused here. Users who trust a file can
unpickle it with their own torch and hand the tensors to `lightning_to_hf_tensors`
(docs/models.md shows the five lines).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from faircalib.errors import CheckpointError
from faircalib.models.base import DiffusionLM, read_json
from faircalib.models.io import (
    MODEL_TYPES,
    check_state_dict,
    family_of,
    load_model,
    load_tensors,
    save_model,
)
from faircalib.models.mdlm import MDLM, MDLMConfig, Rotary

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
PREFIX = "backbone."
ROTARY = "backbone.rotary_emb.inv_freq"  # a persistent buffer upstream, recomputed by us
FORMATS = ("faircalib", "mdlm-hf")
_INT_FIELDS = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads")


def detect_format(directory: Path) -> str:
    """'faircalib' (our native layout, which for LLaDA and Dream is upstream's own) or 'mdlm-hf';
    anything else raises CheckpointError."""
    directory = Path(directory)
    if directory.suffix == ".ckpt" or (directory.is_dir() and _only_pickles(directory)):
        raise CheckpointError(
            f"{directory}: Lightning .ckpt files are pickles and are not loaded; convert them "
            "first (docs/models.md, 'Original MDLM Lightning checkpoints')"
        )
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a model directory")
    config = read_json(directory / CONFIG)
    if config.get("model_type") == "mdlm":
        return "mdlm-hf"
    if family_of(config) is not None:  # LLaDA and Dream: upstream's layout is also ours
        return "faircalib"
    raise CheckpointError(
        f"{directory / CONFIG} matches no known layout: expected `family` (faircalib) or "
        f"model_type 'mdlm' or one of {sorted(MODEL_TYPES)} (got model_type "
        f"{config.get('model_type')!r})"
    )


def _only_pickles(directory: Path) -> bool:
    return not (directory / CONFIG).exists() and any(directory.glob("*.ckpt"))


def mdlm_hf_config(config: dict[str, Any], mask_id: int | None = None) -> MDLMConfig:
    """Map an mdlm-hf config.json onto MDLMConfig, refusing missing or ill-typed fields."""
    if config.get("model_type") != "mdlm":
        raise CheckpointError(f"model_type is {config.get('model_type')!r}, expected 'mdlm'")
    missing = [k for k in _INT_FIELDS if k not in config]
    if missing:
        raise CheckpointError(f"MDLM config.json lacks {missing}")
    bad = [k for k in _INT_FIELDS if type(config[k]) is not int or config[k] <= 0]
    if bad:
        raise CheckpointError(f"MDLM config.json fields {bad} must be positive integers")
    vocab = config["vocab_size"]
    if mask_id is None:
        mask_id = config.get("mask_token_id")  # HF configs may carry it as null
    if mask_id is None:
        mask_id = vocab - 1
    if type(mask_id) is not int:
        raise CheckpointError(f"mask id must be an integer, got {mask_id!r}")
    return MDLMConfig(
        vocab_size=vocab,
        mask_id=mask_id,
        seq_len=config["model_length"],
        hidden_dim=config["hidden_dim"],
        cond_dim=config["cond_dim"],
        n_blocks=config["n_blocks"],
        n_heads=config["n_heads"],
        dropout=float(config.get("dropout", 0.0)),
        time_conditioning=bool(config.get("time_conditioning", False)),
    )


def mdlm_hf_state(
    tensors: dict[str, torch.Tensor], cfg: MDLMConfig, source: str
) -> dict[str, torch.Tensor]:
    """Strip `backbone.` and check the rotary buffer; names are otherwise identical to ours."""
    foreign = sorted(k for k in tensors if not k.startswith(PREFIX))
    if foreign:
        raise CheckpointError(f"{source}: tensors outside `{PREFIX}`: {foreign[:5]}")
    if ROTARY in tensors:
        _check_rotary(tensors[ROTARY], cfg, source)
    return {k.removeprefix(PREFIX): v for k, v in tensors.items() if k != ROTARY}


def _check_rotary(inv_freq: torch.Tensor, cfg: MDLMConfig, source: str) -> None:
    # A different rotary base would load cleanly and silently change every attention score.
    ours = Rotary(cfg.hidden_dim // cfg.n_heads).inv_freq  # [head_dim / 2]
    if inv_freq.shape != ours.shape or not torch.allclose(inv_freq.float(), ours, rtol=1e-5):
        raise CheckpointError(
            f"{source}: {ROTARY} (shape {tuple(inv_freq.shape)}) differs from the base-10000 "
            f"rotary frequencies of head size {cfg.hidden_dim // cfg.n_heads}"
        )


def load_mdlm_hf(
    directory: Path, *, mask_id: int | None = None, dtype: torch.dtype = torch.float32
) -> MDLM:
    """Load an mdlm-hf directory as an eval-mode MDLM; every tensor is validated first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a model directory")
    cfg = mdlm_hf_config(read_json(directory / CONFIG), mask_id)
    model = MDLM(cfg)
    state = mdlm_hf_state(load_tensors(directory), cfg, str(directory))
    check_state_dict(model, state, str(directory))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.eval()


def load_checkpoint(directory: Path, *, dtype: torch.dtype = torch.float32) -> DiffusionLM:
    """Load any supported layout (see `detect_format`) as an eval-mode model on the CPU."""
    if detect_format(directory) == "mdlm-hf":
        return load_mdlm_hf(directory, dtype=dtype)
    return load_model(directory, dtype=dtype)


def convert_mdlm_hf(
    src: Path,
    out: Path,
    *,
    tokenizer: Path | None = None,
    mask_id: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Rewrite an mdlm-hf checkpoint in faircalib's native layout (float32, atomic).

    `tokenizer` (a tokenizer.json; default: the one in `src`, if any) is copied alongside, after
    checking that its vocabulary has exactly the model's `vocab_size` entries. `mdlm-owt` ships
    none: `faircalib.data.tokenizers.gpt2_tokenizer()` is its GPT-2 + [MASK] vocabulary.
    """
    model = load_mdlm_hf(src, mask_id=mask_id)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise CheckpointError(f"tokenizer {tokenizer} does not exist")
    tokenizer = Path(tokenizer) if tokenizer is not None else Path(src) / TOKENIZER
    extra: dict[str, Path | str | dict] = {}
    if tokenizer.exists():
        _check_tokenizer(tokenizer, model.vocab_size)
        extra[TOKENIZER] = tokenizer
    return save_model(model, out, extra_files=extra, overwrite=overwrite)


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
        raise CheckpointError(f"{path} is not a readable tokenizer.json: {exc}") from exc
    if size != vocab_size:
        raise CheckpointError(f"{path} has {size} tokens, the model {vocab_size}")


def lightning_to_hf_tensors(
    state_dict: dict[str, Any], ema_shadow: Sequence[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of an unpickled MDLM Lightning checkpoint, renamed to the mdlm-hf layout.

    `state_dict` is `ckpt["state_dict"]` (`backbone.*` plus anything else the module held);
    `ema_shadow` is `ckpt["ema"]["shadow_params"]`, the EMA weights that MDLM evaluates with.
    Upstream builds the EMA over `backbone.parameters()` followed by the (parameter-free)
    noise schedule's, so shadow i belongs to the i-th backbone parameter in state_dict order.
    """
    backbone = {k: v for k, v in state_dict.items() if k.startswith(PREFIX) and torch.is_tensor(v)}
    if not backbone:
        raise CheckpointError("state_dict has no `backbone.` tensors: not an MDLM checkpoint")
    if ema_shadow is None:
        return {k: v.detach().contiguous() for k, v in backbone.items()}
    params = [k for k in backbone if k != ROTARY]  # buffers are not in the EMA
    if len(ema_shadow) != len(params):
        raise CheckpointError(
            f"EMA holds {len(ema_shadow)} tensors but the backbone has {len(params)} parameters"
        )
    out = {k: v.detach().contiguous() for k, v in backbone.items()}
    for name, shadow in zip(params, ema_shadow, strict=True):
        if shadow.shape != backbone[name].shape:
            raise CheckpointError(
                f"EMA tensor for {name} has shape {tuple(shadow.shape)}, expected "
                f"{tuple(backbone[name].shape)}: parameter order does not match"
            )
        out[name] = shadow.detach().contiguous()
    return out
