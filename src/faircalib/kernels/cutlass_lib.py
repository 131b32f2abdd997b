"""Build and load the CUDA kernels in `csrc/` (Hopper, sm_90a): CUTLASS's GEMMs and our GEMV.

Each `csrc/<name>.cu` is one shared library with a plain C ABI over raw device pointers, loaded
with ctypes: it does not link against torch, so one build serves any torch version. It is
compiled once per machine by `faircalib build-kernels` (nvcc against the headers of the
`nvidia-cutlass` wheel; 3.5-9 minutes a library on two cores) and cached under
`~/.cache/faircalib/cutlass` (or `$FAIRCALIB_CACHE/cutlass`), keyed by the source and its
headers, the flags and nvcc's version. `$FAIRCALIB_CUTLASS_DIR` names a directory of libraries
built elsewhere (`<name>.so`), for a machine without nvcc.

Loading never compiles: a model's forward pass must not stall for minutes on a first call, so
an unbuilt library is an error that names the command (and `auto` simply does not take it).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
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


def library_names() -> list[str]:
    """Every library this package can build (csrc/*.cu)."""
    return sorted(f.stem for f in CSRC.glob("*.cu"))


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


def source_key(name: str) -> str:
    """The digest of what the code of a library is: its source and the headers beside it."""
    digest = hashlib.sha256(source(name).read_bytes())
    for header in sorted(CSRC.glob("*.cuh")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:12]


def toolchain_key(command: list[str]) -> str:
    """The digest of how it is compiled: the flags and include directories, nvcc's and
    CUTLASS's versions."""
    if not Path(command[0]).is_file():
        raise CutlassUnavailable(f"no nvcc at {command[0]} (set CUDA_HOME to a CUDA toolkit)")
    digest = hashlib.sha256(" ".join(command[1:-1]).encode())  # not the output path
    version = subprocess.run([command[0], "--version"], capture_output=True, text=True)
    digest.update(version.stdout.encode())
    # the headers' version: the include path alone stays the same across upgrades
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        digest.update(importlib.metadata.version("nvidia-cutlass").encode())
    return digest.hexdigest()[:8]


def cached_library(name: str) -> Path | None:
    """The library of the current source in the cache: built with this nvcc and these headers
    when both are here, else (a machine that has the cache but no toolkit) the newest build of
    this source."""
    try:
        key = toolchain_key(build_command(name, Path("x.so")))
    except CutlassUnavailable:
        builds = sorted(cache_dir().glob(f"{name}-{source_key(name)}-*.so"), key=os.path.getmtime)
        return builds[-1] if builds else None
    path = cache_dir() / f"{name}-{source_key(name)}-{key}.so"
    return path if path.is_file() else None


def build_library(name: str, directory: Path | None = None) -> Path:
    """Compile `csrc/<name>.cu` into `directory` (default: the cache) unless it is there."""
    directory = directory or cache_dir()
    key = toolchain_key(build_command(name, Path("x.so")))
    target = directory / f"{name}-{source_key(name)}-{key}.so"
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
    _FAILED.pop(name, None)  # a load that failed for want of this build may now succeed
    return target


def check_version(name: str, found: int, expected: int) -> None:
    """Refuse a library built from another version of its source (its configuration count, or
    another build constant, differs from what this package expects)."""
    if found != expected:
        why = (
            f"{name}.so is from another version of faircalib ({found} where this one has "
            f"{expected}): rebuild it with `faircalib build-kernels`"
        )
        _FAILED[name] = why
        _LOADED.pop(name, None)
        raise CutlassUnavailable(why)


def declare_scaled_gemm(lib: ctypes.CDLL, name: str, configs: int) -> None:
    """Check the version of, and declare, a library of the scaled 8-bit GEMMs' C API
    (csrc/w8a8_sm90.cu, csrc/w4a8_sm90.cu): fc_<name>_gemm(config, a, a_scale, w, w_scale,
    out, m, n, k, workspace, workspace_bytes, stream), fc_<name>_workspace(config, m, n, k),
    fc_<name>_configs(), fc_<name>_config_name(config) and fc_<name>_error()."""
    fn = lambda suffix: getattr(lib, f"fc_{name}_{suffix}")  # noqa: E731
    check_version(name, fn("configs")(), configs)
    fn("gemm").argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 5, *[ctypes.c_int] * 3]
    fn("gemm").argtypes += [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn("workspace").argtypes = [ctypes.c_int] * 4
    fn("workspace").restype = ctypes.c_size_t
    fn("error").restype = ctypes.c_char_p
    fn("config_name").restype = ctypes.c_char_p


_LOADED: dict[str, ctypes.CDLL] = {}
_FAILED: dict[str, str] = {}  # name -> why: a failed build is not retried on every call


def load(name: str, declare: Callable[[ctypes.CDLL], None] | None = None) -> ctypes.CDLL:
    """The library of `csrc/<name>.cu`: $FAIRCALIB_CUTLASS_DIR/<name>.so, else the cache's
    build of the current source. A failure is remembered (backends ask once per layer and M)
    until `build_library` builds it. `declare` (check the version, set the C signatures) runs
    once per loaded library, not on every eager call."""
    if name in _FAILED:
        raise CutlassUnavailable(_FAILED[name])
    if name not in _LOADED:
        try:
            _LOADED[name] = _open(name)
        except CutlassUnavailable as exc:
            _FAILED[name] = str(exc)
            raise
    lib = _LOADED[name]
    if declare is not None and not getattr(lib, "_faircalib_declared", False):
        declare(lib)  # a refused version raises here, every call, and stays undeclared
        lib._faircalib_declared = True
    return lib


def _open(name: str) -> ctypes.CDLL:
    prebuilt = os.environ.get(PREBUILT_ENV)
    if prebuilt:
        path: Path | None = Path(prebuilt) / f"{name}.so"
        if not path.is_file():
            raise CutlassUnavailable(f"{PREBUILT_ENV}={prebuilt} has no {name}.so")
    else:
        source(name)  # a missing source is named as such
        path = cached_library(name)
        if path is None:
            raise CutlassUnavailable(
                f"the CUTLASS library {name} is not built here: run `faircalib build-kernels` "
                f"once (several minutes; needs nvcc and `pip install faircalib[cutlass]`) "
                f"or set {PREBUILT_ENV} to a directory of prebuilt libraries"
            )
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise CutlassUnavailable(f"cannot load {path}: {exc}") from exc


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (the tile rules weigh output tiles against them)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


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
