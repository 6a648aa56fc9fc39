"""Does the model read its neighbors? The copy task, trained through the real pipeline, arms side by side.

Documents of random words, each written twice under different headers and shuffled apart (data_prep.corpora): the
second copy's words are predictable only from the first copy, which retrieval finds. Each arm trains the tiny preset
on 2 ranks (torchrun, ZeRO 2, global batch 16, lr 3e-3) and validates every --val-every steps with true
neighbors, random neighbors and retrieval off; the learning curves and the final ratio true / random are printed.

    python bench/copy_task.py                       # the aligned task, three arms, ~10 min on a 2-core CPU
    python bench/copy_task.py --task misaligned     # copies at unrelated chunk offsets (needs content matching)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {  # name -> RetroConfig overrides of the tiny preset
    "retro-pytorch positions": ["--model.arch.cca_positions=retro-pytorch", "--model.arch.enc_cross_attn_layers=null"],
    "aligned positions": ["--model.arch.cca_positions=aligned", "--model.arch.enc_cross_attn_layers=null"],
    "aligned, no encoder cross-attn": ["--model.arch.cca_positions=aligned", "--model.arch.enc_cross_attn_layers=[]"],
}


def train_arm(dataset: Path, run_dir: Path, extra: list[str], *, steps: int, val_every: int) -> float:
    from retro_dist.dist import free_port
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "retro_dist.cli", "train", f"--data.dataset={dataset}",
               f"--run_dir={run_dir}", "--model.preset=tiny", "--data.micro_batch=8", "--data.num_workers=0", "--train.precision=fp32",
               "--train.global_batch=16", f"--train.steps={steps}", "--optim.lr=3e-3", "--optim.warmup_steps=30",
               f"--logging.val_every={val_every}", "--logging.val_samples=0", "--logging.every=25",
               f"--checkpoint.every={steps}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"training failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def curves(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)}
            for tag in ("val/loss", "val/loss_random_neighbors", "val/loss_no_retrieval")}


def print_curve(title: str, c: dict[str, dict[int, float]]) -> None:
    """One validation curve: true / random / off losses per step and the ratio true / random."""
    print(title)
    print(f"  {'step':>5s} {'true':>8s} {'random':>8s} {'off':>8s} {'true/random':>12s}")
    for step in sorted(c["val/loss"]):
        t, r, o = c["val/loss"][step], c["val/loss_random_neighbors"][step], c["val/loss_no_retrieval"][step]
        print(f"  {step:5d} {t:8.4f} {r:8.4f} {o:8.4f} {t / r:12.3f}")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["aligned", "misaligned"], default="aligned")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), help=f"among {list(ARMS)}")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    import platform

    from data_prep.corpora import prepare_copy_task
    work = args.work or Path(tempfile.mkdtemp(prefix="copy_task_"))
    dataset = work / "ds" if (work / "ds" / "manifest.json").is_file() else prepare_copy_task(
        work, aligned=args.task == "aligned", num_docs=3000, seq_len=256, chunks_per_doc=4)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"copy task ({args.task}), {dataset}; tiny preset, 2 ranks, {args.steps} steps; CPU: {cpu}\n")
    results = {}
    for name in args.arms:
        run_dir = work / ("run-" + "".join(c if c.isalnum() else "-" for c in name))
        seconds = train_arm(dataset, run_dir, ARMS[name], steps=args.steps, val_every=args.val_every)
        results[name] = curves(run_dir)
        print_curve(f"{name}  ({seconds:.0f} s)", results[name])
    print(f"{'arm':45s} {'val loss true':>14s} {'random':>8s} {'off':>8s} {'true/random':>12s}")
    for name, c in results.items():
        last = max(c["val/loss"])
        t, r, o = c["val/loss"][last], c["val/loss_random_neighbors"][last], c["val/loss_no_retrieval"][last]
        print(f"{name:45s} {t:14.4f} {r:8.4f} {o:8.4f} {t / r:12.3f}")


if __name__ == "__main__":
    main()
