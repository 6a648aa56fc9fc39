"""Throughput of each data_prep stage on real text (the standard library's docstrings). Not a test.

Prints each stage's wall time and items/s from the manifest the run wrote. With --embedder minilm (the default
embedder, ~2 minutes per 10k chunks here) the embed row is MiniLM's real rate; bench/retrieval.py compares that rate
with the encoder's raw forward rate on the same batches and measures index recall.

    python bench/prepare.py [--embedder hash-256|minilm] [--limit DOCS] [--ranks N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_prep.corpora import stdlib_docstrings, write_corpus
from retro_dist.data.format import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedder", default="hash-256")
    parser.add_argument("--limit", type=int, default=None, help="documents (default: all, ~1.3 MB)")
    parser.add_argument("--ranks", type=int, default=1, help="MPI ranks (mpirun) for embed and neighbors")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        docs = stdlib_docstrings(args.limit)
        corpus = write_corpus(Path(tmp) / "corpus", docs)
        cmd = [sys.executable, "-m", "data_prep", "--input", str(corpus), "--out", f"{tmp}/ds",
               "--embedder", args.embedder, "--vocab-size", "8000"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if args.ranks > 1:
            cmd = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np",
                   str(args.ranks), *cmd]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total = time.perf_counter() - start
        m = load_manifest(f"{tmp}/ds")
    c = m["counts"]
    chunks = c["train"]["chunks"] + c["val"]["chunks"]
    items = {"tokenize": (c["train"]["tokens"] + c["val"]["tokens"], "tokens"), "embed": (chunks, "chunks"),
             "index": (c["train"]["chunks"], "vectors"), "neighbors": (chunks, "queries"),
             "shard": (c["train"]["samples"] + c["val"]["samples"], "samples")}
    print(f"\n{len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB, {chunks} chunks; embedder {args.embedder}; "
          f"{args.ranks} rank(s); index {m['index']['factory']}\n")
    print(f"{'stage':<11}{'wall s':>9}{'items':>10}  {'rate':>16}")
    for stage, (count, unit) in items.items():
        wall = m["stages"][stage]["wall_time_s"]
        print(f"{stage:<11}{wall:>9.2f}{count:>10}  {count / max(wall, 1e-9):>10,.0f} {unit}/s")
    print(f"{'total':<11}{total:>9.2f}   (including interpreter and model start-up)")


if __name__ == "__main__":
    main()
