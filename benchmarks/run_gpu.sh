#!/usr/bin/env bash
# The recorded GPU benchmark run (H100). `start` launches every part in the background (so the
# run can outlast one device command); `collect` waits and packs the results into $OUT.
#   bash benchmarks/run_gpu.sh start ; bash benchmarks/run_gpu.sh collect
set -euo pipefail
RES=${RES:-/root/results}
case ${1:?start|collect} in
start)
  mkdir -p "$RES"; rm -f "$RES/done"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || true
  cat > "$RES/job.sh" <<JOB
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
cd $PWD
[ -f $RES/kernels/kernels.json ] || python3 benchmarks/kernels.py --out $RES/kernels > $RES/kernels.log 2>&1
python3 -m faircalib.cli bench --model mdlm-small --device cuda \
  --methods rtn,gptq,awq,smoothquant,fair --schemes w4g64,w4pc,w3g64,w8pc \
  --calib-seeds 0,1,2 --seeded-schemes w4g64 --nsamples 128 --eval-mc-samples 2 \
  --flip-prompts 32 --flip-gen-length 64 --flip-steps 64 --out $RES/bench-mdlm-small > $RES/bench.log 2>&1
[ -f $RES/reference/reference_models.json ] || python3 benchmarks/reference_models.py --device cuda --mc-samples 1,4 --out $RES/reference > $RES/reference.log 2>&1
touch $RES/done
JOB
  setsid nohup bash "$RES/job.sh" > "$RES/job.log" 2>&1 < /dev/null &
  sleep 45; tail -n 5 "$RES/job.log" "$RES/bench.log" || true
  ;;
collect)
  for _ in $(seq 1 "${POLLS:-110}"); do [ -f "$RES/done" ] && break; sleep 5; done
  tail -c 1500 "$RES/bench.log" | tr '\r' '\n' | grep -v "it/s" | tail -20 || true
  tail -3 "$RES/kernels.log" "$RES/reference.log" || true
  tar -C "$RES" -czf "$OUT/results.tgz" . && ls -la "$OUT"
  ;;
esac
