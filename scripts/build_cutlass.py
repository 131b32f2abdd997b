"""Build the CUTLASS libraries (src/faircalib/kernels/csrc/*.cu) in parallel, one nvcc each,
and copy them to OUT/<name>.so: the directory FAIRCALIB_CUTLASS_DIR names on a machine that
should not build them itself (the GPU lease: build here, carry OUT).

    python scripts/build_cutlass.py --out .cutlass            # every library
    python scripts/build_cutlass.py --out .cutlass w8a8_sm90  # one
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from faircalib.kernels import cutlass_lib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("names", nargs="*", help="libraries (default: every csrc/*.cu)")
    p.add_argument("--out", required=True, help="where <name>.so go")
    args = p.parse_args(argv)
    names = args.names or sorted(f.stem for f in cutlass_lib.CSRC.glob("*.cu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def build(name: str) -> str:
        built = cutlass_lib.build_library(
            name
        )  # nvcc is one process: threads run them side by side
        shutil.copy(built, out / f"{name}.so")
        return f"{name}: {built} ({time.time() - start:.0f} s)"

    try:
        with ThreadPoolExecutor(len(names)) as pool:
            for line in pool.map(build, names):
                print(line)
    except cutlass_lib.CutlassUnavailable as exc:
        print(f"build_cutlass: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
