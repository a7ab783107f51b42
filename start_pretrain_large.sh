#!/usr/bin/env bash
# Pretrain with TrainConfigPretrainLarge on this machine's GPUs.
#   ./start_pretrain_large.sh [NUM_GPUS] [ACCELERATE_CONFIG] [extra train flags...]
# NUM_GPUS defaults to the GPUs nvidia-smi sees; ACCELERATE_CONFIG to multi_gpu.yaml (one GPU: single_gpu.yaml).
# ZeRO: ./start_pretrain_large.sh 8 accelerate_configs/deepspeed_zero2.yaml (or deepspeed_zero3[_offload].yaml, fsdp.yaml).
# Long sequences split over N GPUs each (sequence parallelism, a DeepSpeed config):
#   SEQUENCE_PARALLEL=4 ./start_pretrain_large.sh 8 accelerate_configs/deepspeed_zero3_sp.yaml --max_seq_len=16384
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
sequence_parallel=${SEQUENCE_PARALLEL:-1}
sp_flags=()
if [ "$sequence_parallel" != 1 ]; then
  if ! [[ "$sequence_parallel" =~ ^[0-9]+$ ]] || [ "$sequence_parallel" -lt 1 ] || [ $((num_gpus % sequence_parallel)) -ne 0 ]; then
    echo "error: SEQUENCE_PARALLEL=$sequence_parallel must divide the GPU count ($num_gpus)" >&2
    exit 1
  fi
  if ! grep -Eq '^distributed_type:[[:space:]]*DEEPSPEED' "$accel_config"; then
    echo "error: SEQUENCE_PARALLEL needs a DeepSpeed config, e.g. accelerate_configs/deepspeed_zero3_sp.yaml" >&2
    exit 1
  fi
  sp_flags=(--sequence_parallel_size="$sequence_parallel")
fi
# a DeepSpeed config fails deep inside accelerate (a traceback) when deepspeed is missing or broken (built for
# another torch): import it once here, seconds before a long run, and say why in one line
if grep -Eq '^distributed_type:[[:space:]]*DEEPSPEED' "$accel_config" \
    && ! ds_error=$(python -c 'import deepspeed' 2>&1 >/dev/null); then
  echo "error: $accel_config uses DeepSpeed but deepspeed cannot be imported ($(echo "$ds_error" | tail -n 1)); pip install deepspeed (see requirements-gpu.txt)" >&2
  exit 1
fi

# the data files the preset (with any flags given here) points at must exist
files=$(python train_low_mem.py show_config --use_large_config=True ${sp_flags[@]+"${sp_flags[@]}"} "$@" | python -c '
import json, sys
cfg = json.load(sys.stdin)
print(" ".join(p for p in (cfg["train_file"], cfg["validation_file"], cfg["tokenizer_dir"]) if p))')
for f in $files; do
  if [ ! -e "$f" ]; then
    echo "error: $f does not exist; prepare it (see README: Training on your own data) or pass --train_file=..." >&2
    exit 1
  fi
done

echo "launching on $num_gpus GPU(s) with $accel_config${sp_flags:+, each sequence split over $sequence_parallel}"
if [ -t 0 ]; then
  read -r -p "start training? [Y/n] " answer
  case "$answer" in [nN]*) exit 0 ;; esac
fi
exec accelerate launch --config_file "$accel_config" --num_processes "$num_gpus" \
  train_low_mem.py train --use_large_config=True ${sp_flags[@]+"${sp_flags[@]}"} "$@"
