#!/usr/bin/env bash
# Train the reference models on a GPU machine (see docs/training.md / MODEL_CARD.md).
#   phase=check : tokenise the corpus once, then a short scaling check of three mdlm-small
#                 candidates trained concurrently for the same wall time;
#   phase=final : train mdlm-small (the chosen shape) and mdlm-tiny concurrently, in the background;
#   phase=collect: wait for the final runs and pack the model directories into $OUT.
# Corpus shards are read from $CORPUS_DIR (jsonl.xz files of the Wikipedia training corpus).
set -euo pipefail
phase=${1:?phase}
RUNS=${RUNS:-/root/runs}
CORPUS_DIR=${CORPUS_DIR:-.gpu}
TOK=src/faircalib/assets/tokenizers/wiki-bpe-8k.json
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$RUNS"
train() { python3 -m faircalib.commands.train --corpus "$CORPUS_DIR"/*.jsonl.xz --tokenizer "$TOK" \
          --token-cache "$RUNS/tokens.npy" --compile "$@"; }

case $phase in
check)
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
  time train --preset tiny --max-steps 1 --out "$RUNS/warm" --eval-every 1000000 > "$RUNS/tokenise.log" 2>&1
  grep tokenised "$RUNS/tokenise.log"
  for shape in "384 8 6" "320 12 5" "448 5 7"; do
    set -- $shape
    train --preset small --hidden-dim "$1" --n-blocks "$2" --n-heads "$3" --batch-size 128 \
      --warmup-steps 100 --max-steps 100000 --time-budget "${CHECK_SECONDS:-110}" --eval-every 100 \
      --out "$RUNS/check-d$1-l$2" > "$RUNS/check-d$1-l$2.log" 2>&1 &
  done
  wait
  for f in "$RUNS"/check-*.log; do echo "== $f"; grep -E '"parameters"|compile' "$f" | cut -c1-400 | sed 's/"config".*"parameters"/"parameters"/'; done
  ;;
final)
  read -r D L H <<< "${SMALL_SHAPE:?set SMALL_SHAPE='D L H'}"
  setsid nohup bash -c "export PYTHONPATH=$PYTHONPATH PYTHONUNBUFFERED=1; \
    python3 -m faircalib.commands.train --corpus $CORPUS_DIR/*.jsonl.xz --tokenizer $TOK --token-cache $RUNS/tokens.npy --compile \
      --preset small --hidden-dim $D --n-blocks $L --n-heads $H --batch-size 128 --warmup-steps 300 \
      --max-steps 1000000 --time-budget ${SMALL_SECONDS:-420} --eval-every 500 --out $RUNS/mdlm-small \
      > $RUNS/small.log 2>&1; echo done > $RUNS/small.done" > /dev/null 2>&1 &
  setsid nohup bash -c "export PYTHONPATH=$PYTHONPATH PYTHONUNBUFFERED=1; \
    python3 -m faircalib.commands.train --corpus $CORPUS_DIR/*.jsonl.xz --tokenizer $TOK --token-cache $RUNS/tokens.npy --compile \
      --preset tiny --batch-size 256 --warmup-steps 300 --max-steps 1000000 \
      --time-budget ${TINY_SECONDS:-400} --eval-every 500 --out $RUNS/mdlm-tiny \
      > $RUNS/tiny.log 2>&1; echo done > $RUNS/tiny.done" > /dev/null 2>&1 &
  sleep 60; tail -c 600 "$RUNS/small.log"; tail -c 300 "$RUNS/tiny.log"
  ;;
collect)
  for i in $(seq 1 "${WAIT_POLLS:-110}"); do
    [ -f "$RUNS/small.done" ] && [ -f "$RUNS/tiny.done" ] && break; sleep 5
  done
  tail -c 1500 "$RUNS/small.log"; tail -c 800 "$RUNS/tiny.log"
  cp "$RUNS/small.log" "$RUNS/tiny.log" "$OUT/"
  tar -C "$RUNS" -cf - mdlm-small mdlm-tiny check-*.log | split -b 15M - "$OUT/models.tar.part-"
  ls -la "$OUT"
  ;;
esac
