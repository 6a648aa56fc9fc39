"""Loader throughput against what training consumes, and the cost of a deep resume. Not a test.

Builds (or reuses, with --dataset) a dataset of the standard library's docstrings with the hash embedder at
seq_len 2048, then prints one table: loader samples/s with 0, 1 and 2 workers (over whole epochs, and after each
epoch's first batch, with the time to that first batch), for this loader (canonical streams, default streams for a
global batch of --batch-size on 1 rank) and side by side for the loader before canonical streams (its source read
from git at BEFORE_STREAMS, so the library keeps one plan); the samples/s a forward +
backward + AdamW step of the tiny and reference models consumes (bf16 autocast, this box); their ratio (target
>= 20x); and the time to the first batch after resuming at the last batch of an epoch versus from its start.

With --reads it prints only the cost of the plan in tar reads instead: per epoch, all ranks together, at 1, 2 and 8
ranks, for this loader and side by side for the loader of --reads-against (default BEFORE_DEAL, which dealt only
whole shards to streams), with the distinct samples each epoch yields, on the dataset's train shards and on the same
samples cut into uneven shards (10 x 24 + 20 by default, --uneven).

    python bench/loader.py [--dataset DIR] [--batches 60]
    python bench/loader.py --reads [--dataset DIR] [--uneven 24 260]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from retro_dist import RETRO
from retro_dist.data.format import load_manifest
from retro_dist.data.loader import RetroLoader
from retro_dist.model.presets import preset_config


BEFORE_STREAMS = "e951ac51388120420c9635ff7b37c1d13f26375d"  # the last commit whose loader dealt shards per rank
BEFORE_DEAL = "b2524e4"  # the last commit whose canonical streams took whole shards only (wrapping or stopping early)


def loader_at(commit: str):
    """The loader module of `commit`, loaded from git next to this one (same shards.py and format.py)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{commit}:retro_dist/data/loader.py"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader(f"retro_dist.data._loader_{commit[:7]}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "retro_dist.data"
    sys.modules[spec.name] = module  # DataLoader workers (fork) find the class through its module
    exec(compile(source, f"{commit[:7]}:retro_dist/data/loader.py", "exec"), module.__dict__)
    return module


def loader_before_streams():
    return loader_at(BEFORE_STREAMS).RetroLoader


def uneven_copy(dataset: Path, out: Path, per_shard: int, samples: int) -> Path:
    """`dataset` with its first `samples` train samples rewritten by the shard stage's writer into shards of
    `per_shard` (the last one shorter)."""
    from data_prep.shard import _write_shard
    from retro_dist.data.format import Layout, file_sha256, save_manifest
    shutil.copytree(dataset, out)
    layout, manifest = Layout(out), load_manifest(out)
    samples = min(samples, manifest["counts"]["train"]["samples"])
    for meta in manifest["shards"]["train"]:
        (layout.shards / meta["name"]).unlink()
    shards = []
    for number, begin in enumerate(range(0, samples, per_shard)):
        path = layout.shards / layout.shard_name("train", number)
        chosen = range(begin, min(samples, begin + per_shard))
        _write_shard(path, layout, "train", chosen, seq_len=manifest["seq_len"], chunk_size=manifest["chunk_size"])
        shards.append({"name": path.name, "samples": len(chosen), "bytes": path.stat().st_size,
                       "sha256": file_sha256(path)})
    manifest["shards"]["train"], manifest["counts"]["train"]["samples"] = shards, samples
    save_manifest(out, manifest)
    return out


def epoch_reads(module, dataset: Path, world: int, global_batch: int) -> tuple[int, int, int]:
    """One epoch on every rank of `world` (no workers: one shard cache per rank): (tar reads, samples yielded,
    distinct samples), counting the calls of the module's read_shard."""
    real, reads = module.read_shard, [0]

    def counted(url, **kw):
        reads[0] += 1
        return real(url, **kw)

    module.read_shard = counted
    try:
        loaders = [module.RetroLoader(dataset, "train", batch_size=global_batch // world, global_batch=global_batch,
                                      rank=r, world_size=world) for r in range(world)]
        seen = [s for loader in loaders for b in loader for s in b["index"].tolist()]
    finally:
        module.read_shard = real
    return reads[0], len(seen), len(set(seen))


def reads_table(dataset: Path, against: str, uneven: tuple[int, int], global_batch: int) -> None:
    import retro_dist.data.loader as current
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {"as prepared": dataset,
                    f"uneven {uneven[0]}s": uneven_copy(dataset, Path(tmp) / "uneven", *uneven)}
        print(f"\ntar reads per epoch, all ranks together (no workers: one shard cache per rank), global batch "
              f"{global_batch}, {math.gcd(global_batch, 8)} canonical streams\n")
        print("| shards | samples | ranks | plan | tar reads | samples yielded | distinct |")
        print("|---|---|---|---|---|---|---|")
        for name, ds in datasets.items():
            manifest = load_manifest(ds)
            sizes = [s["samples"] for s in manifest["shards"]["train"]]
            for world in (1, 2, 8):
                for plan, module in ((against[:7], loader_at(against)), ("this", current)):
                    reads, yielded, distinct = epoch_reads(module, ds, world, global_batch)
                    print(f"| {len(sizes)} {name} | {sum(sizes)} | {world} | {plan} | {reads} | {yielded} | "
                          f"{distinct} |")


def loader_rates(cls, dataset: Path, workers: int, batches: int, batch_size: int) -> tuple[float, float, float]:
    """Whole epochs until `batches` batches: (samples/s overall, samples/s after each epoch's first batch, median
    seconds to an epoch's first batch). An epoch starts its DataLoader workers anew and, under canonical streams,
    opens one shard per stream before its first batch: on this bench's 20-batch epochs that start is a large share
    of the overall rate, on real epochs (thousands of batches) a negligible one."""
    loader = cls(dataset, "train", batch_size=batch_size, num_workers=workers)
    next(iter(loader.forever()))  # imports and the first worker start-up are not throughput
    loader = cls(dataset, "train", batch_size=batch_size, num_workers=workers)
    steady, firsts, steady_s = 0, [], 0.0
    start = time.perf_counter()
    while len(firsts) + steady < batches:
        t0 = time.perf_counter()
        epoch = iter(loader)
        next(epoch)
        t1 = time.perf_counter()
        firsts.append(t1 - t0)
        for _ in epoch:
            steady += 1
        steady_s += time.perf_counter() - t1
    done = len(firsts) + steady
    overall = done * batch_size / (time.perf_counter() - start)
    return overall, steady * batch_size / max(steady_s, 1e-9), statistics.median(firsts)


def training_rate(preset: str, manifest: dict, batch_size: int, steps: int = 2) -> float:
    config = preset_config(preset, num_tokens=manifest["vocab_size"], max_seq_len=manifest["seq_len"],
                           chunk_size=manifest["chunk_size"], pad_id=manifest["pad_id"])
    model = RETRO(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    k, cs = manifest["seq_len"] // manifest["chunk_size"], manifest["chunk_size"]
    seq = torch.randint(1, manifest["vocab_size"], (batch_size, manifest["seq_len"] + 1))
    retrieved = torch.randint(1, manifest["vocab_size"], (batch_size, k, manifest["num_neighbors"], 2 * cs))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def first_batch_seconds(dataset: Path, batch_size: int, at_batch: int | None) -> float:
    probe = RetroLoader(dataset, "train", batch_size=batch_size)
    loader = RetroLoader(dataset, "train", batch_size=batch_size)
    if at_batch is not None:
        state = probe.state_dict() | {"batches": at_batch}  # positions are always derived from the counts
        start = time.perf_counter()
        loader.load_state_dict(state)
    else:
        start = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reads", action="store_true", help="print only the cost of the plan in tar reads")
    parser.add_argument("--reads-against", default=BEFORE_DEAL, help="commit whose loader --reads compares with")
    parser.add_argument("--uneven", type=int, nargs=2, default=(24, 260), metavar=("PER_SHARD", "SAMPLES"),
                        help="the uneven shards --reads also measures (default: 24 260, i.e. 10 x 24 + 20)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        dataset = args.dataset
        if dataset is None:
            from data_prep.corpora import stdlib_docstrings, write_corpus
            from data_prep.pipeline import main as prepare
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            corpus = write_corpus(tmp / "corpus", stdlib_docstrings())
            dataset = tmp / "ds"
            assert prepare(["--input", str(corpus), "--out", str(dataset), "--embedder", "hash-256",
                            "--vocab-size", "8000", "--shard-samples", "16"]) == 0
        if args.reads:
            reads_table(dataset, args.reads_against, tuple(args.uneven), args.batch_size)
            return
        manifest = load_manifest(dataset)
        old = loader_before_streams()
        rates = {w: {name: loader_rates(cls, dataset, w, args.batches, args.batch_size)
                     for name, cls in (("before", old), ("streams", RetroLoader))} for w in (0, 1, 2)}
        consume = {"tiny": training_rate("tiny", manifest, 8), "reference": training_rate("reference", manifest, 2)}
        per_epoch = len(RetroLoader(dataset, "train", batch_size=args.batch_size))
        cold = first_batch_seconds(dataset, args.batch_size, None)
        deep = first_batch_seconds(dataset, args.batch_size, per_epoch - 1)

    print(f"\ndataset: seq_len {manifest['seq_len']}, {manifest['num_neighbors']} neighbors, "
          f"{manifest['counts']['train']['samples']} train samples in {len(manifest['shards']['train'])} shards; "
          f"batch {args.batch_size}, {per_epoch} batches per epoch; {torch.get_num_threads()} torch threads\n")
    print(f"{'workers':<9}{'plan':<9}{'samples/s':>10}{'after 1st':>11}{'1st batch s':>13}  " +
          "  ".join(f"{'x ' + p + ' training':>20}" for p in consume) + f"{'streams / before':>18}"
          f"{'after 1st':>11}")
    for w, by_plan in rates.items():
        for name, (rate, steady, first) in by_plan.items():
            print(f"{w:<9}{name:<9}{rate:>10.0f}{steady:>11.0f}{first:>13.3f}  " +
                  "  ".join(f"{rate / c:>19.1f}x" for c in consume.values()) +
                  (f"{rate / by_plan['before'][0]:>17.2f}x{steady / by_plan['before'][1]:>10.2f}x"
                   if name == "streams" else ""))
    print("\ntraining consumes (fwd+bwd+AdamW, bf16 autocast): " +
          ", ".join(f"{p} {c:.1f} samples/s" for p, c in consume.items()))
    print(f"time to first batch: from the epoch start {cold:.3f}s, resumed at batch {per_epoch - 1} of {per_epoch} "
          f"{deep:.3f}s (whole shards before the position are skipped unread)")


if __name__ == "__main__":
    main()
