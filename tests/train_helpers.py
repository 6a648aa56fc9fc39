"""Launching real multi-process training runs from tests: torchrun on loopback, logs parsed back."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from retro_dist.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
STEP_LOSS = re.compile(r"^step (\d+)/\d+ \| loss ([0-9.]+)", re.M)


def env() -> dict[str, str]:
    import torch
    extra = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}  # only silences a warning on CPU
    return {**os.environ, **extra, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def cli(*args) -> subprocess.CompletedProcess:
    """`retro-dist ARGS` through the console script installed beside this interpreter."""
    exe = shutil.which("retro-dist", path=str(Path(sys.executable).parent))
    assert exe, "the retro-dist console script is not installed (pip install -e .)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "retro_dist.cli", "train", *args]


def train(nproc: int, args: list[str], *, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, args), env=env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def losses(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in STEP_LOSS.findall(output)}


def tb_losses(run_dir) -> dict[int, float]:
    """Full-precision per-step losses from TensorBoard (the console rounds)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def tiny_args(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"--data.dataset={dataset}", f"--run_dir={run_dir}", "--model.preset=tiny", "--data.micro_batch=2",
            "--data.num_workers=0", "--train.precision=fp32", "--optim.warmup_steps=2", "--optim.lr=3e-3",
            "--logging.every=1", "--logging.val_every=6", "--logging.val_samples=8", "--checkpoint.every=4",
            *extra]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def kill_tree(pid: int, sig: int) -> None:
    """Signal a launcher and every process under it (torchrun starts its workers in their own sessions)."""
    for child in children(pid):
        kill_tree(child, sig)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def tiny_dataset(root: Path, *, documents: int = 200, **options: str) -> Path:
    """A dataset the tiny preset trains on in seconds: stdlib docstrings, vocab 512, chunks of 16, samples of 64,
    hash-64 embeddings, 2 neighbors; `options` override prepare's flags (shard_samples="20" -> --shard-samples 20)."""
    from data_prep.corpora import stdlib_docstrings, write_corpus
    from data_prep.pipeline import main as prepare

    flags = {"vocab_size": "512", "chunk_size": "16", "seq_len": "64", "embedder": "hash-64", "num_neighbors": "2",
             "shard_samples": "40", "val_fraction": "0.05"} | options
    corpus = write_corpus(root / "corpus", stdlib_docstrings(documents))
    args = ["--input", str(corpus), "--out", str(root / "ds")]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", value]
    assert prepare(args) == 0
    return root / "ds"
