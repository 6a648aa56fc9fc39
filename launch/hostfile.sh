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
# NO_SSH=1 with NODE_RANK, RETRO_VENV (default ./.venv), and the rank environment of launch/env.sh. Over ssh the
# deepspeed launcher passes only PYTHON* and (on GPUs) NCCL_* variables on to the other hosts: name the others
# (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, MALLOC_MMAP_THRESHOLD_=65536 on CPU) in ~/.deepspeed_env, one VAR=value a line.
set -euo pipefail
VENV=${RETRO_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines of: hostname slots=N)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first host of the hostfile}"
die() { echo "launch/hostfile.sh: error: $*" >&2; exit 2; }
[ -f "$HOSTFILE" ] || die "hostfile $HOSTFILE does not exist"
# DeepSpeed's own parser stops on a bad line with a traceback (and accepts slots=0 and trailing words): check each
# line here first and name the file, the line and what is wrong.
problem=$(awk '
  function fail(msg) { print "line " NR ": " msg; failed = 1; exit }
  /^[ \t]*(#.*)?$/ { next }
  $0 !~ /^[ \t]*[^ \t#]+[ \t]+slots=[0-9]+[ \t]*$/ {
    fail("\"" $0 "\" is not \"hostname slots=N\" (N: how many ranks to start on that host)") }
  { n = substr($2, 7) + 0 }
  n < 1 { fail("host " $1 " has slots=" n ": give it at least 1 slot, or remove the line") }
  $1 in first { fail("host " $1 " is listed twice (also on line " first[$1] "): keep one line per host") }
  { first[$1] = NR; hosts++ }
  END { if (!failed && hosts == 0) print "has no hosts: write one line per host, \"hostname slots=N\"" }
' "$HOSTFILE") || die "cannot read hostfile $HOSTFILE"
[ -z "$problem" ] || die "hostfile $HOSTFILE $problem"
extra=()
if [ "${NO_SSH:-0}" = 1 ]; then
  : "${NODE_RANK:?NO_SSH=1 needs NODE_RANK (0 on the first host)}"
  hosts=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE")
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$hosts" ] ||
    die "NODE_RANK=$NODE_RANK but hostfile $HOSTFILE lists $hosts hosts: give each node its position," \
        "0 to $((hosts - 1))"
  extra=(--no_ssh --node_rank "$NODE_RANK")
fi
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
if [ -n "$(retro_gpu_ids)" ]; then
  retro_rank_env gpu
  # this node builds the ops the run JIT-compiles before its ranks start; with ssh, the first host only (the others
  # build on first use: install DeepSpeed with its ops prebuilt there, docs/cluster-gpu.md)
  "$VENV/bin/python" -m retro_dist.launch.node_setup --check-gpus --build auto -- "$@" || exit
else
  retro_rank_env cpu
fi
exec "$VENV/bin/deepspeed" --hostfile "$HOSTFILE" "${extra[@]}" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --module retro_dist.cli train "$@"
