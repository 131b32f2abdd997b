#!/usr/bin/env bash
# Train the reference models on a GPU machine (see the model cards in src/faircalib/assets/models).
#   phase=gather : copy corpus pieces carried in .gpu/ (split files, see below) into $CORPUS_DIR;
#                  the device machine keeps them between calls while it stays warm
#   phase=check  : tokenise the corpus once, then a short scaling check of three mdlm-small
#                  candidates trained concurrently for the same wall time;
#   phase=final  : train mdlm-small (SMALL_SHAPE) alone, and mdlm-tiny only if TINY_SECONDS > 0,
#                  in the background;
#   phase=collect: wait for the final runs and pack the model directories into $OUT.
# The corpus shards (28 MB each) do not fit one call beside the repository, so they travel in
# pieces: `split -n 2 enwiki-2015.partN.jsonl.xz .gpu/enwiki-2015.partN.jsonl.xz.piece-`; the
# pieces are joined and checked against the sha256 in ../shared/data/SOURCES.md before use.
set -euo pipefail
phase=${1:?phase}
RUNS=${RUNS:-/root/runs}
CORPUS_DIR=${CORPUS_DIR:-/root/corpus}
TOK=src/faircalib/assets/tokenizers/wiki-bpe-8k.json
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$CORPUS_DIR"
declare -A SHA256=(
  [enwiki-2015.part0.jsonl.xz]=e7e6f2ec24109117d6ec5f9e2c0a8ab8c27331d8d862cff1438569cf59ba44b6
  [enwiki-2015.part1.jsonl.xz]=03a1659df1648eea4aeb47a6308cdef9aba380f49ee1014fc49837003c69f328
)
train() { python3 -m faircalib.commands.train --corpus "$CORPUS_DIR"/*.jsonl.xz --tokenizer "$TOK" \
          --token-cache "$RUNS/tokens.npy" --compile "$@"; }
assemble() {
  for name in "${!SHA256[@]}"; do
    f=$CORPUS_DIR/$name
    if [ ! -f "$f" ]; then cat "$CORPUS_DIR/$name".piece-* > "$f.tmp" && mv "$f.tmp" "$f"; fi
    echo "${SHA256[$name]}  $f" | sha256sum -c - || { rm -f "$f"; exit 1; }
  done
}

case $phase in
gather)
  cp -v .gpu/*.piece-* "$CORPUS_DIR"/ 2>/dev/null || true
  ls -la "$CORPUS_DIR"
  ;;
check)
  assemble
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
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
  assemble
  read -r D L H <<< "${SMALL_SHAPE:?set SMALL_SHAPE='D L H'}"
  rm -f "$RUNS/small.done" "$RUNS/tiny.done"
  setsid nohup bash -c "export PYTHONPATH=$PYTHONPATH PYTHONUNBUFFERED=1; \
    python3 -m faircalib.commands.train --corpus $CORPUS_DIR/*.jsonl.xz --tokenizer $TOK --token-cache $RUNS/tokens.npy --compile \
      --preset small --hidden-dim $D --n-blocks $L --n-heads $H --batch-size 128 --warmup-steps 300 \
      --max-steps 1000000 --time-budget ${SMALL_SECONDS:-420} --eval-every 500 --out $RUNS/mdlm-small \
      > $RUNS/small.log 2>&1; echo done > $RUNS/small.done" > /dev/null 2>&1 &
  if [ "${TINY_SECONDS:-0}" -gt 0 ]; then
    setsid nohup bash -c "export PYTHONPATH=$PYTHONPATH PYTHONUNBUFFERED=1; \
      python3 -m faircalib.commands.train --corpus $CORPUS_DIR/*.jsonl.xz --tokenizer $TOK --token-cache $RUNS/tokens.npy --compile \
        --preset tiny --batch-size 256 --warmup-steps 300 --max-steps 1000000 \
        --time-budget $TINY_SECONDS --eval-every 500 --out $RUNS/mdlm-tiny \
        > $RUNS/tiny.log 2>&1; echo done > $RUNS/tiny.done" > /dev/null 2>&1 &
  else
    echo skipped > "$RUNS/tiny.done"
  fi
  sleep "${FINAL_WAIT:-90}"; tail -c 800 "$RUNS/small.log"
  ;;
collect)
  for _ in $(seq 1 "${WAIT_POLLS:-110}"); do
    [ -f "$RUNS/small.done" ] && [ -f "$RUNS/tiny.done" ] && break; sleep 5
  done
  tail -c 1500 "$RUNS/small.log"
  cp "$RUNS"/*.log "$OUT/"
  dirs=$(cd "$RUNS" && ls -d mdlm-small mdlm-tiny 2>/dev/null || true)
  tar -C "$RUNS" -cf - $dirs | split -b 15M - "$OUT/models.tar.part-"
  ls -la "$OUT"
  ;;
esac
