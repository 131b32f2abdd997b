"""`faircalib build-kernels`: compile the CUDA kernels in kernels/csrc (CUTLASS's W4A16 and INT8
GEMMs, our W4A16 GEMV; Hopper) once for this machine.

Loading a kernel library never compiles it (a forward pass must not stall for minutes), so
this command is the one step between `pip install faircalib[cutlass]` and `auto` taking the
CUTLASS backends on an H100 / H200.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-kernels",
        help="compile the CUTLASS and CUDA kernels for Hopper GPUs (nvcc; several minutes a library)",
        description=__doc__,
    )
    p.add_argument("names", nargs="*", help="libraries to build (default: every one)")
    p.add_argument("--out", help="also copy each library to OUT/<name>.so (FAIRCALIB_CUTLASS_DIR)")
    p.add_argument(
        "--check", action="store_true", help="only say which libraries load here, build nothing"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    import time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from faircalib.errors import ConfigError
    from faircalib.kernels import cutlass_lib

    known = cutlass_lib.library_names()
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        raise ConfigError(f"no CUTLASS library {', '.join(unknown)}; choose from {known}")
    names = args.names or known
    if args.check:
        from faircalib.kernels import cuda_gemv, cutlass_w4, cutlass_w8a8

        # each module's loader also refuses a library built from another version of the source
        loaders = {m.NAME: m.load_library for m in (cutlass_w4, cutlass_w8a8, cuda_gemv)}
        missing = 0
        for name in names:
            try:
                loaders.get(name, lambda name=name: cutlass_lib.load(name))()
                print(f"{name}: ready")
            except cutlass_lib.CutlassUnavailable as exc:
                missing += 1
                print(f"{name}: {exc}")
        return 1 if missing else 0
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(
        f"building {', '.join(names)} (nvcc, one process each; the CUTLASS ones 3.5-9 "
        "minutes each on two cores)",
        flush=True,
    )

    def build(name: str) -> str:
        built = cutlass_lib.build_library(name)
        if out is not None:
            shutil.copy(built, out / f"{name}.so")
        return f"{name}: {built} ({time.time() - start:.0f} s)"

    try:
        with ThreadPoolExecutor(len(names)) as pool:  # nvcc runs in its own process
            for line in pool.map(build, names):
                print(line, flush=True)
    except cutlass_lib.CutlassUnavailable as exc:
        raise ConfigError(str(exc)) from None
    return 0
