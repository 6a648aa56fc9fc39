"""Stage 5, shard: webdataset tars of training samples, per split (shards/{split}-NNNNNN.tar).

Sample s of a split: `tokens.npy` int32 [seq_len + 1] = stream tokens [s * seq_len, s * seq_len + seq_len + 1), and
`neighbors.npy` int32 [seq_len // chunk_size, num_neighbors] = the neighbor ids of its chunks. Shards are written
into a temporary directory and swapped in whole; the manifest lists each shard with its sample count, size and
sha256 (tar has no payload checksum, so the loader can verify a shard it doubts).
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from retro_dist.atomic import fsync_path
from retro_dist.data.format import SPLITS, Layout, file_sha256, load_npy, sample_key

from .stage import StageContext

def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def samples_per_shard(seq_len: int, chunks_per_sample: int, num_neighbors: int, *, max_samples: int,
                      max_bytes: int) -> int:
    """Samples have a fixed size, so a byte limit is a sample-count limit."""
    sample_bytes = 4 * (seq_len + 1 + chunks_per_sample * num_neighbors) + 2 * 128 + 3 * 512  # npy + tar headers
    return max(1, min(max_samples, max_bytes // sample_bytes))


def run(ctx: StageContext) -> dict[str, Any]:
    """Ranks write shards round-robin (shard r, r + N, ...) into one temporary directory; rank 0 lists them in shard
    order and swaps the directory in. Shard boundaries depend only on the options, so the bytes do not depend on N."""
    world, layout, m = ctx.world, Layout(ctx.root), ctx.manifest
    seq_len, chunk_size, k = m["seq_len"], m["chunk_size"], m["num_neighbors"]
    per_shard = samples_per_shard(seq_len, seq_len // chunk_size, k, max_samples=ctx.config.shard_samples,
                                  max_bytes=ctx.config.shard_bytes)
    tmp = layout.root / f".shards.tmp-{ctx.fingerprint[:16]}"
    start = time.perf_counter()
    world.on_main(lambda: _fresh_dir(tmp))
    written: list[tuple[str, int, dict[str, Any]]] = []
    error = None
    try:
        for split in SPLITS:
            num_samples = m["counts"][split]["samples"]
            numbers = world.my_blocks(-(-num_samples // per_shard))
            mine = sum(min(per_shard, num_samples - n * per_shard) for n in numbers)
            with tqdm(total=mine, desc=f"shard {split} (rank 0 of {world.size})" if world.size > 1 else
                      f"shard {split}", unit="sample", mininterval=1.0, disable=not world.is_main or not mine) as bar:
                for number in numbers:
                    begin, end = number * per_shard, min(num_samples, (number + 1) * per_shard)
                    path = tmp / layout.shard_name(split, number)
                    _write_shard(path, layout, split, range(begin, end), seq_len=seq_len, chunk_size=chunk_size)
                    written.append((split, number, {"name": path.name, "samples": end - begin,
                                                    "bytes": path.stat().st_size, "sha256": file_sha256(path)}))
                    bar.update(end - begin)
    except Exception as e:  # noqa: BLE001 - every rank raises it, or the first rank's, in check
        error = e
    try:
        world.check(error)
        parts = world.gather(written)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def swap_in() -> dict[str, Any]:
        shards: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
        for split, _, facts in sorted((w for part in parts for w in part), key=lambda w: (SPLITS.index(w[0]), w[1])):
            shards[split].append(facts)
        # swap the whole directory: readers see the old shards or all the new ones
        fsync_path(tmp)
        old = layout.root / f".shards.old-{ctx.fingerprint[:16]}"
        shutil.rmtree(old, ignore_errors=True)
        if layout.shards.exists():
            layout.shards.rename(old)
        tmp.rename(layout.shards)
        fsync_path(layout.root)
        shutil.rmtree(old, ignore_errors=True)
        ctx.facts["shards"] = shards
        samples = sum(s["samples"] for v in shards.values() for s in v)
        return {f"{split}_shards": len(v) for split, v in shards.items()} | {
            f"{split}_samples": sum(s["samples"] for s in v) for split, v in shards.items()} | {
            "samples_per_s": round(samples / (time.perf_counter() - start), 1), "shards_written": len(written)}

    return world.on_main(swap_in)


def _write_shard(path: Path, layout: Layout, split: str, samples: range, *, seq_len: int, chunk_size: int) -> None:
    """One tar of samples, fsynced; the token stream and neighbors are read memory-mapped, a sample at a time."""
    stream = load_npy(layout.chunks(split)).reshape(-1)
    neighbors = load_npy(layout.neighbors(split))
    per_sample = seq_len // chunk_size
    with wds.TarWriter(str(path), mtime=0.0) as sink:  # fixed mtime: reproducible bytes
        for s in samples:
            sink.write({
                "__key__": sample_key(split, s),
                "tokens.npy": _npy_bytes(np.ascontiguousarray(stream[s * seq_len: (s + 1) * seq_len + 1])),
                "neighbors.npy": _npy_bytes(np.ascontiguousarray(neighbors[s * per_sample: (s + 1) * per_sample])),
            })
    fsync_path(path)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # what a killed run left
    path.mkdir()

