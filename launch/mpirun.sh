#!/usr/bin/env bash
# mpirun: NP ranks; retro_dist reads rank and world size from the MPI environment (OMPI_COMM_WORLD_* / PMI_*).
#
#   NP=2 launch/mpirun.sh --config my_run.yaml
#   NP=16 MASTER_ADDR=node0 MPIRUN_ARGS="--hostfile hosts" launch/mpirun.sh --config my_run.yaml
#
# Environment: NP (default 2), MASTER_ADDR (default 127.0.0.1: single node), MASTER_PORT (default 29500),
# MPIRUN_ARGS (extra mpirun options), RETRO_VENV (default ./.venv).
set -euo pipefail
VENV=${RETRO_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
command -v mpirun >/dev/null 2>&1 || { echo "launch/mpirun.sh: error: mpirun not found (apt-get install openmpi-bin)" >&2; exit 2; }
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
root=()
[ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
# shellcheck disable=SC2086
exec mpirun "${root[@]}" -np "${NP:-2}" --oversubscribe ${MPIRUN_ARGS:-} \
  -x MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" -x MASTER_PORT="${MASTER_PORT:-29500}" \
  -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x PYTHONUNBUFFERED=1 -x DS_ACCELERATOR="${DS_ACCELERATOR:-}" \
  "$VENV/bin/python" -m retro_dist.cli train "$@"
