#!/usr/bin/env bash
# Pretrain with TrainConfigPretrainLarge on this machine's GPUs.
#   ./start_pretrain_large.sh [NUM_GPUS] [ACCELERATE_CONFIG] [extra train flags...]
# NUM_GPUS defaults to the GPUs nvidia-smi sees; ACCELERATE_CONFIG to multi_gpu.yaml (one GPU: single_gpu.yaml).
# ZeRO: ./start_pretrain_large.sh 8 accelerate_configs/deepspeed_zero2.yaml (or deepspeed_zero3[_offload].yaml, fsdp.yaml).
# It asks before starting only when stdin is a terminal, so it runs unattended under nohup, cron or CI.
set -euo pipefail
cd "$(dirname "$0")"

detected=0
if command -v nvidia-smi >/dev/null 2>&1; then
  detected=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
num_gpus=${1:-$detected}
[ $# -gt 0 ] && shift
if ! [[ "$num_gpus" =~ ^[0-9]+$ ]] || [ "$num_gpus" -lt 1 ]; then
  echo "error: no GPU found (nvidia-smi saw $detected); pass the GPU count as the first argument, or train on CPU with: python train_low_mem.py train --use_large_config=True" >&2
  exit 1
fi
if [ "$detected" -gt 0 ] && [ "$num_gpus" -gt "$detected" ]; then
  echo "error: asked for $num_gpus GPUs but this machine has $detected" >&2
  exit 1
fi
if [ "$num_gpus" -gt 1 ]; then default_config=accelerate_configs/multi_gpu.yaml; else default_config=accelerate_configs/single_gpu.yaml; fi
accel_config=${1:-$default_config}
[ $# -gt 0 ] && shift
if [ ! -f "$accel_config" ]; then
  echo "error: accelerate config '$accel_config' not found; choose one in accelerate_configs/" >&2
  exit 1
fi
# a DeepSpeed config fails deep inside accelerate (a traceback) when deepspeed is missing or broken (built for
# another torch): import it once here, seconds before a long run, and say why in one line
if grep -Eq '^distributed_type:[[:space:]]*DEEPSPEED' "$accel_config" \
    && ! ds_error=$(python -c 'import deepspeed' 2>&1 >/dev/null); then
  echo "error: $accel_config uses DeepSpeed but deepspeed cannot be imported ($(echo "$ds_error" | tail -n 1)); pip install deepspeed (see requirements-gpu.txt)" >&2
  exit 1
fi

# the data files the preset (with any flags given here) points at must exist
files=$(python train_low_mem.py show_config --use_large_config=True "$@" | python -c '
import json, sys
cfg = json.load(sys.stdin)
print(" ".join(p for p in (cfg["train_file"], cfg["validation_file"], cfg["tokenizer_dir"]) if p))')
for f in $files; do
  if [ ! -e "$f" ]; then
    echo "error: $f does not exist; prepare it (see README: Training on your own data) or pass --train_file=..." >&2
    exit 1
  fi
done

echo "launching on $num_gpus GPU(s) with $accel_config"
if [ -t 0 ]; then
  read -r -p "start training? [Y/n] " answer
  case "$answer" in [nN]*) exit 0 ;; esac
fi
exec accelerate launch --config_file "$accel_config" --num_processes "$num_gpus" \
  train_low_mem.py train --use_large_config=True "$@"
