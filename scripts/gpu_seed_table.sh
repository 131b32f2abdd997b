#!/usr/bin/env bash
# The seed table in ONE GPU lease (issue 15): carry the pre-tokenised corpus in pieces, train
# mdlm-base (and, if time allows, diffusionlm-base and planner-small), then
# benchmarks/seed_table.py on them and the shipped mdlm-small; results into $OUT.
#
# Budget (30 min of device time = 1800 s; one command <= 600 s; the machine keeps files while
# warm, so training and the table run in the background and later calls poll them):
#   machine start (first call)                               ~30 s (measured 2026-11-29)
#   gather  x K calls, two 3.9 MiB pieces each (~5 s/call, as measured in the 2026-11-29
#           lease; a call carries <= 64 MiB, the ~58 MB tree included)  K=8 (all 16): ~40 s
#   base    mdlm-base, BASE_SECONDS=480 of training + ~60 s compile/load/save   ~540 s
#           (gather calls may go on meanwhile: pieces for the Gaussian families)
#   families diffusionlm-base + planner-small side by side, FAMILY_SECONDS=150 each ~200 s
#   table   4 models x 5 columns (FAIR full preset)          ~420 s (mdlm-small: 60 s on an
#           H200 in bench-mdlm-small; mdlm-base ~5x its weights; Gaussian bases ~120 s each)
#   w4a4     (optional, issue 14) W4A4 on mdlm-base beside the table: ~300 s, no extra if
#            it ends before the table does (an estimate: mdlm-small's fair cell took 21 s)
#   collect                                                  ~20 s
#   total ~1330 s + polling slack; behind schedule: SKIP_FAMILIES=1 (saves ~200 s); the table
#   records models that were not trained as "not run" (--skip-missing).
#
# FAMILIES-ONLY lease (MERGE_FAMILIES=1; the 2026-11-29 lease gave the Gaussian families 150 s,
# too little: bounds at unigram level, quantized columns equal to float): train diffusionlm-base
# and planner-small side by side for FAMILY_SECONDS=600 each, then measure only those two and
# merge them into the committed benchmarks/results/seed-table/seed_table.json (tracked, so it
# travels with the tree; seed_table.py --merge keeps the MDLM rows and their run records).
#   machine start (first call)                                ~30 s (measured 2026-11-29)
#   gather  x 7 calls, pieces 0..13, two a call (~5 s/call)    ~35 s
#   families (8th call, carries pieces 14 15): all 16 pieces (64 M tokens) assembled, both
#            models started; the 600 s budget includes their ~55-80 s compile   ~100 s in the call
#   status  HOLD=540 (training continues in the background)    ~540 s
#   table   MERGE_FAMILIES=1: waits for the end of training (~80 s more: budget, final eval,
#           save), then 2 models x 5 columns (last lease: diffusionlm-base 87 s, planner-small
#           215 s, both FAIR-dominated)                        ~420 s
#   collect                                                    ~20 s
#   total ~1145 s + polling slack (~650 s spare: a failed call can be repeated, or run the
#   `w4a4` job of benchmarks/run_gpu.sh beside the table for issue 14)
# DIFFUSION-LM-ONLY lease (after the 2026-11-29 families lease: planner-small is measured, the
# Diffusion-LM stayed at unigram level until its preset got final_norm): every call with
# MERGE_FAMILIES=1 FAMILIES=diffusionlm-base - the same calls as below, ~900 s in all (the GPU
# is its alone for 600 s; its five table columns took ~130 s in the last lease).
# Every call of this lease sets MERGE_FAMILIES=1 (FAMILY_SECONDS then defaults to 600):
#   here: bash scripts/gpu_seed_table.sh stage 0 1; there: MERGE_FAMILIES=1 bash scripts/gpu_seed_table.sh gather
#   ... the same for pieces 2 3 .. 12 13; then stage 14 15 and MERGE_FAMILIES=1 ... families
#   MERGE_FAMILIES=1 HOLD=540 ... status; MERGE_FAMILIES=1 TABLE_POLLS=80 ... table; ... collect
# Batch sizes (DLM_BATCH=256, PLANNER_BATCH=128; docs/training.md, "Diffusion-LM and PLANNER"):
# 32 k tokens a step for both. The last lease's 10.7 steps/s was the average over 150 s
# including ~55 s of compile; at steady state both ran ~19-21 steps/s side by side at 16 k
# tokens a step (~310-330 k tokens/s each): the GPU is not idle, so the larger batch is chosen
# for the gradient (one t per sequence: twice the sequences halve the loss's variance), at
# half the steps (~6 k each in 600 s, ~190 M tokens, ~3 passes over the 64 M). A lease that
# shows a much lower step rate: DLM_BATCH=128 PLANNER_BATCH=64.
# Throughput estimate behind BASE_SECONDS (docs/training.md): mdlm-base is 105 M parameters,
# ~0.60 GFLOP per training token (6 x 91 M matmul weights + attention at 512 tokens); at an
# assumed 250 TFLOP/s effective (bf16, --compile) that is ~4.1e5 tokens/s, ~2.0e8 tokens in
# 480 s. Data: xz'd uint16 token pieces carry ~1.10 M tokens per MiB (measured; the xz'd jsonl
# text carries 1.00 M); the packed pieces (scripts/token_pieces.manifest.json: 16 pieces, 64 M
# tokens) hold ~4.1 M tokens each; all 16 give ~3 epochs in 480 s. Measured 2026-11-29: 6.4
# steps/s, 184 M tokens, 2.143 bits/byte: compute-bound, not data-bound (docs/training.md).
#
# The machine goes back ~30 s after a call ends (background jobs die with it): issue the calls
# back to back, and where nothing else is due, `status` with HOLD=<seconds> keeps one in flight.
# Phases (one call each; every phase first copies the carried .gpu/tokens-carry into $PIECES,
# so any call can bring more pieces):
#   gather   : only that; prints what is present
#   base     : assemble the pieces present into a token file, start mdlm-base in the background
#   status   : progress of the background jobs (any time; also a way to carry more pieces)
#   families : re-assemble (more pieces may have come), start the two Gaussian models
#   w4a4     : optional (issue 14), any time after `base`: wait for mdlm-base, then W4A4 on it
#              (benchmarks/w4a4.py: rtn, quarot, flatquant, fair) in the background, beside the
#              table on the same GPU (both are small next to an H200); collect returns it
#   table    : wait for training, start benchmarks/seed_table.py in the background, wait for it
#              (MERGE_FAMILIES=1: only the two Gaussian models, merged into $MERGE_INTO)
#   collect  : wait for the table; at most 8 files into $OUT
#   grid     : the real diffusionlm-base preset at DLM_GRID's sizes and rates, side by side
#              (GRID_SECONDS each); `pick` waits, writes $OUT/grid.json and the logs, and copies
#              the arm with the lowest final held-out bound to $RUNS/diffusionlm-base (then
#              MERGE_FAMILIES=1 FAMILIES=diffusionlm-base ... table / collect)
#   ablate   : the 2 x 128 pilot with each piece of the twelfth session's trainer loop (fused
#              AdamW, torch.compile, the device-side draws) and the trainer itself, eager,
#              compiled and with the old loop (ABLATE_ARMS, ABLATE_WALL=300; one call ~380 s,
#              piece 0 carried; logs into $OUT). Run 2026-11-30: no piece mattered; the pilots'
#              "break-through" was their evaluation windows (docs/models.md)
#   sizes    : the Diffusion-LM size / learning-rate sweep (DLM_SIZES; one call, ~300 s, piece 0
#              carried), one log an arm into $OUT (docs/training.md, "Diffusion-LM on Wikipedia: where it stands")
# Pieces are made here (CPU): faircalib data pack-tokens <shards> --tokenizer $TOK --out
# .gpu/tokens --max-piece-mib 3.9 (docs/training.md); before gather call i run, here,
# `scripts/gpu_seed_table.sh stage i [j]` and give the call carry=[".gpu/tokens-carry"]. Two pieces
# fit beside a tree of <= ~58.7 MB; the tree is ~59.3 MB since 2026-11-29: stage ONE piece a
# call (16 gather calls, ~6 s each), or the check below refuses.
set -euo pipefail
phase=${1:?phase}
RUNS=${RUNS:-/root/runs}
PIECES=${PIECES:-/root/pieces}
CARRY=${CARRY:-.gpu/tokens-carry}
TOK=src/faircalib/assets/tokenizers/wiki-bpe-8k.json
BASE_SECONDS=${BASE_SECONDS:-480}
# the families-only lease trains them 600 s; the full plan, after mdlm-base, 150 s
if [ "${MERGE_FAMILIES:-0}" = 1 ]; then FAMILY_SECONDS=${FAMILY_SECONDS:-600}; fi
FAMILY_SECONDS=${FAMILY_SECONDS:-150}
DLM_BATCH=${DLM_BATCH:-256} DLM_LR=${DLM_LR:-1e-3}
# extra `faircalib train` options for diffusionlm-base, e.g. DLM_ARGS="--independent-t 1.0"
# (the preset already trains with 0.5, the seed table's row; docs/models.md, "Per-position
# noise levels")
PLANNER_BATCH=${PLANNER_BATCH:-128} PLANNER_LR=${PLANNER_LR:-1e-3}
MERGE_INTO=${MERGE_INTO:-benchmarks/results/seed-table/seed_table.json}
# the Gaussian models the families phase trains and the table measures (FAMILIES=diffusionlm-base:
# only that one, e.g. to retrain it with the final LayerNorm while planner-small's row stays)
FAMILIES=${FAMILIES:-diffusionlm-base planner-small}
for name in $FAMILIES; do
  [[ $name =~ ^(diffusionlm-base|planner-small)$ ]] || { echo "FAMILIES: unknown model $name" >&2; exit 2; }
done
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
[[ $phase =~ ^(stage|print)$ ]] || mkdir -p "$RUNS" "$PIECES"
# every call may carry pieces (the tree and the carry travel together, 64 MiB a call)
[[ $phase =~ ^(stage|print)$ ]] || [ ! -d "$CARRY" ] || cp "$CARRY"/* "$PIECES"/ 2>/dev/null || true

# GPUs on this machine (the phases that run arms side by side spread them over these)
NGPU=$( { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' || true); [ "$NGPU" -ge 1 ] || NGPU=1
background() {  # name, command: run detached, mark $RUNS/name.done when it ends
  rm -f "$RUNS/$1.done"; : > "$RUNS/$1.log"  # the log marks it started before it runs
  setsid nohup bash -c "$2 > $RUNS/$1.log 2>&1; echo \$? > $RUNS/$1.done" > /dev/null 2>&1 &
}
wait_for() {  # polls of 5 s, names: until every started job (one with a log) is done
  local polls=$1; shift
  for _ in $(seq 1 "$polls"); do
    local pending=0
    for name in "$@"; do
      [ -f "$RUNS/$name.log" ] && [ ! -f "$RUNS/$name.done" ] && pending=1
    done
    [ $pending = 0 ] && return 0
    sleep 5
  done
  echo "still running after $((polls * 5)) s: $*"
}
progress_free() {  # a log without tqdm's progress lines; a JSON record tqdm's \r left on the
  # same line as a progress bar goes on its own line first (the 2026-11-30 logs lost them)
  tr '\r' '\n' | sed 's/{"/\n{"/' | { grep -v 'it/s.*\]$' || true; }
}
assemble() {  # the pieces present -> $1 (uint16 .npy read by --token-cache)
  # checked against the tracked manifest (scripts/token_pieces.manifest.json) and tokenizer
  python3 -m faircalib.cli data assemble-tokens "$PIECES" --out "$1" --tokenizer "$TOK" \
    --manifest scripts/token_pieces.manifest.json | tee "$RUNS/$(basename "$1").json"
}
train_cmd() {  # preset, batch size, lr, seconds, token file[, output name (the preset's)]
  echo "python3 -m faircalib.commands.train --token-cache $5 --tokenizer $TOK --compile \
    --preset $1 --batch-size $2 --lr $3 --warmup-steps 200 --max-steps 1000000 \
    --time-budget $4 --eval-every 500 --seed 0 --out $RUNS/${6:-$1}"
}

# the Diffusion-LM size / learning-rate sweep (`sizes` phase; docs/training.md, "Next
# Diffusion-LM lease"): arms BLOCKSxHIDDEN@LR, run side by side on the one GPU
DLM_SIZES=${DLM_SIZES:-2x128@1e-3 4x256@1e-3 4x256@6e-4 6x384@6e-4 6x384@3e-4 12x768@3e-4}
sizes_cmd() {  # one arm BLOCKSxHIDDEN@LR, token file: the pilot's full-objective (pert) run
  local blocks=${1%%x*} rest=${1#*x}
  [[ $1 =~ ^[0-9]+x[0-9]+@[0-9.e-]+$ ]] || { echo "DLM_SIZES: arm '$1' is not BLOCKSxHIDDEN@LR" >&2; return 2; }
  echo "python3 scripts/pilots/diffusionlm_readz.py --arm pert --tokens $2 --device cuda \
    --batch 256 --blocks $blocks --hidden ${rest%@*} --lr ${1#*@} --wall ${SIZES_WALL:-240} \
    --every 250 --windows 64"
}

# the Diffusion-LM grid (`grid` phase): the real preset trained by `faircalib train` at several
# sizes and rates side by side, each its own directory; `pick` keeps the lowest final held-out
# bound as $RUNS/diffusionlm-base for the table (the pilots' sweep is `sizes`, above)
DLM_GRID=${DLM_GRID:-4x256@1e-3 6x384@1e-3 6x384@6e-4 8x512@6e-4 8x512@3e-4}
GRID_SECONDS=${GRID_SECONDS:-450}
# an arm is BLOCKSxHIDDEN@LR, optionally followed by `faircalib train` options of its own:
# +time-warp=64, +embed-dim=16 (each +name[=value] becomes --name [value])
ARM_RE='^[0-9]+x[0-9]+@[0-9.e-]+(\+[a-z-]+(=[0-9.e-]+)?)*$'
arm_name() { local a=${1/@/-}; a=${a//+/-}; echo "dlm-${a//=/}"; }  # dlm-4x256-2e-3-time-warp64
grid_cmd() {  # one arm, token file: diffusionlm-base at that size (64-wide heads)
  [[ $1 =~ $ARM_RE ]] || { echo "DLM_GRID: arm '$1' is not BLOCKSxHIDDEN@LR[+option[=value]]..." >&2; return 2; }
  local blocks=${1%%x*} rest=${1#*x} hidden lr extra="" opt
  hidden=${rest%@*} lr=${rest#*@}
  IFS=+ read -r -a opts <<< "$lr"; lr=${opts[0]}
  for opt in "${opts[@]:1}"; do extra="$extra --${opt%%=*}"; [[ $opt == *=* ]] && extra="$extra ${opt#*=}"; done
  echo "$(train_cmd diffusionlm-base "$DLM_BATCH" "$lr" "$GRID_SECONDS" "$2" "$(arm_name "$1")") \
    --n-blocks $blocks --hidden-dim $hidden --n-heads $((hidden / 64)) --eval-every 250 ${DLM_ARGS:-}$extra"
}

# the trainer-loop ablation (`ablate` phase, docs/training.md): the 2 x 128 pilot that leaves the
# plateau (the trainer's model: --no-bias, its bf16 autocast) with one piece of the twelfth
# session's trainer loop each (fused AdamW, torch.compile, device-side draws) or all of them,
# and `faircalib train` itself: as it draws now (host draws, plain AdamW; eager and compiled)
# and with the old choices back (--fused-adam --device-draws), side by side
ABLATE_ARMS=${ABLATE_ARMS:-ref fused trainer-draws trainer trainer-compile trainer-old}
ablate_cmd() {  # arm, token file
  local pilot="python3 scripts/pilots/diffusionlm_readz.py --arm pert --tokens $2 --device cuda \
    --batch 256 --blocks 2 --hidden 128 --lr 1e-3 --wall ${ABLATE_WALL:-300} --every 250 \
    --windows 64 --no-bias --bf16"
  local trainer
  trainer="$(train_cmd diffusionlm-base 256 1e-3 "${ABLATE_WALL:-300}" "$2" "dlm-ablate-$1") \
      --n-blocks 2 --hidden-dim 128 --n-heads 4 --seq-len 64 --warmup-steps 50 --min-lr-ratio 1 \
      --eval-every 250"
  case $1 in
    ref) echo "$pilot" ;;
    fused | compile | trainer-draws) echo "$pilot --$1" ;;
    all) echo "$pilot --fused --compile --trainer-draws" ;;
    trainer) echo "$trainer" | sed 's/ --compile / /' ;;
    trainer-compile) echo "$trainer" ;;
    trainer-old) echo "$trainer --fused-adam --device-draws" | sed 's/ --compile / /' ;;
    *) echo "ABLATE_ARMS: unknown arm '$1' (ref fused compile trainer-draws all trainer trainer-compile trainer-old)" >&2; return 2 ;;
  esac
}

table_cmd() {  # the seed table run: every model, or (MERGE_FAMILIES=1) the two Gaussian ones
  # merged into the committed table (same evaluation settings as the run that made it)
  local families="" name
  for name in $FAMILIES; do families="$families --model $name=$RUNS/$name"; done
  if [ "${MERGE_FAMILIES:-0}" = 1 ]; then
    echo "python3 benchmarks/seed_table.py --device cuda --skip-missing --out $RUNS/seed-table \
    --merge $MERGE_INTO $families"
  else
    echo "python3 benchmarks/seed_table.py --device cuda --skip-missing --out $RUNS/seed-table \
    --model mdlm-small=mdlm-small --model mdlm-base=$RUNS/mdlm-base $families"
  fi
}

case $phase in
print)  # the training command lines: print PRESET BATCH LR SECONDS TOKENS (tests parse them);
  # `print table` prints the table's command line, `print sizes` the sweep's, one an arm
  shift
  if [ "${1:-}" = table ]; then table_cmd
  elif [ "${1:-}" = sizes ]; then for arm in $DLM_SIZES; do sizes_cmd "$arm" TOKENS; done
  elif [ "${1:-}" = grid ]; then for arm in $DLM_GRID; do grid_cmd "$arm" TOKENS; done
  elif [ "${1:-}" = ablate ]; then for arm in $ABLATE_ARMS; do ablate_cmd "$arm" TOKENS; done
  else train_cmd "$@"; fi
  ;;
stage)  # HERE, before a gather call: put pieces i [j ...] (and the manifest) where it carries them
  shift; [ $# -ge 1 ] || { echo "stage: piece indices, e.g. stage 0 1" >&2; exit 2; }
  rm -rf "$CARRY" && mkdir -p "$CARRY"
  cp .gpu/tokens/manifest.json "$CARRY"/
  for i in "$@"; do cp "$(printf '.gpu/tokens/tokens.%04d.u16.xz' "$i")" "$CARRY"/; done
  # what travels: every tracked file, every untracked one git does not ignore, plus the carry,
  # 64 MiB in all (two pieces fit beside a tree of <= ~58.7 MB; three never)
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb | tail -1 | cut -f1)
  total=$(( tree + $(du -cb "$CARRY"/* | tail -1 | cut -f1) ))
  echo "tree + carry: $total bytes (limit $((64 * 1024 * 1024)))"
  # a 128 KiB margin under the limit (the tree grew past a 0.5 MiB margin with two pieces)
  [ "$total" -le $((64 * 1024 * 1024 - ${STAGE_MARGIN_BYTES:-131072})) ] || { echo "too much to carry: stage fewer pieces" >&2; exit 2; }
  exit 0
  ;;
gather)  # the carried piece was copied above
  ls -la "$PIECES"
  ;;
base)
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
  assemble "$RUNS/tokens-base.npy"
  background mdlm-base "$(train_cmd mdlm-base 128 6e-4 "$BASE_SECONDS" "$RUNS/tokens-base.npy")"
  sleep "${BASE_WAIT:-120}"; tail -c 1200 "$RUNS/mdlm-base.log"
  ;;
status)
  shopt -s nullglob
  # shellcheck disable=SC2046 # the grid arms, one word each
  [ -z "${HOLD:-}" ] || wait_for $(( HOLD / 5 )) mdlm-base diffusionlm-base planner-small table \
    $(for arm in $DLM_GRID; do arm_name "$arm"; done)
  for f in "$RUNS"/*.log; do echo "== $f"; tail -c 400 "$f"; echo; done
  for d in "$RUNS"/*.done; do echo "$(basename "$d"): exit $(cat "$d")"; done
  ;;
families)
  [ "${SKIP_FAMILIES:-0}" = 1 ] && { echo "families skipped"; exit 0; }
  wait_for 90 mdlm-base  # the GPU is the base model's until it is done
  assemble "$RUNS/tokens-families.npy"
  for name in $FAMILIES; do
    extra=""
    if [ "$name" = diffusionlm-base ]; then batch=$DLM_BATCH lr=$DLM_LR extra=${DLM_ARGS:-}; else batch=$PLANNER_BATCH lr=$PLANNER_LR; fi
    background "$name" "$(train_cmd "$name" "$batch" "$lr" "$FAMILY_SECONDS" "$RUNS/tokens-families.npy") $extra"
  done
  sleep "${FAMILY_WAIT:-90}"; for name in $FAMILIES; do tail -c 400 "$RUNS/$name.log"; done
  ;;
w4a4)
  wait_for "${W4A4_POLLS:-90}" mdlm-base
  [ -f "$RUNS/mdlm-base/config.json" ] || { echo "w4a4: no trained mdlm-base"; exit 0; }
  background w4a4-base "python3 benchmarks/w4a4.py --model $RUNS/mdlm-base --device cuda \
    --schemes w4a4 --methods rtn,quarot,flatquant,fair --nsamples 128 --eval-limit 512 \
    --mc-samples 1 --flip-prompts 16 --out $RUNS/w4a4-base"
  sleep "${W4A4_WAIT:-30}"; tail -c 400 "$RUNS/w4a4-base.log"
  ;;
sizes)  # one call, ~300 s (piece 0 is enough): where does each size leave the unigram plateau?
  assemble "$RUNS/tokens-sizes.npy"
  for arm in $DLM_SIZES; do
    cmd=$(sizes_cmd "$arm" "$RUNS/tokens-sizes.npy")
    OMP_NUM_THREADS=2 timeout $(( ${SIZES_WALL:-240} + 60 )) $cmd > "$OUT/pert-${arm/@/-}.log" 2>&1 &
  done
  wait
  for f in "$OUT"/pert-*.log; do echo "== $f"; grep -v '"bin"' "$f" | tail -n 4; done
  ;;
grid)  # one call: the grid's arms in the background (then `status HOLD=..`, `pick`, `table`)
  assemble "$RUNS/tokens-grid.npy"
  i=0
  for arm in $DLM_GRID; do
    cmd=$(grid_cmd "$arm" "$RUNS/tokens-grid.npy")  # a malformed arm stops the phase here
    background "$(arm_name "$arm")" "CUDA_VISIBLE_DEVICES=$(( i++ % NGPU )) $cmd"
  done
  sleep "${FAMILY_WAIT:-90}"; for arm in $DLM_GRID; do tail -c 300 "$RUNS/$(arm_name "$arm").log"; echo; done
  ;;
pick)  # wait for the grid; the arm with the lowest final held-out bound becomes diffusionlm-base
  names=(); for arm in $DLM_GRID; do names+=("$(arm_name "$arm")"); done
  wait_for "${PICK_POLLS:-90}" "${names[@]}"
  python3 scripts/grid_pick.py "$RUNS" "${names[@]}" > "$OUT/grid.json"
  for n in "${names[@]}"; do  # the logs first: they say why when no arm finished
    [ -f "$RUNS/$n.log" ] && { progress_free < "$RUNS/$n.log" > "$OUT/$n.log" || true; }
  done
  best=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['picked'] or '')" "$OUT/grid.json")
  [ -n "$best" ] || { echo "pick: no arm finished" >&2; exit 1; }
  rm -rf "${RUNS:?}/diffusionlm-base" && cp -r "$RUNS/$best" "$RUNS/diffusionlm-base"
  ;;
ablate)  # one call, ~380 s (piece 0 is enough): which part of the trainer's loop keeps it blind?
  assemble "$RUNS/tokens-ablate.npy"
  i=0
  for arm in $ABLATE_ARMS; do
    cmd=$(ablate_cmd "$arm" "$RUNS/tokens-ablate.npy")
    # the arms spread over the GPUs there are (one H200, or two on an x2 machine); the index
    # is taken out here: an i++ inside the subshell never reached this loop (2026-11-30: every
    # arm ran on GPU 0)
    dev=$(( i++ % NGPU ))
    (CUDA_VISIBLE_DEVICES=$dev OMP_NUM_THREADS=2 timeout $(( ${ABLATE_WALL:-300} + 70 )) $cmd 2>&1 | progress_free \
      > "$OUT/ablate-$arm.log") &
  done
  wait
  for arm in $ABLATE_ARMS; do
    echo "== $arm"
    { grep -o '"step": [0-9]*\|"bound": [0-9.]*\|val_nelbo": [0-9.]*' "$OUT/ablate-$arm.log" || true; } | tr '\n' ' '; echo
  done
  ;;
table)
  wait_for 60 mdlm-base diffusionlm-base planner-small
  for name in mdlm-base diffusionlm-base planner-small; do
    [ -f "$RUNS/$name/train_log.json" ] && grep -o '"weight_fingerprint_sha256": "[0-9a-f]*"' "$RUNS/$name/train_log.json"
  done
  background table "$(table_cmd)"
  wait_for "${TABLE_POLLS:-40}" table; grep 'seed-table\]' "$RUNS/table.log" || true
  ;;
collect)
  wait_for "${TABLE_POLLS:-100}" table w4a4-base
  # 8 files at most: the table (3), the W4A4 rows on mdlm-base (1), every log in one file (1),
  # the token files' records (1), the training records with fingerprints (1)
  cp "$RUNS"/seed-table/seed_table.json "$RUNS"/seed-table/seed_table.md "$OUT"/ 2>/dev/null || true
  cp "$RUNS"/seed-table/degradation.png "$OUT"/ 2>/dev/null || true
  cp "$RUNS"/w4a4-base/w4a4.json "$OUT"/w4a4_mdlm_base.json 2>/dev/null || true
  for name in table mdlm-base diffusionlm-base planner-small w4a4-base; do
    [ -f "$RUNS/$name.log" ] && { echo "=== $name.log"; progress_free < "$RUNS/$name.log"; }
  done > "$OUT/logs.txt" 2>/dev/null || true
  cat "$RUNS"/tokens-*.npy.json > "$OUT/tokens.json" 2>/dev/null || true
  python3 - "$RUNS" > "$OUT/train_logs.json" <<'EOF'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
logs = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/train_log.json")}
print(json.dumps(logs, indent=1))
EOF
  ls -la "$OUT"
  ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
