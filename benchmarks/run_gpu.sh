#!/usr/bin/env bash
# The recorded GPU benchmark runs. Each job runs in the background (so it can outlast one device
# command) and writes into $RES/<job>; `wait` blocks until it is done (or SECONDS_MAX passed)
# and copies its results (every job writes into $RES/<job>) into $OUT as <job>.tgz.
#   bash benchmarks/run_gpu.sh start kernels e2e      # start jobs, one after another
#   bash benchmarks/run_gpu.sh wait kernels           # then collect
#   bash benchmarks/run_gpu.sh print bench-act        # only show a job's command line
#   GPU=1 bash benchmarks/run_gpu.sh start llada-fair # a second queue on the second GPU of a
#                                                     # machine of several, beside the first
# The device machine goes back after ~30 s without a command in flight, detached jobs and all:
# keep a `wait` call running (SECONDS_MAX <= the per-call limit) until the last job is done.
# The CUTLASS libraries (kernels/cutlass_lib.py: csrc/w4a16_sm90.cu, csrc/w8a8_sm90.cu) are built
# here once (about six minutes each, side by side) with
#   faircalib build-kernels --out .cutlass   # .cutlass/<name>.so, git-ignored
# and carried: give the call carry=[".whl", ".cutlass"] (without the 6 MB nvidia-cutlass wheel
# in .whl; the tree, .whl and .cutlass must stay under 64 MiB, so with the tree at 60 MB carry
# the five stripped libraries as one archive: `cd .cutlass && strip --strip-unneeded *.so &&
# tar -cJf libs.tar.xz *.so && rm *.so`, 6.6 -> 0.65 MB; `start` unpacks it outside the tree;
# jobs that do not import faircalib.formats can leave the pydantic wheels behind).
# Jobs: w4a4 (benchmarks/w4a4.py with the A4 ablation, per-layer vs block-wise transforms), w4a4-shift
# (the learned transforms with and without the input shift, FlatQuantConfig.shift), kernels, e2e,
# profile-step, generation-8b and generation-8b-graph (issue 16), throughput, bench, bench-act (activation schemes: W8A8, FP8, W4A8 (INT8/FP8), W4A4 x 6 methods,
# recorded in benchmarks/results/bench-mdlm-small-act), weighting (instability vs prior vs uniform, 3 seeds),
# reference, ablation, offload, offload3 (3 blocks), distributed (1, 2, 4 GPUs: a machine of several),
# torchrun (quantize + eval under torchrun on 2 GPUs against one process),
# cudatests (tests/test_cuda.py on the GPU), cudatests-k (PYTEST_K: a -k selection of them),
# row-quant (the per-token row quantizers alone), row-quant-probe (what holds them: the division, the
# second pass or DRAM), w8a8-rows (the 8-bit layers with and without their row quantization),
# cutlass-w4 / cutlass-w4-sk / cutlass-w4-pp / cutlass-w8a8 / cutlass-w8a8-sk / cutlass-w4a8 / cutlass-w4a8-lut (the CUTLASS
# configurations), cuda-gemv / cuda-gemv-tiles / cuda-gemv-warps / cuda-gemv-l2 / cuda-gemv-v9 (the W4A16 GEMV; its tiles, splits, warps, L2 prefetch), gemv-ncu (Nsight Compute on it), e2e-cutlass / e2e-auto (one step), llada-gptq / llada-fair / dream-gptq / dream-fair and
# llada-fair-fast / dream-fair-fast (8B-shaped,
# benchmarks/llada_8b.py; one per lease is fine, rows accumulate in benchmarks/results/llada-8b-shape). Optional wheels (gemlite)
# carried in .whl/ are installed into /tmp/site first. Jobs that import faircalib.formats (e2e,
# the packed-checkpoint jobs) need compressed-tensors, which the device lacks; its 0.20 also
# imports pydantic, pydantic_core, annotated_types, typing_inspection and loguru (the device has
# transformers and psutil). Made here, for the device's Python 3.12 (2026-11-30: ~3.1 MB):
#   pip download compressed-tensors loguru --no-deps -d .whl
#   pip download pydantic --python-version 3.12 --only-binary=:all: \
#     --platform manylinux2014_x86_64 -d .whl   # with its deps: pydantic pins pydantic_core
# and give the call carry=[".whl"].
# The device's copy of .git can be older than the files it runs (2026-11-30: every call of the
# session named the session's first commit): start the command with
# `export FAIRCALIB_GIT_COMMIT=<git rev-parse HEAD, run here>;` so the records name the right one
# (without it they carry git_dirty: true for files that differ from the copy's HEAD).
set -euo pipefail
RES=${RES:-/root/results}
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
mkdir -p "$RES"

job_command() {
  case $1 in
  # issue 16: every shape; the bare-kernel duplicates (int4_aten, fp8_aten) and the optional
  # gemlite left out, M on the grid the targets name; a budget keeps it inside one lease
  # kernels-dream: the Dream-7B shapes alone, for a lease that splits the sweep over two calls
  # (merge the two with kernels.py --merge). The backends are what `auto` runs with the CUTLASS
  # libraries carried (.cutlass) and the kernels it chooses among, each 8-bit-activation layer
  # beside its GEMM alone; the Triton W4A8 GEMMs (w4a8, w4a8_fp8, w4a8_dq, w4a8_fp8_dq: 0.17-0.75x
  # of bf16 in the d9f40f0 sweep), torch._int_mm (int8_intmm) and the W4A16 Triton GEMV, which
  # `auto` never picks, left out to keep the sweep inside one lease
  kernels|kernels-dream) echo "python3 benchmarks/kernels.py --out $RES/$1 --ms 1,16,32,64,128,256,512,1024,2048,4096 \
    --backends int4_torch,dequant_bf16,triton_w4,triton_dq,cutlass_w4,cuda_gemv,auto_w4,auto_w4_eager,fp8_scaled_mm,fp8_w8a8,fp8_triton,fp8_prequant,int8_w8a8,int8_triton,cutlass_int8,int8_prequant,cutlass_int8_prequant,cutlass_w4a8,cutlass_w4a8_lut,cutlass_w4a8_lut_alone \
    $([ "$1" = kernels-dream ] && echo --shapes 3584x18944,18944x3584,3584x512 || echo --shapes 4096x4096,4096x14336,14336x4096,4096x12288,12288x4096) \
    --time-budget ${KERNELS_BUDGET:-1200}" ;;
  e2e) echo "python3 benchmarks/e2e.py --out $RES/e2e" ;;
  # issue 16: q, k, v and gate, up stacked (kernels.stacked_linears) beside the same variants apart
  e2e-stacked) echo "python3 benchmarks/e2e.py --out $RES/e2e-stacked --variants \
bf16,bf16_stacked,int4_g128,int4_g128_stacked,fp8_checkpoint,fp8_checkpoint_stacked,fp8_w8a8,fp8_w8a8_stacked,int8_w8a8,int8_w8a8_stacked" ;;
  # the CUTLASS kernels in a whole step, beside the backends they would replace
  e2e-cutlass) echo "python3 benchmarks/e2e.py --out $RES/e2e-cutlass --variants \
bf16,int4_g128,int4_g128_cutlass,int8_w8a8,int8_w8a8_cutlass" ;;
  # `auto` with the CUTLASS kernels built (the backends column names what it ran) beside the
  # paths it took before: dequantize + cuBLAS (INT4), the Triton INT8 GEMM
  e2e-auto) echo "python3 benchmarks/e2e.py --out $RES/e2e-auto --variants \
bf16,int4_g128,int4_g128_triton_dq,w8a8_int8,int8_w8a8" ;;
  throughput) echo "python3 benchmarks/throughput.py --device cuda --out $RES/throughput" ;;
  offload) echo "python3 benchmarks/offload.py --out $RES/offload" ;;
  profile-step) echo "python3 benchmarks/profile_step.py --work /root/work --out $RES/profile-step" ;;  # issue 16
  # issue 16: shares llada-gptq's /root/work/llada/bf16 (written if missing); W4 is RTN in process
  generation-8b) echo "python3 benchmarks/generation_8b.py --work /root/work --out $RES/generation-8b" ;;
  # the same with every step (cached ones too) replayed from CUDA graphs
  generation-8b-graph) echo "python3 benchmarks/generation_8b.py --cuda-graph --work /root/work \
    --out $RES/generation-8b-graph" ;;
  # the same with q, k, v and gate, up stacked in every scheme (bf16 too)
  generation-8b-stacked) echo "python3 benchmarks/generation_8b.py --cuda-graph --stack-linears \
--work /root/work --out $RES/generation-8b-stacked" ;;
  # side by side in one run: each scheme apart and stacked, batch 1 (the stacking's case)
  # (-dream: Dream-7B's shapes, whose 3584x512 K / V the stacking was built for)
  generation-8b-stack-ab|generation-8b-stack-ab-dream) echo "python3 benchmarks/generation_8b.py \
--cuda-graph --stack-linears both --batch 1 --caches none,dual --work /root/work \
$([ "$1" = generation-8b-stack-ab-dream ] && echo --family dream) --out $RES/$1" ;;
  # batch 8 alone, bf16 and INT4 without and with the dual cache (a short lease's rerun)
  generation-8b-graph-b8) echo "python3 benchmarks/generation_8b.py --cuda-graph --work /root/work \
    --batch 8 --caches none,dual --no-w8a8-rtn --out $RES/generation-8b-graph-b8" ;;
  # the CUTLASS W4A16 kernel (kernels.cutlass_w4) beside bf16, auto and dequant + cuBLAS, every
  # shape; the library carried prebuilt in .cutlass/ (see `start`) or built here from the
  # nvidia-cutlass wheel in .whl
  cutlass-w4) echo "python3 benchmarks/kernels.py --out $RES/cutlass-w4 --ms 1,16,32,64,128,256,512,1024,2048,4096 \
--backends auto_w4,dequant_bf16,triton_dq,cutlass_w4,cutlass_w4_32,cutlass_w4_64,cutlass_w4_128,cutlass_w4_256,cutlass_w4_128_plain \
--time-budget ${KERNELS_BUDGET:-420}" ;;
  # the stream-K configurations and the tile rules (cutlass_w4.config_for, cutlass_w8a8.config_for)
  # beside auto, which takes the CUTLASS kernels where they are built
  cutlass-w4-sk) echo "python3 benchmarks/kernels.py --out $RES/cutlass-w4-sk --ms 1,16,32,64,128,256,512,1024,2048,4096 \
--backends auto_w4,triton_dq,cutlass_w4,cutlass_w4_sk64,cutlass_w4_sk128,cutlass_w4_sk256 \
--time-budget ${KERNELS_BUDGET:-300}" ;;
  # the 64-row ping-pong configurations beside the rule's pick (not yet timed)
  cutlass-w4-pp) echo "python3 benchmarks/kernels.py --out $RES/cutlass-w4-pp --ms 1,16,32,64,128,256,512,1024,2048,4096 \
--backends cutlass_w4,cutlass_w4_pp64,cutlass_w4_pp128,cutlass_w4_pp256,triton_dq \
--time-budget ${KERNELS_BUDGET:-300}" ;;
  # the CUDA GEMV (kernels.cuda_gemv) beside torch's int4 kernel, our Triton GEMV and auto, M <= 8
  cuda-gemv) echo "python3 benchmarks/kernels.py --out $RES/cuda-gemv --ms 1,2,4,8 \
--backends int4_torch,triton_gemv,cuda_gemv,auto_w4 --time-budget ${KERNELS_BUDGET:-200}" ;;
  # its row tiles a warp and K splits fixed, beside the rules' choice (cuda_gemv.tiles_for, splits_for)
  cuda-gemv-tiles) echo "python3 benchmarks/kernels.py --out $RES/cuda-gemv-tiles --ms 1,8 \
--backends cuda_gemv,cuda_gemv_t1,cuda_gemv_t2,cuda_gemv_t1_s2,cuda_gemv_t1_s4 --time-budget ${KERNELS_BUDGET:-200}" ;;
  # 4 warps a block against 8, beside torch's int4 kernel and auto
  cuda-gemv-warps) echo "python3 benchmarks/kernels.py --out $RES/cuda-gemv-warps --ms 1,2,4,8 \
--backends int4_torch,cuda_gemv,cuda_gemv_t2_w4,auto_w4 --time-budget ${KERNELS_BUDGET:-200}" ;;
  # the code loads with and without the 256-byte L2 fetch, beside torch's int4 kernel
  cuda-gemv-l2) echo "python3 benchmarks/kernels.py --out $RES/cuda-gemv-l2 --ms 1,2,4,8 \
--backends int4_torch,cuda_gemv,cuda_gemv_t2_nopf,auto_w4 --time-budget ${KERNELS_BUDGET:-200}" ;;
  # 4, 8 or 16 warps a block beside the rules' choice and torch's, M <= 8. Earlier variants, each
  # since removed, in their own results: cuda-gemv-ring (a0717d9: a cp.async ring of 4 or 6
  # steps), cuda-gemv-depth (d981670: loading 2 steps ahead), cuda-gemv-warps16 (dbba05f: with
  # and without the L2 prefetch), cuda-gemv-v8 (8837ff5: immediate step offsets), cuda-gemv-feed
  # (96fbb47: the activations read just in time, the codes two steps ahead, one tile a warp)
  cuda-gemv-v9) echo "python3 benchmarks/kernels.py --out $RES/cuda-gemv-v9 --ms 1,2,4,8 \
--backends int4_torch,cuda_gemv,cuda_gemv_w4,cuda_gemv_w8,cuda_gemv_w16,auto_w4 \
--time-budget ${KERNELS_BUDGET:-240}" ;;
  # Nsight Compute on the GEMV's ways of feeding its warps (scripts/gemv_profile.py), M = 1
  gemv-ncu) echo "mkdir -p $RES/gemv-ncu; for shape in 4096x14336 14336x4096; do ncu --clock-control none \
-k regex:gemv --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
--section LaunchStats --section WarpStateStats --section SchedulerStats --log-file $RES/gemv-ncu/ncu-\$shape.txt \
python3 scripts/gemv_profile.py --shape \$shape --out $RES/gemv-ncu; done; tail -5 $RES/gemv-ncu/ncu-14336x4096.txt" ;;
  cutlass-w8a8-sk) echo "python3 benchmarks/kernels.py --out $RES/cutlass-w8a8-sk --ms 32,128,256,512,1024,2048,4096 \
--backends int8_w8a8,cutlass_int8,cutlass_int8_prequant,cutlass_int8_prequant_c5,cutlass_int8_prequant_c6 \
--time-budget ${KERNELS_BUDGET:-240}" ;;
  # W4A8 (e4m3 activations) on CUTLASS's block-scaled FP8 GEMM beside the Triton W4A8 ones:
  # the backend (its tile rule), each tile, the GEMM alone, and what auto runs for a W4AFP8
  # layer; every shape at M >= 256
  cutlass-w4a8) echo "python3 benchmarks/kernels.py --out $RES/cutlass-w4a8 --ms 256,1024,2048,4096 \
--backends w4a8_fp8_dq,fp8_w8a8,auto_w4afp8,cutlass_w4a8,cutlass_w4a8_alone,cutlass_w4a8_c0,cutlass_w4a8_c1,cutlass_w4a8_c2,cutlass_w4a8_c3,\
cutlass_w4a8_alone_c0,cutlass_w4a8_alone_c1,cutlass_w4a8_alone_c2,cutlass_w4a8_alone_c3 \
--time-budget ${KERNELS_BUDGET:-240}" ;;
  # W4A8 with the INT4 weight converted in registers through per-group e4m3 tables
  # (kernels.cutlass_w4a8_lut) beside the block-scaled FP8 GEMM and per-channel FP8
  cutlass-w4a8-lut) echo "python3 benchmarks/kernels.py --out $RES/cutlass-w4a8-lut --ms 256,1024,2048,4096 \
--backends fp8_w8a8,cutlass_w4a8,cutlass_w4a8_lut_c0,cutlass_w4a8_lut_c1,cutlass_w4a8_lut_c2,cutlass_w4a8_lut_c3,\
cutlass_w4a8_lut_c4,cutlass_w4a8_lut_c5,cutlass_w4a8_lut_alone_c1,cutlass_w4a8_lut,auto_w4afp8,auto_w4afp8_e8m0 \
--time-budget ${KERNELS_BUDGET:-240}" ;;
  # the same below M = 256 (cached block decoding runs M = 32 x batch), beside what auto runs
  # there for W4AFP8 layers and for W4A16 ones
  cutlass-w4a8-lut-small) echo "python3 benchmarks/kernels.py --out $RES/cutlass-w4a8-lut-small --ms 1,8,16,32,64,128,256 \
--backends auto_w4,auto_w4afp8,auto_w4afp8_e8m0,cutlass_w4a8_lut_c0,cutlass_w4a8_lut_c1,cutlass_w4a8_lut_c2,\
cutlass_w4a8_lut_c3,cutlass_w4a8_lut_c4,cutlass_w4a8_lut_c5,cutlass_w4a8_lut_c6,cutlass_w4a8_lut_c7,cutlass_w4a8_lut_c8 \
--time-budget ${KERNELS_BUDGET:-240}" ;;
  # one LLaDA-8B-shaped step: W4AFP8 as auto runs it, with zero points and with e8m0 scales
  e2e-w4a8) echo "python3 benchmarks/e2e.py --out $RES/e2e-w4a8 --variants \
bf16,fp8_w8a8,int4_g128,w4a8_fp8_auto,w4a8_fp8_e8m0" ;;
  # the per-token row quantizers alone: rows held in registers against rows in passes
  row-quant) echo "python3 benchmarks/row_quant.py --out $RES/row-quant" ;;
  # what holds the row quantizer: its division, its second pass, or DRAM
  row-quant-probe) echo "python3 benchmarks/probe_row_quant_arith.py --out $RES/row-quant-probe" ;;
  # the 8-bit-activation layers with their own per-token quantization, beside their GEMMs alone,
  # on every shape at M >= 1024 (the W8A8 / W4A8 targets)
  w8a8-rows) echo "python3 benchmarks/kernels.py --out $RES/w8a8-rows --ms 1024,2048,4096 \
--backends fp8_w8a8,fp8_prequant,int8_w8a8,cutlass_int8,cutlass_int8_prequant,cutlass_w4a8_lut,\
cutlass_w4a8_lut_alone_c1 --time-budget ${KERNELS_BUDGET:-400}" ;;
  # the W4AFP8 grids on mdlm-small: zero-point-free float scales against power-of-two ones
  bench-e8m0) echo "python3 -m faircalib.cli bench mdlm-small --device cuda \
    --methods rtn,gptq,flatquant,fair --schemes w4a8fp8,w4a8fp8-e8m0 --nsamples 128 \
    --mc-samples 2 --flip-prompts 32 --flip-gen-length 64 --flip-steps 64 --out $RES/bench-e8m0" ;;
  # the CUTLASS libraries built on the device itself (when the carried ones do not load there),
  # copied into .cutlass, where the jobs after it look (FAIRCALIB_CUTLASS_DIR)
  cutlass-build) echo "python3 -m faircalib.cli build-kernels --out $RES/cutlass-build; mkdir -p .cutlass; \
cp $RES/cutlass-build/*.so .cutlass/" ;;
  # the CUTLASS INT8 W8A8 GEMM (kernels.cutlass_w8a8) beside our Triton ones, quantization
  # included and the GEMM alone (prequant), every shape at M >= 256
  cutlass-w8a8) echo "python3 benchmarks/kernels.py --out $RES/cutlass-w8a8 --ms 256,512,1024,2048,4096 \
--backends int8_w8a8,int8_prequant,fp8_w8a8,cutlass_int8,cutlass_int8_prequant,cutlass_int8_prequant_c0,\
cutlass_int8_prequant_c1,cutlass_int8_prequant_c2,cutlass_int8_prequant_c3,cutlass_int8_prequant_c4 \
--time-budget ${KERNELS_BUDGET:-420}" ;;
  # the GPU-only tests of one feature (PYTEST_K: a pytest -k expression; unset: all)
  cudatests-k) echo "mkdir -p $RES/cudatests-k; python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    -k '${PYTEST_K:-}' > $RES/cudatests-k/cuda-tests.txt 2>&1; tail -3 $RES/cudatests-k/cuda-tests.txt" ;;
  offload3) echo "python3 benchmarks/offload.py --blocks 3 --out $RES/offload3" ;;
  distributed) echo "python3 benchmarks/distributed.py --out $RES/distributed" ;;  # 2-4 GPUs
  # issue 19: the user's commands under torchrun on 2 GPUs (NCCL) vs one process, same files?
  torchrun) echo "bash benchmarks/torchrun_check.sh $RES/torchrun" ;;
  # test_lease_dryrun.py: the GPU-only branches of the issue-16 jobs at their smallest size
  cudatests) echo "mkdir -p $RES/cudatests; python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_lease_dryrun.py > $RES/cudatests/cuda-tests.txt 2>&1; tail -3 $RES/cudatests/cuda-tests.txt" ;;
  reference) echo "python3 benchmarks/reference_models.py --device cuda --mc-samples 1,4 --out $RES/reference" ;;
  bench) echo "python3 -m faircalib.cli bench mdlm-small --device cuda \
    --methods rtn,gptq,awq,recon,fair --schemes w4g128,w4pc,w3g128,w3pc,w2g64,w8pc \
    --calib-seeds 0,1,2 --seeded-schemes w4g128,w3g128 --nsamples 128 --mc-samples 2 \
    --flip-prompts 32 --flip-gen-length 64 --flip-steps 64 --out $RES/bench" ;;
  bench-act) echo "python3 -m faircalib.cli bench mdlm-small --device cuda \
    --methods rtn,gptq,smoothquant,quarot,flatquant,fair --schemes w8a8,w8a8fp8,w4a8,w4a8fp8,w4a4 --nsamples 128 \
    --mc-samples 2 --flip-prompts 32 --flip-gen-length 64 --flip-steps 64 --out $RES/bench-act" ;;
  w4a4) echo "python3 benchmarks/w4a4.py --device cuda --schemes w4a4 --ablation --eval-data wikitext2,c4 \
    --methods quarot,flatquant,flatquant-gptq,fair,fair-gptq,fair-gptq+block100,fair-gptq+gamma0.5,fair-gptq+uniform,fair-gptq+steps400 \
    --out $RES/w4a4" ;;
  w4a4-shift) echo "python3 benchmarks/w4a4.py --device cuda --schemes w4a4 --eval-data wikitext2,c4 \
    --methods flatquant-gptq+noshift,flatquant+meanshift,flatquant-gptq+meanshift,flatquant-gptq+shift,fair-gptq+noshift,fair-gptq+meanshift,fair-gptq+shift \
    --out $RES/w4a4-shift" ;;
  weighting) echo "python3 benchmarks/recon_sweep.py --model mdlm-small --device cuda \
    --schemes w3g128 --seeds 0,1,2 --variants fair,fair-prior,recon --out $RES/weighting" ;;
  ablation) echo "python3 benchmarks/fair_ablation.py --model mdlm-small --device cuda \
    --schemes 4:128,3:128 --nsamples 128,32,512 --out $RES/ablation" ;;
  llada-gptq|llada-fair|dream-gptq|dream-fair)  # 8B-shaped rows, added to the recorded table
    echo "mkdir -p $RES/$1; cp benchmarks/results/llada-8b-shape/llada_8b.json $RES/$1/ 2>/dev/null; \
    python3 benchmarks/llada_8b.py --family ${1%-*} --method ${1#*-} --work /root/work --out $RES/$1" ;;
  llada-fair-fast|dream-fair-fast)  # FAIR-Calib's weighted GPTQ without block reconstruction
    echo "mkdir -p $RES/$1; cp benchmarks/results/llada-8b-shape/llada_8b.json $RES/$1/ 2>/dev/null; \
    python3 benchmarks/llada_8b.py --family ${1%%-*} --method fair --label fair-preset-fast \
    --work /root/work --out $RES/$1 -- --fair-preset fast" ;;
  *) echo "unknown job $1" >&2; exit 2 ;;
  esac
}

case ${1:?start|wait|print} in
print)  # the command lines of the jobs, one a line (tests/test_lease_dryrun.py parses them)
  shift
  for job in "$@"; do job_command "$job"; done
  ;;
start)
  shift
  if ls .whl/*.whl > /dev/null 2>&1 && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || true
  fi
  script=$RES/jobs-$$.sh
  echo "cd $PWD" > "$script"
  if [ -n "${GPU:-}" ]; then echo "export CUDA_VISIBLE_DEVICES=$GPU" >> "$script"; fi
  # the CUTLASS libraries (kernels/cutlass_lib.py): carried in .cutlass (as <name>.so, or
  # compressed as libs.tar.xz: 6.6 MB of libraries in 0.65 MB, where the tree leaves no room),
  # or put there by the cutlass-build job; never built inside a timed job. Copied out of the
  # carried tree first: every later device call replaces .cutlass with what it carries, and a
  # job started after that (the second of `start kernels kernels-dream`, 2026-12-02) found
  # only the archive there and ran without the libraries.
  libs=/root/cutlass-libs
  mkdir -p "$libs"
  if [ -f .cutlass/libs.tar.xz ]; then
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
      .cutlass/libs.tar.xz "$libs"
  fi
  cp .cutlass/*.so "$libs"/ 2> /dev/null || true
  echo "export FAIRCALIB_CUTLASS_DIR=$libs" >> "$script"
  for job in "$@"; do
    rm -f "$RES/$job.done"
    # braced: a job of several commands (cudatests) logs all of them, from its start
    echo "{ $(job_command "$job"); } > $RES/$job.log 2>&1; echo \$? > $RES/$job.done" >> "$script"
  done
  setsid nohup bash "$script" > /dev/null 2>&1 < /dev/null &
  echo "started: $*"
  ;;
wait)
  job=${2:?job}
  for _ in $(seq 1 $(( ${SECONDS_MAX:-500} / 5 ))); do [ -f "$RES/$job.done" ] && break; sleep 5; done
  tr '\r' '\n' < "$RES/$job.log" | grep -v "it/s\]$" | tail -n "${TAIL:-15}" || true
  if [ -f "$RES/$job.done" ]; then
    echo "$job exit $(cat "$RES/$job.done")"
    mkdir -p "$RES/$job" && cp "$RES/$job.log" "$RES/$job/"
    tar -C "$RES" -czf "$OUT/$job.tgz" "$job"
  else
    echo "$job still running"
    tr '\r' '\n' < "$RES/$job.log" | grep -v "it/s\]$" > "$OUT/$job-running.log" || true
  fi
  ;;
esac
