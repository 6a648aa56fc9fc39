# Sourced by the launchers (local.sh, hostfile.sh, mpirun.sh, slurm/*.sbatch): how they find GPUs, and the
# environment the ranks start with. Every variable keeps a value the user exported.

# The GPU ids the ranks of this node may use, comma-separated; empty where there are none. CUDA_VISIBLE_DEVICES wins
# where it is set (empty, NoDevFiles or -1: no GPU); else the "GPU N:" lines of `nvidia-smi -L` (its "MIG" lines are
# slices of those GPUs, not more of them).
retro_gpu_ids() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    case "$CUDA_VISIBLE_DEVICES" in ""|NoDevFiles|-1) ;; *) echo "$CUDA_VISIBLE_DEVICES" ;; esac
    return 0
  fi
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  (nvidia-smi -L 2>/dev/null || true) | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p' | paste -sd, -
}

# retro_rank_env cpu|gpu: exports the ranks' environment.
retro_rank_env() {
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
  if [ "$1" = cpu ]; then
    # DeepSpeed finds its CPU accelerator by itself; naming it silences a warning
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    # glibc keeps freed activation buffers below its dynamic mmap threshold (up to 32 MiB) in the heap: a CPU rank's
    # RSS then holds every step's peak. A fixed 64 KiB threshold gives them back (a ZeRO-3 bf16 step of the 48.5M
    # reference preset on 2 ranks: 1.16 GB per rank against 1.84), for more CPU time in the kernel re-faulting them
    # (MALLOC_MMAP_THRESHOLD_=33554432 behaves like glibc's default). GPU ranks keep activations on the GPU.
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-65536}
  else
    # a failed or timed-out NCCL collective aborts its communicator and ends the rank, so the launcher sees a failure
    # instead of ranks that hang in the next collective
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # NCCL's own warnings (a lost peer, a network it fell back from) in the log; INFO for a topology report
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  fi
}
