"""Resumable training: the state `faircalib train` keeps in OUT.partial while a run is under way.

A long run (a base-size model, a Diffusion-LM that needs hours) outlives one GPU lease or one
job slot. The trainer writes its whole state every `checkpoint_every` steps, and when this
invocation's limit (`stop_after_s`, `stop_after_steps`) ends it early; `resume` continues from
it with the same numbers an uninterrupted run gives (the CPU test checks the final weights bit
for bit).

The state is a directory, written atomically (complete or absent), beside the output the way
`faircalib quantize` keeps its progress:
- `state.safetensors`: the model's float32 state dict (`model.*`), its buffers that the state
  dict leaves out (`buffer.*`: a time warp's running curve and update count, kept in their own
  dtypes), AdamW's per-parameter tensors (`opt.<index>.<name>`), and the random generators'
  states (`rng.*`: the batch generator, torch's CPU one and, on a GPU, the training device's).
  Never pickle.
- `state.json`: the next step, the schedule's horizon, tokens seen, wall time so far, the
  validation log, AdamW's parameter groups, and the resume key.

The resume key is what the continued run must share with the interrupted one: every training
setting that changes the numbers (preset, overrides, batch, rates, schedule, seed, draws) and
the token stream itself (length and sha256), not the paths it was read from. A resume with any
of them changed is refused, naming the settings that differ. The tokenizer counts by its
file's sha256, not its path. The device, `compile`, the paths and the per-invocation limits may
change, except that batches drawn on the device (`device_draws`) tie a run to its device type.
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
    "tokenizer",
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
    key = {**settings, "stream_tokens": int(len(stream)), "stream_sha256": digest}
    key["tokenizer_sha256"] = hashlib.sha256(Path(cfg.tokenizer).read_bytes()).hexdigest()
    if cfg.device_draws:  # the batch generator lives on the device: its state is the device's
        key["draw_device_type"] = torch.device(cfg.device).type
    return key


def save_state(
    directory: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    progress: dict[str, Any],
    key: dict[str, Any],
) -> None:
    """Write the whole training state to `directory` atomically (replacing an older one)."""
    state = model.state_dict()
    tensors = {f"model.{k}": v.detach().float().cpu() for k, v in state.items()}
    for name, buf in model.named_buffers():  # non-persistent ones: training state all the same
        if name not in state:
            tensors[f"buffer.{name}"] = buf.detach().cpu().contiguous()
    opt_state = opt.state_dict()
    for index, per_param in opt_state["state"].items():
        for name, value in per_param.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    tensors["rng.gen"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
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
        out = directory.with_name(directory.name.removesuffix(".partial"))
        done = (
            f" ({out} holds a finished model: that run is complete)"
            if (out / "config.json").is_file()
            else ""
        )
        raise ConfigError(
            f"nothing to resume: {directory} holds no training state{done}; it is written every "
            "--checkpoint-every steps and when --stop-after / --stop-after-steps ends a run"
        )
    try:
        meta = json.loads((directory / META_FILE).read_text())
        tensors = load_file(directory / STATE_FILE)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"cannot resume from {directory}: unreadable state ({exc})") from exc
    problem = _progress_problem(meta)
    if problem:
        raise ConfigError(f"cannot resume from {directory}: damaged {META_FILE} ({problem})")
    saved = meta.get("resume_key", {})
    differ = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
    if differ:
        raise ConfigError(
            f"cannot resume from {directory}: this run differs from the interrupted one in "
            f"{', '.join(differ)}; run it with the same settings and data, or start afresh "
            f"without --resume"
        )
    try:
        _restore(tensors, meta, model, opt, gen)
        return {k: meta[k] for k in ("step", "total_steps", "tokens_seen", "elapsed_s", "log")}
    except (KeyError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot resume from {directory}: the state does not fit ({reason})"
        ) from exc


def _progress_problem(meta: Any) -> str | None:
    """What is wrong with a state.json's progress fields, or None."""
    if not isinstance(meta, dict):
        return f"a JSON object expected, got {type(meta).__name__}"
    counts = {k: meta.get(k) for k in ("step", "total_steps", "tokens_seen")}
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name} must be a non-negative integer, got {value!r}"
    if counts["step"] > counts["total_steps"]:
        return f"step {counts['step']} is past the run's {counts['total_steps']} steps"
    elapsed = meta.get("elapsed_s")
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not elapsed >= 0:
        return f"elapsed_s must be a non-negative number, got {elapsed!r}"
    if not isinstance(meta.get("log"), list) or not isinstance(meta.get("resume_key", {}), dict):
        return "log must be a list and resume_key an object"
    return None


def _restore(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> None:
    device = next(model.parameters()).device
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict({k: v.to(device) for k, v in model_state.items()})
    buffers = dict(model.named_buffers())
    for name, value in tensors.items():
        if name.startswith("buffer."):
            buf = buffers[name[len("buffer.") :]]
            buf.copy_(value.to(device=buf.device, dtype=buf.dtype))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, field = name.split(".", 2)
            opt_state.setdefault(int(index), {})[field] = value
    fields = {frozenset(v) for v in opt_state.values()}
    n_params = sum(len(group["params"]) for group in opt.param_groups)
    if len(fields) > 1 or len(opt_state) not in (0, n_params):
        raise ValueError(f"optimizer state incomplete: {len(opt_state)} of {n_params} parameters")
    opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["rng.gen"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def discard_state(directory: Path) -> None:
    """Remove a finished run's state (the model directory now holds the result)."""
    shutil.rmtree(directory, ignore_errors=True)
