#!/usr/bin/env bash
# Train the larger Gaussian-family reference models (Diffusion-LM base, PLANNER small) on one
# GPU with the project's own `faircalib train` (issue 15). Not run yet: the tiny CPU versions
# ship in src/faircalib/assets/models/{diffusionlm-tiny,planner-tiny}.
# Same phases and corpus transport as scripts/gpu_train_reference.sh (run its `gather` first):
#   phase=final  : both models in the background, one after the other (FAMILY_SECONDS each)
#   phase=collect: wait, then pack the model directories and logs into $OUT
# Quantize and evaluate them in the same lease (they are not shipped: too large for git), e.g.
#   faircalib eval $RUNS/diffusionlm-base --data wikitext2 --split test --device cuda --json
set -euo pipefail
phase=${1:?phase}
RUNS=${RUNS:-/root/runs}
CORPUS_DIR=${CORPUS_DIR:-/root/corpus}
TOK=src/faircalib/assets/tokenizers/wiki-bpe-8k.json
SECONDS_EACH=${FAMILY_SECONDS:-240}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$RUNS"
train() {  # preset, batch size
  python3 -m faircalib.commands.train --corpus "$CORPUS_DIR"/*.jsonl.xz --tokenizer "$TOK" \
    --token-cache "$RUNS/tokens.npy" --compile --preset "$1" --batch-size "$2" --lr 1e-3 \
    --warmup-steps 300 --max-steps 1000000 --time-budget "$SECONDS_EACH" --eval-every 500 \
    --seed 0 --out "$RUNS/$1" > "$RUNS/$1.log" 2>&1
}
case $phase in
final)
  # join the corpus pieces and check their sha256 (as gpu_train_reference.sh's assemble)
  for name in enwiki-2015.part0.jsonl.xz enwiki-2015.part1.jsonl.xz; do
    f=$CORPUS_DIR/$name
    [ -f "$f" ] || { cat "$f".piece-* > "$f.tmp" && mv "$f.tmp" "$f"; }
  done
  (cd "$CORPUS_DIR" && grep -E 'part[01]\.jsonl\.xz' "$OLDPWD/scripts/corpus.sha256" | sha256sum -c -)
  rm -f "$RUNS/families.done"
  export -f train; export RUNS CORPUS_DIR TOK SECONDS_EACH
  setsid nohup bash -c "train diffusionlm-base 128; train planner-small 64; echo done > $RUNS/families.done" \
    > /dev/null 2>&1 &
  sleep "${FINAL_WAIT:-60}"; tail -c 600 "$RUNS/diffusionlm-base.log"
  ;;
collect)
  for _ in $(seq 1 "${WAIT_POLLS:-110}"); do [ -f "$RUNS/families.done" ] && break; sleep 5; done
  cp "$RUNS"/diffusionlm-base.log "$RUNS"/planner-small.log "$OUT/"
  tar -C "$RUNS" -cf - diffusionlm-base planner-small | split -b 15M - "$OUT/families.tar.part-"
  ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
