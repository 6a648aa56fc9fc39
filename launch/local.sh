#!/usr/bin/env bash
# One node, the deepspeed launcher: one process per GPU, or NPROC processes on a CPU-only machine.
#
#   launch/local.sh --config my_run.yaml --train.zero_stage=3          # every argument goes to `retro-dist train`
#   NPROC=2 MASTER_PORT=29600 launch/local.sh --data.dataset=data/stdlib --model.preset=tiny
#
# Environment: NPROC (default: number of GPUs, else 2), MASTER_PORT (default 29500), RETRO_VENV (default ./.venv).
set -euo pipefail
VENV=${RETRO_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L | wc -l || echo 0)
  [ "$NPROC" -gt 0 ] || NPROC=2
fi
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
exec "$VENV/bin/deepspeed" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
  --module retro_dist.cli train "$@"
