"""Resumable calibration: a quantize run's progress, kept beside its output directory.

`faircalib quantize ... --out DIR` keeps DIR.partial/ while it runs and removes it once DIR
is written:

    progress.json               fingerprint, finished blocks, their report rows (the commit point)
    inputs.safetensors          FAIR-Calib / recon calibration inputs: x_t, t, weights, text_ids,
                                clean (frontier tracking is not redone on resume)
    block-00003.safetensors     block 3's quantization results: codes, scales, zero points, bias
                                (and the fake-quant weight where it is not exactly the decoded one)
    state-00004.safetensors     what block 4 starts from: the block-input cache and, when stage 2
                                reconstructs against the float stream, the float-stream cache

Finished blocks are committed at most every `PartialRun.COMMIT_EVERY_S` seconds (60; the
environment variable FAIRCALIB_COMMIT_EVERY_S overrides it), and always after the last block:
at 8B scale the input cache is GiBs, not worth writing after every block.
Each file is written under a temporary name and renamed; progress.json is replaced last, so
a file it does not count (a kill between the two) is ignored and removed on resume. Tensors
are safetensors, everything else JSON: nothing is ever pickled.

A resume continues after the last finished block with the same numbers an uninterrupted run
has at that point (every random stream of the engine is seeded per block), so the result is
bit-identical on the CPU. The end-to-end stage of FAIR-Calib runs after all blocks and is not
resumable mid-stage: a resume after the blocks re-runs it, deterministically, from the saved
block results.

The fingerprint covers the model weights (sha256 of the state dict), the method and
calibration configs, the calibration tokens, faircalib's calibration code (sha256 of its
sources) and torch's version; a resume with any of them changed is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import faircalib
from faircalib import atomic
from faircalib.calib.engine import FakeQuantLinear, QuantReport, _set_submodule
from faircalib.errors import CheckpointError, ConfigError, OutputError
from faircalib.models.base import DiffusionLM, read_json
from faircalib.models.io import read_safetensors, write_safetensors
from faircalib.quant import QuantResult
from faircalib.quant.primitives import QParams, dequantize

FORMAT = "faircalib-progress"
VERSION = 1
PROGRESS = "progress.json"
INPUTS = "inputs.safetensors"
INPUT_NAMES = ("x_t", "t", "weights", "text_ids", "clean")
# what each fingerprint field is, for the refusal message
FIELDS = {
    "model_weights": "model weights",
    "method_config": "method config",
    "calib_config": "calibration config",
    "calib_data": "calibration data",
    "code": "faircalib code",
    "torch": "torch version",
}


def partial_dir(out: Path) -> Path:
    """Where the progress of a run writing `out` lives: the sibling OUT.partial."""
    out = Path(out)
    return out.with_name(f"{out.name}.partial")


# --- fingerprint ---------------------------------------------------------------------------
def fingerprint(
    model: DiffusionLM, method: dict[str, Any], calib: dict[str, Any], tokens: torch.Tensor
) -> dict[str, str]:
    """What a resumed run must share with the interrupted one (see the module docstring)."""
    return {
        "model_weights": _hash_tensors(model.state_dict()),
        "method_config": _hash_json(method),
        "calib_config": _hash_json(calib),
        "calib_data": _hash_tensors({"tokens": tokens}),
        "code": code_digest(),
        "torch": torch.__version__,
    }


def _hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no bytes copy
    return h.hexdigest()


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# the code that computes calibration results (not the CLI, evaluation, kernels or formats)
CALIBRATION_CODE = ("__init__.py", "config.py", "calib", "quant", "models", "data", "frontier")


def code_digest() -> str:
    """sha256 over the sources of faircalib's calibration code (CALIBRATION_CODE): a change
    to any of them makes a new fingerprint."""
    root = Path(faircalib.__file__).parent
    h = hashlib.sha256(faircalib.__version__.encode())
    for part in CALIBRATION_CODE:
        path = root / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


# --- the progress directory ----------------------------------------------------------------
class PartialRun:
    """The progress directory of one run; see the module docstring. Create with `open`."""

    # Blocks are committed (with the next block's input cache, GiBs at 8B scale) at most this
    # often: a kill loses at most this much work, and the cache is not written after every
    # block. Each finished block's results are still written as it finishes.
    COMMIT_EVERY_S = 60.0  # FAIRCALIB_COMMIT_EVERY_S overrides it (`_commit_every`)

    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.state = state
        self._pending: list[dict[str, Any]] = []  # finished blocks not yet committed
        self._last_commit = time.monotonic()

    @classmethod
    def open(
        cls, directory: Path, fp: dict[str, str], *, resume: bool, overwrite: bool
    ) -> PartialRun:
        """Continue the progress in `directory` (`resume`, fingerprints must match), start it
        afresh (`overwrite`, or nothing there), or refuse to discard it silently."""
        directory = Path(directory)
        if directory.exists() and resume:
            run = cls(directory, _read_state(directory))
            run._check(fp)
            run._clean()
            print(
                f"[calib] resuming from {directory}: {run.finished} block(s) finished",
                file=sys.stderr,
            )
            return run
        cls.check(directory, resume=resume, overwrite=overwrite)
        if resume:
            print(f"[calib] no progress at {directory}; starting from block 0", file=sys.stderr)
        return cls._create(directory, fp)

    @classmethod
    def _create(cls, directory: Path, fp: dict[str, str]) -> PartialRun:
        state = {"format": FORMAT, "version": VERSION, "fingerprint": fp, "finished_blocks": 0}
        state.update(blocks=[], inputs=None)
        try:
            if directory.exists():
                shutil.rmtree(directory)
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
            atomic.write_json(tmp / PROGRESS, state)
            tmp.rename(directory)  # the directory appears with its progress.json
        except OSError as exc:
            raise atomic_error(directory, exc) from exc
        return cls(directory, state)

    @staticmethod
    def check(directory: Path, *, resume: bool, overwrite: bool) -> None:
        """The refusals that need no fingerprint, made before anything is loaded: progress
        that is unreadable (with `resume`) or would be discarded silently (without either)."""
        if not Path(directory).exists() or (overwrite and not resume):
            return  # nothing there, or to be replaced
        state = _read_state(Path(directory))
        if not resume and not overwrite:
            raise ConfigError(
                f"{directory} holds the progress of an interrupted run "
                f"({state.get('finished_blocks', '?')} block(s) finished); pass --resume to "
                "continue it or --overwrite to start over"
            )

    @property
    def finished(self) -> int:
        """How many blocks are finished (blocks 0 .. finished - 1)."""
        return int(self.state["finished_blocks"])

    def _check(self, fp: dict[str, str]) -> None:
        saved = self.state.get("fingerprint", {})
        if not isinstance(saved, dict):
            raise self._damaged(f"its fingerprint is a {type(saved).__name__}, not an object")
        differ = [label for key, label in FIELDS.items() if saved.get(key) != fp.get(key)]
        if differ:
            raise ConfigError(
                f"{self.directory} holds the progress of a different run ({', '.join(differ)} "
                "changed); rerun with the original inputs, or without --resume and with "
                "--overwrite to start over"
            )

    def _clean(self) -> None:
        """Remove files progress.json does not count: temporaries and blocks written after the
        last commit."""
        keep = {PROGRESS, INPUTS if self.state.get("inputs") else None}
        keep |= {_block_name(i) for i in range(self.finished)}
        keep.add(_state_name(self.finished))
        for path in self.directory.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Called once the output is written: the progress is no longer needed."""
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- calibration inputs (FAIR-Calib / recon) --------------------------------------------
    def load_inputs(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors named INPUT_NAMES, the diagnostics dict) saved by `save_inputs`, or None."""
        if not self.state.get("inputs"):
            return None
        tensors = self._read_tensors(INPUTS)
        if set(tensors) != set(INPUT_NAMES):
            raise self._damaged(f"{INPUTS} holds {sorted(tensors)}")
        return tensors, self.state["inputs"]["extra"]

    def save_inputs(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self._save_tensors(INPUTS, tensors)
        self.state["inputs"] = {"extra": extra}
        self._commit()

    # --- the engine's hooks -----------------------------------------------------------------
    def restore(
        self,
        model: DiffusionLM,
        cache: list[torch.Tensor],
        float_cache: list[torch.Tensor] | None,
        report: QuantReport,
        device: torch.device | str,
    ) -> int:
        """Put the finished blocks' quantized layers into `model` (on `device`), their report
        rows into `report` and the next block's inputs into `cache` / `float_cache` (in
        place, as CPU tensors: the engine then places them as its cache plan says). Returns
        the index of the first block still to calibrate."""
        k = self.finished
        if k > len(model.blocks):
            raise self._damaged(f"{k} finished blocks, the model has {len(model.blocks)}")
        for i in range(k):
            entry = self.state["blocks"][i]
            if not isinstance(entry, dict) or not isinstance(entry.get("results"), dict):
                raise self._damaged(f"block {i}'s record is malformed")
            self._restore_block(model, i, device)
            report.layers += entry["layers"]
            if entry.get("recon") is not None:
                report.recon.append(entry["recon"])
        if 0 < k < len(model.blocks):
            saved = self._read_tensors(_state_name(k))
            _fill(cache, saved, "cache", self)
            if float_cache is not None:
                _fill(float_cache, saved, "float", self)
        return k

    def _restore_block(self, model: DiffusionLM, i: int, device: torch.device | str) -> None:
        block = model.blocks[i]
        tensors = self._read_tensors(_block_name(i))
        specs = self.state["blocks"][i]["results"]
        for name, linear in model.quantizable_linears(block):
            try:
                result, bias = _result_from(tensors, name, specs[name])
            except KeyError as exc:
                raise self._damaged(f"block {i} lacks {exc} for {name}") from exc
            except (TypeError, AttributeError, ValueError) as exc:
                raise self._damaged(f"block {i}'s record of {name} is malformed") from exc
            if tuple(result.codes.shape) != (linear.out_features, linear.in_features):
                raise self._damaged(f"block {i}'s {name} has shape {tuple(result.codes.shape)}")
            try:
                fq = FakeQuantLinear.from_result(result, bias, linear.weight.dtype)
            except (ConfigError, ValueError, RuntimeError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise self._damaged(f"block {i}'s {name} does not fit ({reason})") from exc
            _set_submodule(block, name, fq)
        block.to(device)

    def save_block(
        self,
        i: int,
        model: DiffusionLM,
        cache: list[torch.Tensor],
        float_cache: list[torch.Tensor] | None,
        report: QuantReport,
    ) -> None:
        """Record block `i` as finished: its results, the next block's inputs, its report rows
        (the last `len(linears)` rows of `report.layers`, its log in `report.recon`)."""
        block = model.blocks[i]
        tensors, specs = {}, {}
        for name, module in model.quantizable_linears(block):
            layer_tensors, specs[name] = _result_tensors(name, module)
            tensors.update(layer_tensors)
        self._save_tensors(_block_name(i), tensors)
        recon = next((r for r in report.recon if r.get("block") == i), None)
        rows = report.layers[-len(specs) :]
        self._pending.append({"block": i, "results": specs, "layers": rows, "recon": recon})
        last = i + 1 == len(model.blocks)
        if not last and time.monotonic() - self._last_commit < self._commit_every():
            return  # committed with a later block
        if not last:  # the last block has no successor to feed
            # the caches may live on the device (engine's cache plan): copied to the host here,
            # at a commit, and nowhere else
            state = {f"cache.{j}": h for j, h in enumerate(cache)}
            state.update({f"float.{j}": h for j, h in enumerate(float_cache or [])})
            self._save_tensors(_state_name(i + 1), state)
        first = self._pending[0]["block"]
        # entries first.., whatever an older commit left after them
        self.state["blocks"][first:] = self._pending
        self.state["finished_blocks"] = i + 1
        self._commit()
        (self.directory / _state_name(first)).unlink(missing_ok=True)  # superseded
        self._pending, self._last_commit = [], time.monotonic()

    # --- files ------------------------------------------------------------------------------
    def _read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A progress file's tensors; an unreadable one is this directory's damage (its remedy
        is to start over, not the checkpoint reader's "re-download")."""
        try:
            return read_safetensors(self.directory / name)
        except CheckpointError as exc:
            reason = str(exc).split("; ")[0].removeprefix(str(self.directory / name)).strip()
            raise self._damaged(f"{name} {reason}") from exc

    def _save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic.replacing(self.directory / name) as tmp:
            write_safetensors(cpu, tmp)

    def _commit(self) -> None:
        atomic.write_json(self.directory / PROGRESS, self.state, indent=None, default=float)

    def _commit_every(self) -> float:
        text = os.environ.get("FAIRCALIB_COMMIT_EVERY_S")
        if text is None:
            return self.COMMIT_EVERY_S
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not seconds >= 0:
            raise ConfigError(f"FAIRCALIB_COMMIT_EVERY_S must be seconds >= 0, got {text!r}")
        return seconds

    def _damaged(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.directory} is damaged ({what}); remove it, or pass --overwrite without "
            "--resume to start over"
        )


def atomic_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(atomic.os_error_message(path, exc))


def _read_state(directory: Path) -> dict[str, Any]:
    try:
        state = read_json(directory / PROGRESS)
    except CheckpointError as exc:
        raise ConfigError(
            f"{directory} is not a readable faircalib progress directory ({PROGRESS} is missing "
            "or damaged); remove it, or pass --overwrite without --resume to start over"
        ) from exc
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ConfigError(
            f"{directory} is not a faircalib progress directory of version {VERSION}; remove "
            "it, or pass --overwrite without --resume to start over"
        )
    done, blocks = state.get("finished_blocks"), state.get("blocks")
    if type(done) is not int or not isinstance(blocks, list) or not 0 <= done <= len(blocks):
        raise ConfigError(
            f"{directory}/{PROGRESS} is damaged (finished_blocks {done!r}); remove it, or pass "
            "--overwrite without --resume to start over"
        )
    return state


def _block_name(i: int) -> str:
    return f"block-{i:05d}.safetensors"


def _state_name(i: int) -> str:
    return f"state-{i:05d}.safetensors"


def _fill(target: list[torch.Tensor], saved: dict[str, torch.Tensor], key: str, run) -> None:
    for j in range(len(target)):
        got = saved.get(f"{key}.{j}")
        if got is None or got.shape != target[j].shape:
            raise run._damaged(f"its {key} cache does not match this run's calibration batches")
        target[j] = got


def _result_tensors(name: str, module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and scalars that rebuild a FakeQuantLinear exactly."""
    if not isinstance(module, FakeQuantLinear) or module.result is None:
        raise ConfigError(f"{name} was not quantized; nothing to save")
    r: QuantResult = module.result.to("cpu")
    qp = r.qparams
    tensors = {f"{name}.codes": r.codes, f"{name}.scale": qp.scale, f"{name}.zero": qp.zero}
    # the fake-quant weight is stored only where decoding the codes does not give it exactly
    # (it usually does: 4 bytes per weight saved)
    # (a bf16 model's weight is the decode rounded to bf16, which restoring redoes)
    exact = torch.equal(dequantize(r.codes, qp).to(r.weight.dtype), r.weight)
    if not exact:
        tensors[f"{name}.weight"] = r.weight
    if r.input_scale is not None:
        tensors[f"{name}.input_scale"] = r.input_scale
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias
    spec = {
        "bits": qp.bits,
        "group_size": qp.group_size,
        "symmetric": qp.symmetric,
        "act_bits": r.act_bits,
        "info": r.info,
    }
    return tensors, spec


def _result_from(
    tensors: dict[str, torch.Tensor], name: str, spec: dict
) -> tuple[QuantResult, torch.Tensor | None]:
    qp = QParams(
        tensors[f"{name}.scale"],
        tensors[f"{name}.zero"],
        spec["bits"],
        spec["group_size"],
        spec["symmetric"],
    )
    codes = tensors[f"{name}.codes"]
    weight = tensors.get(f"{name}.weight")
    if weight is None:
        weight = dequantize(codes, qp)
    result = QuantResult(
        weight, codes, qp, tensors.get(f"{name}.input_scale"), spec["act_bits"], spec["info"]
    )
    return result, tensors.get(f"{name}.bias")
