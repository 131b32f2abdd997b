"""Build and load the CUTLASS kernels in `csrc/` (Hopper, sm_90a).

Each `csrc/<name>.cu` is one shared library with a plain C ABI over raw device pointers, loaded
with ctypes: it does not link against torch, so one build serves any torch version. It is
compiled once per machine with nvcc against the headers of the `nvidia-cutlass` wheel (about
six minutes a library on two cores) and cached under `~/.cache/faircalib/cutlass` (or
`$FAIRCALIB_CACHE/cutlass`), keyed by the source, the flags and nvcc's version.
`$FAIRCALIB_CUTLASS_DIR` names a directory of libraries built elsewhere (`<name>.so`), for a
machine without nvcc or without time to build.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
PREBUILT_ENV = "FAIRCALIB_CUTLASS_DIR"


class CutlassUnavailable(RuntimeError):
    """A CUTLASS library cannot be built or loaded here (the message says why)."""


def source(name: str) -> Path:
    path = CSRC / f"{name}.cu"
    if not path.is_file():
        raise CutlassUnavailable(f"no CUTLASS kernel source {path.name} in {CSRC}")
    return path


def cutlass_include_dirs() -> list[Path]:
    """CUTLASS's headers from the `nvidia-cutlass` wheel (its `cutlass_library` package)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        raise CutlassUnavailable("the CUTLASS kernels need `pip install nvidia-cutlass`")
    root = Path(spec.origin).parent / "source"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    if not all((d / "cutlass").is_dir() for d in dirs):
        raise CutlassUnavailable(f"nvidia-cutlass at {root.parent} has no C++ headers")
    return dirs


def cuda_home() -> Path:
    """The CUDA toolkit nvcc belongs to ($CUDA_HOME, else the nvcc on PATH)."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise CutlassUnavailable("the CUTLASS kernels are compiled with nvcc: none on PATH")
    return Path(nvcc).resolve().parent.parent


def curand_include() -> list[Path]:
    """The `nvidia-curand` wheel's headers where the toolkit has no curand_kernel.h (CUTLASS's
    utility headers, which the W4A16 kernel's weight shuffle uses, include it); nvcc names the
    header if neither has it."""
    if (cuda_home() / "include" / "curand_kernel.h").is_file():
        return []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(root).glob("*/include/curand_kernel.h"))
        if found:
            return [found[0].parent]
    return []


def build_command(name: str, out: Path) -> list[str]:
    """The nvcc line that builds `csrc/<name>.cu`: sm_90a (wgmma needs the arch-specific
    target; plain sm_90 would leave Hopper's own instructions out)."""
    includes = [f"-I{d}" for d in (*cutlass_include_dirs(), *curand_include())]
    return [
        str(cuda_home() / "bin" / "nvcc"),
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        "--expt-relaxed-constexpr",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-Xcompiler=-fPIC",
        "-shared",
        *includes,
        str(source(name)),
        "-o",
        str(out),
    ]


def cache_dir() -> Path:
    root = os.environ.get("FAIRCALIB_CACHE") or Path.home() / ".cache" / "faircalib"
    return Path(root) / "cutlass"


def library_key(name: str, command: list[str]) -> str:
    """What a library depends on: its source, the flags and headers, and nvcc's version."""
    if not Path(command[0]).is_file():
        raise CutlassUnavailable(f"no nvcc at {command[0]} (set CUDA_HOME to a CUDA toolkit)")
    digest = hashlib.sha256(source(name).read_bytes())
    digest.update(" ".join(command[1:-1]).encode())  # not `out`
    version = subprocess.run([command[0], "--version"], capture_output=True, text=True)
    digest.update(version.stdout.encode())
    return digest.hexdigest()[:16]


def build_library(name: str, directory: Path | None = None) -> Path:
    """Compile `csrc/<name>.cu` into `directory` (default: the cache) unless it is there."""
    directory = directory or cache_dir()
    target = directory / f"{name}-{library_key(name, build_command(name, Path('x.so')))}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        partial = Path(tmp) / target.name
        done = subprocess.run(build_command(name, partial), capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line]
            raise CutlassUnavailable(
                f"nvcc failed building {name}.cu: {(errors or ['see nvcc output'])[0]}"
            )
        partial.replace(target)  # atomic: another process never loads half a library
    return target


_LOADED: dict[str, ctypes.CDLL] = {}
_FAILED: dict[str, str] = {}  # name -> why: a failed build is not retried on every call


def load(name: str, build: bool = True) -> ctypes.CDLL:
    """The library of `csrc/<name>.cu`: $FAIRCALIB_CUTLASS_DIR/<name>.so, else built (or
    found) in the cache. A failure is remembered: backends ask once per layer and M, and a
    failed six-minute build must not rerun each time."""
    if name in _FAILED:
        raise CutlassUnavailable(_FAILED[name])
    if name not in _LOADED:
        prebuilt = os.environ.get(PREBUILT_ENV)
        if not prebuilt and not build:
            raise CutlassUnavailable(f"no prebuilt {name}.so: set {PREBUILT_ENV}")
        try:
            _LOADED[name] = _open(Path(prebuilt) / f"{name}.so" if prebuilt else None, name)
        except CutlassUnavailable as exc:
            _FAILED[name] = str(exc)
            raise
    return _LOADED[name]


def _open(path: Path | None, name: str) -> ctypes.CDLL:
    """ctypes' handle on `path` (None: build `name` first)."""
    if path is None:
        path = build_library(name)
    elif not path.is_file():
        raise CutlassUnavailable(f"{PREBUILT_ENV}={path.parent} has no {name}.so")
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise CutlassUnavailable(f"cannot load {path}: {exc}") from exc


_WORKSPACE: dict[torch.device, list[torch.Tensor]] = {}


def workspace(device: torch.device, nbytes: int) -> torch.Tensor:
    """A scratch buffer of at least `nbytes` for the libraries' GEMMs on `device`. Buffers are
    never freed: a graph captured with a smaller one keeps replaying into it after a larger
    call grew the set. Growing is refused inside a capture (its warm-up grows it first)."""
    buffers = _WORKSPACE.setdefault(device, [])
    if not buffers or buffers[-1].numel() < nbytes:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a CUTLASS GEMM needs more workspace inside a graph capture")
        buffers.append(torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device))
    return buffers[-1]
