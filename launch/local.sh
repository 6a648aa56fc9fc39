#!/usr/bin/env bash
# One node, the deepspeed launcher: one process per visible GPU, or NPROC processes on a CPU-only machine.
#
#   launch/local.sh --config my_run.yaml --train.zero_stage=3          # every argument goes to `retro-dist train`
#   CUDA_VISIBLE_DEVICES=4,5,6,7 launch/local.sh --config my_run.yaml  # ranks on GPUs 4-7 (deepspeed --include)
#   NPROC=2 MASTER_PORT=29600 launch/local.sh --data.dataset=data/stdlib --model.preset=tiny
#
# Environment: NPROC (default: the number of visible GPUs, else 2: on GPUs, the first NPROC of them),
# CUDA_VISIBLE_DEVICES (indices; the GPUs the ranks use), MASTER_PORT (default 29500), RETRO_VENV (default ./.venv),
# and the rank environment of launch/env.sh (NCCL_DEBUG, TORCH_NCCL_ASYNC_ERROR_HANDLING, MALLOC_MMAP_THRESHOLD_...).
set -euo pipefail
VENV=${RETRO_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
die() { echo "launch/local.sh: error: $*" >&2; exit 2; }
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
[ -z "${NPROC:-}" ] || [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC is not a positive number of processes"
ids=$(retro_gpu_ids)
if [ -z "$ids" ]; then
  retro_rank_env cpu
  exec "$VENV/bin/deepspeed" --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" \
    --module retro_dist.cli train "$@"
fi
[[ "$ids" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  die "CUDA_VISIBLE_DEVICES=$ids: the deepspeed launcher takes GPU indices (0,1,...), not UUIDs; nvidia-smi -L" \
      "lists each GPU's index"
IFS=, read -ra gpus <<<"$ids"
[ "${NPROC:-${#gpus[@]}}" -le "${#gpus[@]}" ] ||
  die "NPROC=$NPROC but ${#gpus[@]} GPU(s) are visible ($ids): lower NPROC, or make more GPUs visible"
# --include keeps the user's devices: with --num_gpus the deepspeed launcher drops CUDA_VISIBLE_DEVICES and uses 0..N-1
include=$(IFS=,; echo "${gpus[*]:0:${NPROC:-${#gpus[@]}}}")
retro_rank_env gpu
"$VENV/bin/python" -m retro_dist.launch.node_setup --check-gpus --build auto -- "$@" || exit
exec "$VENV/bin/deepspeed" --include "localhost:$include" --master_port "${MASTER_PORT:-29500}" \
  --module retro_dist.cli train "$@"
