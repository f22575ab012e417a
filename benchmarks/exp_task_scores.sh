#!/usr/bin/env bash
# LoRA fine-tune SmolLM2-135M-Instruct on a task, then LayerIF scores (300 x 50, 128 tokens).
# Usage: bash benchmarks/exp_task_scores.sh TASK OUTROOT     (TASK: mrpc, cola, rte)
# Writes OUTROOT/TASK/lora (adapter) and OUTROOT/TASK/scores (scores.json, per_example.npy).
set -euo pipefail
task=$1; root=$2
data=${LAYERIF_DATA:-$(dirname "$0")/../../shared/data}/layerif-tasks
mkdir -p "$root/$task"
model=${MODEL:-$(python -c "from layerif_jax.io import default_model_path; print(default_model_path())")}
/usr/bin/time -v layerif -q finetune --model "$model" --data "$data/glue_${task}_train.json" --limit 400 \
  --epochs 1 --lr 5e-4 --warmup 5 --batch-size 8 --max-len 128 --mask-prompt \
  --out "$root/$task/lora" 2> "$root/$task/finetune.time"
/usr/bin/time -v layerif -q scores --model "$model" --lora "$root/$task/lora" \
  --train "$data/glue_${task}_train.json" --val "$data/glue_${task}_validation.json" \
  --n-train 300 --n-val 50 --max-len 128 --mask-prompt --per-val \
  --out "$root/$task/scores" 2> "$root/$task/scores.time"
