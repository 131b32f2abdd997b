"""Resumable training: the state `faircalib train` keeps in OUT.partial while a run is under way.

A long run (a base-size model, a Diffusion-LM that needs hours) outlives one GPU lease or one
job slot. The trainer writes its whole state every `checkpoint_every` steps, and when this
invocation's limit (`stop_after_s`, `stop_after_steps`) ends it early; `resume` continues from
it with the same numbers an uninterrupted run gives (the CPU test checks the final weights bit
for bit).

The state is a directory, written atomically (complete or absent), beside the output the way
`faircalib quantize` keeps its progress:
- `state.safetensors`: the model's float32 state dict (`model.*`, buffers included: a time
  warp's running curve), AdamW's per-parameter tensors (`opt.<index>.<name>`), and the random
  generators' states (`rng.*`: the batch generator, torch's CPU one and, on a GPU, CUDA's).
  Never pickle.
- `state.json`: the next step, the schedule's horizon, tokens seen, wall time so far, the
  validation log, AdamW's parameter groups, and the resume key.

The resume key is what the continued run must share with the interrupted one: every training
setting that changes the numbers (preset, overrides, batch, rates, schedule, seed, draws) and
the token stream itself (length and sha256), not the paths it was read from. A resume with any
of them changed is refused, naming the settings that differ. The device, `compile` and the
per-invocation limits may change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from faircalib.errors import ConfigError
from faircalib.models.io import atomic_directory, write_safetensors

if TYPE_CHECKING:
    from faircalib.training import TrainConfig

STATE_FILE, META_FILE = "state.safetensors", "state.json"
# settings a resumed run may change: where it runs and how long this invocation lasts
FREE_SETTINGS = {
    "corpus",
    "out",
    "token_cache",
    "max_docs",
    "device",
    "compile",
    "resume",
    "checkpoint_every",
    "stop_after_s",
    "stop_after_steps",
}


def state_dir(out: str | Path) -> Path:
    """Where a run writing model directory `out` keeps its state: the sibling OUT.partial."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def resume_key(cfg: TrainConfig, stream: np.ndarray) -> dict[str, Any]:
    """The settings and data a resumed run must share with the interrupted one."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FREE_SETTINGS}
    digest = hashlib.sha256(np.ascontiguousarray(stream, dtype=np.int32).tobytes()).hexdigest()
    return {**settings, "stream_tokens": int(len(stream)), "stream_sha256": digest}


def save_state(
    directory: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    progress: dict[str, Any],
    key: dict[str, Any],
) -> None:
    """Write the whole training state to `directory` atomically (replacing an older one)."""
    tensors = {f"model.{k}": v.detach().float().cpu() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for index, per_param in opt_state["state"].items():
        for name, value in per_param.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    tensors["rng.gen"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        **progress,
        "param_groups": opt_state["param_groups"],
        "resume_key": key,
        "torch": torch.__version__,
    }
    with atomic_directory(directory, overwrite=True) as tmp:
        write_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))


def load_state(
    directory: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    key: dict[str, Any],
) -> dict[str, Any]:
    """Restore model, optimiser and generators from `directory`; -> the saved progress (next
    step, horizon, tokens seen, elapsed seconds, log). One ConfigError line when there is no
    state, it is unreadable, or it belongs to a different run."""
    if not (directory / META_FILE).is_file() or not (directory / STATE_FILE).is_file():
        raise ConfigError(
            f"nothing to resume: {directory} holds no training state (it is written every "
            "--checkpoint-every steps and when --stop-after / --stop-after-steps ends a run)"
        )
    try:
        meta = json.loads((directory / META_FILE).read_text())
        tensors = load_file(directory / STATE_FILE)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"cannot resume from {directory}: unreadable state ({exc})") from exc
    saved = meta.get("resume_key", {})
    differ = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
    if differ:
        raise ConfigError(
            f"cannot resume from {directory}: this run differs from the interrupted one in "
            f"{', '.join(differ)}; run it with the same settings and data, or start afresh "
            f"without --resume"
        )
    device = next(model.parameters()).device
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict({k: v.to(device) for k, v in model_state.items()})
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, field = name.split(".", 2)
            opt_state.setdefault(int(index), {})[field] = value
    opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["rng.gen"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {k: meta[k] for k in ("step", "total_steps", "tokens_seen", "elapsed_s", "log")}


def discard_state(directory: Path) -> None:
    """Remove a finished run's state (the model directory now holds the result)."""
    shutil.rmtree(directory, ignore_errors=True)
