#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile ("hostname slots=N" per line).
#
# With ssh/pdsh between nodes (run once, on the first host):
#   HOSTFILE=hosts MASTER_ADDR=node0 launch/hostfile.sh --config my_run.yaml
# Without ssh (clusters that forbid it): run once on every node, each with its own NODE_RANK:
#   HOSTFILE=hosts MASTER_ADDR=node0 NODE_RANK=0 NO_SSH=1 launch/hostfile.sh --config my_run.yaml   # on node0
#   HOSTFILE=hosts MASTER_ADDR=node0 NODE_RANK=1 NO_SSH=1 launch/hostfile.sh --config my_run.yaml   # on node1
#
# Environment: HOSTFILE (required), MASTER_ADDR (required: the first host), MASTER_PORT (default 29500),
# NO_SSH=1 with NODE_RANK, RETRO_VENV (default ./.venv).
set -euo pipefail
VENV=${RETRO_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines of: hostname slots=N)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first host of the hostfile}"
[ -f "$HOSTFILE" ] || { echo "launch/hostfile.sh: error: hostfile $HOSTFILE does not exist" >&2; exit 2; }
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
extra=()
if [ "${NO_SSH:-0}" = 1 ]; then
  : "${NODE_RANK:?NO_SSH=1 needs NODE_RANK (0 on the first host)}"
  extra=(--no_ssh --node_rank "$NODE_RANK")
fi
exec "$VENV/bin/deepspeed" --hostfile "$HOSTFILE" "${extra[@]}" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --module retro_dist.cli train "$@"
