#!/usr/bin/env bash
# mpirun: NP ranks; retro_dist reads rank and world size from the MPI environment (OMPI_COMM_WORLD_* / PMI_*).
#
#   NP=2 launch/mpirun.sh --config my_run.yaml
#   NP=16 MASTER_ADDR=node0 MPIRUN_ARGS="--hostfile hosts" launch/mpirun.sh --config my_run.yaml
#
# Environment: NP (default 2), MASTER_ADDR (default 127.0.0.1: single node), MASTER_PORT (default 29500),
# MPIRUN_ARGS (extra mpirun options), RETRO_VENV (default ./.venv), and the rank environment of launch/env.sh, which
# mpirun passes on to every rank (-x) where it is set.
set -euo pipefail
VENV=${RETRO_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
command -v mpirun >/dev/null 2>&1 || { echo "launch/mpirun.sh: error: mpirun not found (apt-get install openmpi-bin)" >&2; exit 2; }
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
root=()
[ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
if [ -n "$(retro_gpu_ids)" ]; then
  retro_rank_env gpu
  ops=$("$VENV/bin/python" -m retro_dist.launch.node_setup --check-gpus --ops -- "$@") || exit
  if [ -n "$ops" ]; then  # one process per node builds what the ranks would each build
    # shellcheck disable=SC2086
    mpirun "${root[@]}" --map-by ppr:1:node ${MPIRUN_ARGS:-} "$VENV/bin/python" -m retro_dist.launch.node_setup \
      --build "$ops"
  fi
else
  retro_rank_env cpu
fi
# only variables with a value travel: an empty DS_ACCELERATOR is an error to DeepSpeed
export_args=()
for var in MASTER_ADDR MASTER_PORT OMP_NUM_THREADS PYTHONUNBUFFERED DS_ACCELERATOR MALLOC_MMAP_THRESHOLD_ \
           TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG TORCH_EXTENSIONS_DIR; do
  [ -z "${!var:-}" ] || export_args+=(-x "$var")
done
# shellcheck disable=SC2086
exec mpirun "${root[@]}" -np "${NP:-2}" --oversubscribe ${MPIRUN_ARGS:-} "${export_args[@]}" \
  "$VENV/bin/python" -m retro_dist.cli train "$@"
