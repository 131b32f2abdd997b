"""Model directories: config.json + safetensors shards (+ tokenizer.json), written atomically.

A directory is either complete or absent: we write into a temporary sibling and rename it
into place, so an interrupted save never leaves something that looks finished; inside it,
config.json is written last, so even the temporary directory of a killed save is refused by
every loader (they all start from config.json). Loading checks every tensor's presence, shape,
dtype and finiteness before any weight reaches the model, builds the model on the meta device
first (a config that lies about its sizes costs no memory), bounds every JSON file and
safetensors header it reads, and never reads a shard outside the model directory.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from faircalib import atomic
from faircalib.errors import CheckpointError, OutputError
from faircalib.models.base import REDO, DiffusionLM, read_json

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 15 * 2**20  # git- and transfer-friendly shards (< 16 MB)
# safetensors' own limit; real headers are kilobytes (an 8B shard's: ~50 KB)
MAX_HEADER_BYTES = 100_000_000
TMP_MARK = ".tmp-"  # atomic_directory's temporary siblings: .NAME.tmp-PID-XXXX

FAMILIES: dict[str, Callable[[dict[str, Any]], DiffusionLM]] = {}
# upstream `model_type` -> family, for families whose native layout is upstream's own config
MODEL_TYPES: dict[str, str] = {}


def register_family(
    name: str, build: Callable[[dict[str, Any]], DiffusionLM], *, model_type: str | None = None
) -> None:
    """`model_type`: dispatch configs carrying this upstream `model_type` (and no `family`)."""
    FAMILIES[name] = build
    if model_type is not None:
        MODEL_TYPES[model_type] = name


def family_of(config: dict[str, Any]) -> str | None:
    """The registered family a config.json describes: its `family`, else its `model_type`'s."""
    if "family" in config:
        return config["family"]
    model_type = config.get("model_type")
    return MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None


def build_model(config: dict[str, Any]) -> DiffusionLM:
    family = family_of(config)
    if not isinstance(family, str) or family not in FAMILIES:
        named = config.get("family", config.get("model_type"))
        key = "family" if "family" in config else "model_type"
        # model_type is matched exactly (Dream's is "Dream"): name the spelling it meant
        near = [t for t in MODEL_TYPES if isinstance(named, str) and t.lower() == named.lower()]
        hint = f"; did you mean model_type {near[0]!r}?" if key == "model_type" and near else ""
        raise CheckpointError(
            f"unknown model family {named!r} ({key}); known: {sorted(FAMILIES)} (model types "
            f"{sorted(MODEL_TYPES)}, case-sensitive){hint}; fix config.json"
        )
    try:
        return FAMILIES[family](config)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError) as exc:
        # the builders' only input is config.json: a field of the wrong type or value
        raise CheckpointError(
            f"config.json does not describe a valid {family} model ({type(exc).__name__}: "
            f"{exc}); fix config.json or {REDO}"
        ) from exc


def probe_model(config: dict[str, Any]) -> DiffusionLM:
    """The model `config` describes, on the meta device: its names and shapes for checking a
    checkpoint, at no memory cost whatever sizes the config claims."""
    with torch.device("meta"):
        return build_model(config)


def check_output_dir(out: Path, overwrite: bool = False, inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an output directory that exists (without `overwrite`), is a
    file, or whose parent cannot be created or written; and one that replacing would delete
    what it must not: the current directory or one above it, or any of `inputs` (the model,
    the calibration text) or a directory holding one."""
    out = Path(out)
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputError(
            f"--out {str(out)!r} is the current directory or above it; name a new one"
        )
    package = Path(__file__).resolve().parents[1]  # faircalib's own files: shipped models,
    if target == package or package in target.parents or target in package.parents:  # data
        raise OutputError(
            f"--out {out} would replace files of the installed faircalib ({package}); choose "
            "an output path outside it"
        )
    for source in _with_link_targets(inputs):
        if source.exists() and (target == source or target in source.parents):
            raise OutputError(
                f"--out {out} would replace the input {source}; choose another output path"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another output path")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # mkdir would say only "File exists"
        raise OutputError(
            f"cannot write {out}: {blocker} is a file, not a directory; choose another output path"
        )
    # the parents the probe creates are removed again (deepest first): a run that fails later
    # leaves no empty folders; the writer creates them when it writes
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(
            tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent)
        )
        probe.rmdir()
    except OSError as exc:
        raise OutputError(atomic.os_error_message(out, exc)) from exc
    finally:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break


def _with_link_targets(inputs: Iterable[Path]) -> list[Path]:
    """The inputs, resolved, and for a directory input the targets of the links it holds (a
    tokenizer.json or shard linked from elsewhere, as in a Hugging Face cache)."""
    resolved = []
    for source in map(Path, inputs):
        resolved.append(source.resolve())
        if source.is_dir():
            links = (p for p in source.iterdir() if p.is_symlink())
            resolved += [link.resolve() for link in links]
    return resolved


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes."""
    out = Path(out)
    check_output_dir(out, overwrite)
    _remove_stale_temporaries(out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent))
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except OSError as exc:  # a full disk, a file system gone read-only
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(atomic.os_error_message(out, exc)) from exc
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary siblings of `out` left by processes that were killed while writing."""
    for path in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        pid = path.name.removeprefix(f".{out.name}{TMP_MARK}").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_json(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj)


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' save_file, raising OSError for its I/O failures (a full disk) as Python's
    own writers do: the Rust writer reports them as SafetensorError."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        if "I/O error" not in str(exc):
            raise
        code = re.search(r"os error (\d+)", str(exc))
        errno_ = int(code.group(1)) if code else errno.EIO
        raise OSError(errno_, os.strerror(errno_), str(path)) from exc


def save_tensors(
    tensors: dict[str, torch.Tensor], directory: Path, metadata: dict | None = None
) -> None:
    """Write `tensors` as shards of at most MAX_SHARD_BYTES plus an HF-style index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, directory / fname, {"format": "pt", **(metadata or {})})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def shard_files(directory: Path) -> tuple[dict[str, str], list[Path]]:
    """(index weight map, shard paths) of a model directory; every shard must exist and lie
    inside the directory (an index naming ../../x or /etc/x is refused, never followed)."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        index = read_json(directory / INDEX)
        if "weight_map" not in index:
            raise CheckpointError(f"{directory / INDEX} has no weight_map; {REDO}")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{directory / INDEX}: weight_map must map tensor names to shard file names; {REDO}"
            )
        names = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").exists():
        weight_map, names = {}, ["model.safetensors"]
    else:
        pickled = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        if pickled:  # never unpickled: a pickle can run any code on load
            raise CheckpointError(
                f"{directory} holds only pickled weights ({', '.join(pickled[:3])}), which "
                "faircalib never loads (unpickling can run code); convert them to safetensors "
                "where you trust them, or download the model's *.safetensors files"
            )
        raise CheckpointError(
            f"{directory} has no {INDEX} or model.safetensors: no weights to load; {REDO}"
        )
    paths = []
    for name in names:
        # judged by the name, not where it resolves: a Hugging Face cache's shards are
        # symlinks into its blob store, and are fine
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise CheckpointError(
                f"{directory / INDEX} names shard {name!r}, outside the model directory; "
                f"refusing to read it: {REDO} from a source you trust"
            )
        if not (directory / name).is_file():
            raise CheckpointError(
                f"weight shard {directory / name} listed in the index is missing; {REDO}"
            )
        paths.append(directory / name)
    return weight_map, paths


def check_safetensors_header(path: Path) -> None:
    """Refuse a shard whose 8-byte header length is absent, oversized or past the end of the
    file, before the safetensors reader sees it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror or exc}); {REDO}") from exc
    if len(head) < 8:
        raise CheckpointError(f"{path} is empty or truncated ({size} bytes); {REDO}")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: the safetensors header claims {n:,} bytes (at most {MAX_HEADER_BYTES:,} "
            f"are read); the file is corrupt or not safetensors: {REDO}"
        )
    if 8 + n > size:
        raise CheckpointError(
            f"{path} is truncated: its header claims {n:,} bytes, the file holds {size:,}; {REDO}"
        )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, checked header first; one CheckpointError line
    for anything unreadable."""
    check_safetensors_header(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({reason}); {REDO}"
        ) from exc
    return tensors


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Read every tensor listed in the index (or a single model.safetensors)."""
    weight_map, paths = shard_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        shard = read_safetensors(path)
        twice = sorted(set(shard) & set(tensors))
        if twice:  # which copy is the model's? the index cannot settle a damaged export
            raise CheckpointError(
                f"{directory}: tensor {twice[0]} is stored in more than one shard "
                f"({len(twice)} such); {REDO}"
            )
        tensors.update(shard)
    missing = set(weight_map) - set(tensors)
    if missing:
        raise CheckpointError(
            f"tensors listed in the index but absent from shards: {sorted(missing)[:5]}; {REDO}"
        )
    return tensors


def check_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse unless `tensors` matches `model` exactly in names and shapes and is finite."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source} does not match the model config: missing {missing[:5]}, unexpected "
            f"{extra[:5]}; {REDO}"
        )
    for name, ref in expected.items():
        got = tensors[name]
        if got.shape != ref.shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(got.shape)}, config.json implies "
                f"{tuple(ref.shape)}; {REDO}"
            )
        if got.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise CheckpointError(
                f"{source}: {name} has dtype {got.dtype}, expected a float tensor (float32, "
                f"bfloat16, float16 or float64); {REDO}"
            )
        if not all_finite(got):
            raise CheckpointError(f"{source}: {name} contains NaN or Inf values; {REDO}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN and no Inf. Its min and max are both finite exactly
    then (torch's min / max propagate NaN; an Inf is an extreme): one reduction pass with no
    [numel] boolean temporary, ~8x faster than isfinite(t).all() on bf16 weights."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def save_model(
    model: DiffusionLM,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    extra_files: dict[str, Path | str | dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` to `out` atomically, readable by others as an ordinary file would be
    (`atomic.share`). `extra_files` maps names to source paths, text or JSON."""
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        tensors = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
        save_tensors(tensors, tmp)
        write_extra_files(tmp, extra_files)
        # last: a directory without config.json is refused by every loader
        config = model.config_dict()
        write_json(tmp / CONFIG, {**config, **dtype_fields(config, dtype)})
    return atomic.share(Path(out))


def dtype_fields(config: dict[str, Any], dtype: torch.dtype) -> dict[str, str]:
    """`torch_dtype` (our loaders, transformers < 5) and, where the config uses it, `dtype`
    (transformers >= 5): both name the checkpoint dtype, so neither may keep the source's."""
    name = str(dtype).removeprefix("torch.")
    return {"torch_dtype": name, **({"dtype": name} if "dtype" in config else {})}


def stored_float_dtype(directory: Path) -> torch.dtype | None:
    """The float dtype most of a checkpoint's tensors are stored in, read from its safetensors
    headers (no tensor data); None without shards or float tensors."""
    try:
        _, paths = shard_files(directory)
    except CheckpointError:
        return None
    counts: dict[str, int] = {}
    for path in paths:
        check_safetensors_header(path)
        try:  # safe_open reads the header only; get_slice touches no tensor data
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    piece = f.get_slice(name)
                    dtype = piece.get_dtype()
                    counts[dtype] = counts.get(dtype, 0) + math.prod(piece.get_shape())
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header; {REDO}") from exc
    floats = {k: v for k, v in counts.items() if k in SAFETENSORS_FLOATS}
    return SAFETENSORS_FLOATS[max(floats, key=floats.get)] if floats else None


SAFETENSORS_FLOATS = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


def write_extra_files(directory: Path, extra_files: dict[str, Path | str | dict] | None) -> None:
    """Files beside the weights: a Path is copied, a dict written as JSON, a str as text."""
    for name, content in (extra_files or {}).items():
        if isinstance(content, dict):
            write_json(directory / name, content)
        elif isinstance(content, Path):
            shutil.copyfile(content, directory / name)
        else:
            (directory / name).write_text(content)


def load_model(
    directory: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> DiffusionLM:
    """Load a float model directory, validating everything before touching the model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a model directory")
    config = read_json(directory / CONFIG)
    tensors = load_tensors(directory)
    probe = probe_model(config)
    tensors = probe.checkpoint_tensors(tensors, str(directory))
    check_state_dict(probe, tensors, str(directory))
    state = {k: v.to(dtype) for k, v in tensors.items()}
    if _recomputed_buffers(probe):  # built for real: those buffers are computed at construction
        model = build_model(config)  # allocates only sizes the checked tensors have
        model.load_state_dict(state)
        _cast_checkpoint_tensors(model, dtype)
    else:  # no random init and no float32 copy: an 8B model loads in its own bytes, in seconds
        model = probe.to(dtype)
        model.load_state_dict(state, assign=True)
    return model.to(device).eval()


def _cast_checkpoint_tensors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters and persistent buffers (what the checkpoint holds) in `dtype`; computed
    buffers keep the precision they were built in (rotary frequencies stay float32)."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set and buf.is_floating_point():
                buf.data = buf.data.to(dtype)


def _recomputed_buffers(model: torch.nn.Module) -> bool:
    """Whether some module holds a non-persistent buffer (MDLM's rotary frequencies): state it
    computes at construction, which a checkpoint does not carry."""
    return any(m._non_persistent_buffers_set for m in model.modules())
