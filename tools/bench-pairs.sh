#!/usr/bin/env bash
# Issue 17's protocols, each `ecache bench` run followed at once by transformers' (sdpa and
# eager rows) on the same machine, ROUNDS times, alternating. Every run's JSON goes to
# docs/results/bench/<name>-<ecache|transformers>-<TAG>-r<round>.json; the markdown tables go to
# stdout. Needs a release build (`cargo build --release -p ecache-cli`) and Python with torch
# and transformers. Leave the machine otherwise idle while it runs.
#
#   TAG=2026-12-02e ROUNDS=2 tools/bench-pairs.sh            # every protocol
#   TAG=x ONLY="h1024x8-b1 h1024x8-b1-f16" tools/bench-pairs.sh  # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:?set TAG, e.g. TAG=2026-12-02e}
ROUNDS=${ROUNDS:-2}
FIRST_ROUND=${FIRST_ROUND:-1}  # FIRST_ROUND=2 ROUNDS=2: a second round after a first
THREADS=${THREADS:-2}
ECACHE=${ECACHE:-target/release/ecache}
OUT=docs/results/bench
SHAPES=crates/ecache-cli/shapes

# name | shape | batch | prompt | gen | dtype | policies (ecache only)
PROTOCOLS="
mid-b1|llava-mid|1|900|64|f32|local,h2o,snapkv,elastic
mid-b4|llava-mid|4|900|32|f32|elastic
h1024x8-b1|llama-h1024x8|1|512|64|f32|full
h1024x8-b8|llama-h1024x8|8|512|64|f32|elastic
qwen2-vl-mid-b1|qwen2-vl-mid|1|900|64|f32|elastic
h1024x8-b1-f16|llama-h1024x8|1|512|64|f16|full
h1024x8-b1-bf16|llama-h1024x8|1|512|64|bf16|full
"

lscpu | grep -E 'Model name|^CPU\(s\)' || true
for round in $(seq "$FIRST_ROUND" "$ROUNDS"); do
  echo "$PROTOCOLS" | while IFS='|' read -r name shape batch prompt gen dtype policies; do
    [ -z "$name" ] && continue
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
    echo "## $name, round $round"
    "$ECACHE" bench --shape "$shape" --batch "$batch" --prompt-len "$prompt" --gen-len "$gen" \
      --warmup 1 --dtype "$dtype" --policies "$policies" --budgets 0.2 \
      --output "$OUT/$name-ecache-$TAG-r$round.json" 2>&1 | grep -E '^\||triad'
    python3 tools/bench_transformers.py --shape "$SHAPES/$shape.json" --batch "$batch" \
      --prompt-len "$prompt" --gen-len "$gen" --dtype "$dtype" --threads "$THREADS" \
      --output "$OUT/$name-transformers-$TAG-r$round.json" 2>&1 | grep -E '^\||torch'
  done
done
