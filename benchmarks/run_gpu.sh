#!/usr/bin/env bash
# The recorded GPU benchmark run (H100): reference-model bounds, the method comparison on
# mdlm-small, kernels. Results land in $OUT (device tool) or benchmarks/results/.
#   bash benchmarks/run_gpu.sh [part]    part: ref | bench | kernels | all (default)
set -euo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PYTHONPATH:/tmp/site
OUTDIR=${OUT:-benchmarks/results}
part=${1:-all}
if [[ $part == ref || $part == all ]]; then
  python3 benchmarks/reference_models.py --device cuda --mc-samples 1,4 --out "$OUTDIR/reference"
fi
if [[ $part == bench || $part == all ]]; then
  python3 -m faircalib.cli bench --model mdlm-small --device cuda \
    --methods rtn,gptq,awq,smoothquant,fair --schemes w4g128,w4pc,w3g128,w8pc \
    --calib-seeds 0,1,2 --seeded-schemes w4g128 --nsamples 128 --eval-mc-samples 2 \
    --flip-prompts 32 --flip-gen-length 64 --flip-steps 64 --out "$OUTDIR/bench-mdlm-small"
fi
if [[ $part == kernels || $part == all ]]; then
  python3 benchmarks/kernels.py --out "$OUTDIR/kernels"
fi
