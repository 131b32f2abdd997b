#!/usr/bin/env bash
# The user's commands under torchrun on 2 GPUs (NCCL) against one process: GPTQ W4 g128 and FAIR-Calib
# `fast` of the shipped mdlm-small, then the likelihood bound of each result. Writes OUT/torchrun.md
# (the commands, sha256 of every written tensor file, the bounds) and each command's log.
#   bash benchmarks/torchrun_check.sh OUT        # a machine of 2+ GPUs
set -euo pipefail
OUT=${1:?output folder}
mkdir -p "$OUT"
W=/tmp/torchrun-check
rm -rf "$W" && mkdir -p "$W"
TR="python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m faircalib.cli"
ONE="python3 -m faircalib.cli"
MODEL=${MODEL:-mdlm-small} DEVICE=${DEVICE:-cuda}  # MODEL=mdlm-tiny DEVICE=cpu: a CPU check of this script
# torchrun gives each CPU rank one thread; a CPU's float sums depend on the thread count, so the
# one-process run gets one thread too (GPU kernels do not depend on it)
if [ "$DEVICE" = cpu ]; then export OMP_NUM_THREADS=1; fi
COMMON="--bits 4 --group-size 128 --nsamples ${NSAMPLES:-64} --device $DEVICE --format fake"
{
  echo "# torchrun on 2 ranks vs one process ($MODEL, $DEVICE)"
  echo
  echo "Commit: ${FAIRCALIB_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}  "
  echo "Device: $( [ "$DEVICE" = cpu ] && echo CPU || echo "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $(nvidia-smi -L | wc -l)")"
  echo "Date: $(date -u +%Y-%m-%dT%H:%M:%S+00:00)"
  echo
  echo "| method | run | command | seconds | sha256 of the weights file | bound (eval) |"
  echo "|---|---|---|---:|---|---|"
} > "$OUT/torchrun.md"
declare -A sums bounds
verdicts=()
for method in gptq "fair --fair-preset fast"; do
  tag=${method%% *}
  for run in one torchrun; do
    launcher=$ONE; [ "$run" = torchrun ] && launcher=$TR
    dir="$W/$tag-$run"
    cmd="$launcher quantize $MODEL --method $method $COMMON --out $dir"
    start=$(date +%s.%N)
    $cmd > "$OUT/$tag-$run-quantize.log" 2>&1
    secs=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
    sha=$(sha256sum "$dir"/*.safetensors | awk '{print substr($1, 1, 16)}' | paste -sd, -)
    $launcher eval "$dir" --data wikitext2 --device $DEVICE ${EVAL_ARGS:-} > "$OUT/$tag-$run-eval.log" 2>&1
    bound=$({ grep -iE "perplexity|bits/byte|nll" "$OUT/$tag-$run-eval.log" || echo "no bound printed"; } \
      | tail -1 | tr '|' ' ')
    echo "| $tag | $run | \`${cmd#python3 -m }\` | $secs | $sha | $bound |" >> "$OUT/torchrun.md"
    sums[$run]=$sha
    bounds[$run]=${bound#* on }  # the bound without the directory name
  done
  same=no
  if [ "${sums[one]}" = "${sums[torchrun]}" ] && [ "${bounds[one]% [0-9]*s}" = "${bounds[torchrun]% [0-9]*s}" ]; then
    same=yes
  fi
  verdicts+=("$tag: same weight files and bound under torchrun as in one process: $same")
done
{ echo; printf '%s  \n' "${verdicts[@]}"; } >> "$OUT/torchrun.md"
cat "$OUT/torchrun.md"
# a difference fails the job (the table above says where)
! printf '%s\n' "${verdicts[@]}" | grep -q ": no$"
