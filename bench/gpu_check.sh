#!/usr/bin/env bash
# The GPU path, checked on a machine with one GPU in about 8 minutes: one line per check, a summary, and every
# check's log in one folder.
#
#   bench/gpu_check.sh                      # logs in runs/gpu_check/
#   GPU_CHECK_OUT=/tmp/gc PYTHON=python3 bench/gpu_check.sh
#
# Checks: environment (GPUs, torch/CUDA/DeepSpeed versions, native bf16); a 1-rank NCCL group (all_reduce,
# broadcast_object_list); tests/test_gpu.py with the CPU tests of the GPU path; 20 steps of the tiny preset at ZeRO 0,
# 2 and 3 in bf16 with validation and a checkpoint; a resume to 30 steps; export, eval and generate on the GPU; 1-rank
# training under mpirun; fp16 against fp32 over 30 steps; fused attention kernels counted by torch.profiler at the
# reference preset, seq 2048; MFU of the reference and 150m presets against the datasheet peak; MiniLM embedding
# throughput on the GPU against the CPU. A check that cannot run here says so and the script goes on.
# On a machine without a GPU it runs the CPU tests of the GPU path, says that the rest needs a GPU, and exits 0.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
passed=0 failed=0 skipped=0

line() {  # check, status, detail
  printf '%-16s %-4s %s\n' "$1" "$2" "$3" | tee -a "$OUT/summary.txt"
  case $2 in ok) passed=$((passed + 1)) ;; FAIL) failed=$((failed + 1)) ;; *) skipped=$((skipped + 1)) ;; esac
}

# run CHECK TIMEOUT CMD...: the command's output goes to $OUT/CHECK.log; its RESULT line, or its exit code, is the verdict
run() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? took=$((SECONDS - start))
  local verdict
  verdict=$(grep -E "^RESULT " "$OUT/$name.log" | tail -n 1)
  if [ -n "$verdict" ]; then
    read -r _ _ status detail <<<"$verdict"
    line "$name" "$status" "$detail (${took}s)"
  elif [ $rc -eq 0 ]; then
    line "$name" ok "${took}s"
  else
    line "$name" FAIL "exit $rc after ${took}s: $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-160)"
  fi
  return $rc
}

: >"$OUT/summary.txt"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  run cpu-tests 600 "$PY" -m pytest -q tests/test_gpu_readiness.py tests/test_device_paths.py
  echo "gpu_check: torch sees no CUDA GPU on this machine: the GPU checks need one (run bench/gpu_check.sh on a GPU" \
       "node); the CPU tests of the GPU path ran above"
  exit 0
fi

train() {  # check, run dir, extra args...: 1 rank under torchrun on the tiny dataset
  local name=$1 dir=$2; shift 2
  run "$name" 300 "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port "$(free_port)" \
    -m retro_dist.cli train --data.dataset="$OUT/ds" --run_dir="$dir" --model.preset=tiny --data.micro_batch=4 \
    --data.num_workers=1 --optim.warmup_steps=2 --optim.lr=3e-3 --logging.every=1 --logging.val_every=10 \
    --logging.val_samples=32 --checkpoint.every=10 "$@"
}
free_port() { "$PY" -c 'from retro_dist.dist import free_port; print(free_port())'; }
last_loss() { grep -E "^step [0-9]+/[0-9]+ \| loss" "$1" | tail -n 1 | sed -E 's/.*\| loss ([0-9.]+).*/\1/'; }

run env 120 "$PY" bench/gpu_check.py env
run nccl 120 "$PY" bench/gpu_check.py nccl
run gpu-tests 600 "$PY" -m pytest -q tests/test_gpu.py tests/test_gpu_readiness.py

if run dataset 300 "$PY" -c "
from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main
corpus = write_corpus('$OUT/corpus', stdlib_docstrings(400))
raise SystemExit(main(['--input', str(corpus), '--out', '$OUT/ds', '--vocab-size', '512', '--chunk-size', '16',
                       '--seq-len', '64', '--embedder', 'hash-64', '--num-neighbors', '2', '--shard-samples', '40']))"
then
  rm -rf "$OUT"/run_zero*
  for stage in 0 2 3; do
    train "train-zero$stage" "$OUT/run_zero$stage" --train.steps=20 --train.zero_stage=$stage --train.precision=bf16
  done
  if grep -q "saved checkpoint" "$OUT/train-zero2.log" 2>/dev/null; then
    cp "$OUT/train-zero2.log" "$OUT/train-zero2-first.log"
    train resume "$OUT/run_zero2" --train.steps=30 --train.zero_stage=2 --train.precision=bf16 &&
      { grep -q "resumed from step_00000020" "$OUT/resume.log" || line resume-check FAIL "no 'resumed from' line"; }
    run export 300 "$PY" -m retro_dist.cli export "$OUT/run_zero2"
    run eval 300 "$PY" -m retro_dist.cli eval --model "$OUT/run_zero2/export" --dataset "$OUT/ds" --device cuda \
      --max-samples 32
    run generate 300 "$PY" -m retro_dist.cli generate --model "$OUT/run_zero2/export" --dataset "$OUT/ds" \
      --device cuda --prompt "Return the number of" --max-new-tokens 40
  else
    line resume skip "no ZeRO-2 checkpoint to resume from"
  fi
  if command -v mpirun >/dev/null 2>&1; then
    run mpirun 300 mpirun --allow-run-as-root -np 1 -x PYTHONPATH -x MASTER_ADDR=127.0.0.1 \
      -x MASTER_PORT="$(free_port)" "$PY" -m retro_dist.cli train --data.dataset="$OUT/ds" \
      --run_dir="$OUT/run_mpi" --model.preset=tiny --train.steps=4 --logging.every=1 --logging.val_every=0
  else
    line mpirun skip "no mpirun on this machine"
  fi
  rm -rf "$OUT/run_fp16" "$OUT/run_fp32"
  train fp16 "$OUT/run_fp16" --train.steps=30 --train.precision=fp16 --logging.val_every=0
  train fp32 "$OUT/run_fp32" --train.steps=30 --train.precision=fp32 --logging.val_every=0
  fp16=$(last_loss "$OUT/fp16.log") fp32=$(last_loss "$OUT/fp32.log")
  if [ -n "$fp16" ] && [ -n "$fp32" ]; then
    if "$PY" -c "import sys; sys.exit(0 if abs($fp16 - $fp32) <= 0.05 * $fp32 else 1)"; then
      line fp16-vs-fp32 ok "loss at step 30: fp16 $fp16, fp32 $fp32"
    else
      line fp16-vs-fp32 FAIL "loss at step 30: fp16 $fp16, fp32 $fp32 (more than 5% apart)"
    fi
  fi
fi

run profile 300 "$PY" bench/gpu_check.py profile
run mfu 300 "$PY" bench/gpu_check.py mfu
run embed 300 "$PY" bench/gpu_check.py embed

echo "gpu_check: $passed ok, $failed failed, $skipped skipped; logs in $OUT/" | tee -a "$OUT/summary.txt"
[ "$failed" -eq 0 ]
