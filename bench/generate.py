"""Generated tokens/s with the KV cache against full recompute (RETRO-pytorch's way), at 256 and 512 tokens.
Not a test. Target: >= 10x at 512.

    python bench/generate.py [--preset tiny|reference]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main as prepare
from retro_dist import RETRO
from retro_dist.data.format import load_manifest
from retro_dist.generate import Retriever, generate
from retro_dist.model.presets import preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", stdlib_docstrings(400))
        assert prepare(["--input", str(corpus), "--out", f"{tmp}/ds", "--embedder", "hash-256", "--vocab-size",
                        "4000", "--seq-len", "512"]) == 0
        m = load_manifest(f"{tmp}/ds")
        torch.manual_seed(0)
        model = RETRO(preset_config(args.preset, num_tokens=m["vocab_size"], max_seq_len=max(args.lengths),
                                    chunk_size=m["chunk_size"], pad_id=m["pad_id"])).eval()
        retriever = Retriever(f"{tmp}/ds")
        generate(model, retriever, [5], max_new_tokens=80)  # warm-up: first calls initialise kernels
        generate(model, retriever, [5], max_new_tokens=80, use_cache=False)
        rows = []
        for length in args.lengths:
            timings = {}
            for cached in (True, False):
                start = time.perf_counter()
                out = generate(model, retriever, [5], max_new_tokens=length - 1, use_cache=cached)
                timings[cached] = (len(out.tokens) - 1) / (time.perf_counter() - start)
            rows.append((length, timings[True], timings[False]))
    print(f"\nmodel: {args.preset} preset, {model.num_parameters / 1e6:.1f}M parameters, greedy, 1 sequence, "
          f"{torch.get_num_threads()} threads, retrieval (hash embedder, exact index) included\n")
    print(f"{'tokens':>7}{'cached tok/s':>14}{'recompute tok/s':>17}{'speed-up':>10}")
    for length, cached, full in rows:
        print(f"{length:>7}{cached:>14.1f}{full:>17.1f}{cached / full:>9.1f}x")


if __name__ == "__main__":
    main()
