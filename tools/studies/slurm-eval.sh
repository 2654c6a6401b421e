#!/bin/bash
# One `ecache eval` split over a Slurm job array: task I of N evaluates every N-th item from
# item I; a dependent job merges the shards into what one run would write.
#
#   MODEL=/models/llava-1.5-7b-hf DATASET=/data/mmvet.jsonl OUT=/scratch/study \
#     sbatch --array=1-8 tools/studies/slurm-eval.sh
#   sbatch --dependency=afterok:<array job id> --wrap \
#     "ecache eval merge $OUT/shard-*.json --output $OUT/results.json"
#
# Every task must see the same model, dataset and flags (the merge refuses shards of
# different evaluations); OUT must be on a filesystem every node shares.
#SBATCH --job-name=ecache-eval
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=ecache-eval-%A_%a.log
set -euo pipefail
: "${MODEL:?set MODEL}" "${DATASET:?set DATASET}" "${OUT:?set OUT}"
mkdir -p "$OUT"
I=${SLURM_ARRAY_TASK_ID}
N=${SLURM_ARRAY_TASK_COUNT}
exec ecache eval all \
  --model "$MODEL" --dataset "$DATASET" \
  --policies full,local,h2o,snapkv,elastic --budgets 0.1,0.2,0.5,0.9 \
  --max-new-tokens 48 --batch 8 \
  --shard "$I/$N" --output "$OUT/shard-$I.json"
