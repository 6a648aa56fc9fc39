"""Stage 5, shard: webdataset tars of training samples, per split (shards/{split}-NNNNNN.tar).

Sample s of a split: `tokens.npy` int32 [seq_len + 1] = stream tokens [s * seq_len, s * seq_len + seq_len + 1), and
`neighbors.npy` int32 [seq_len // chunk_size, num_neighbors] = the neighbor ids of its chunks. Shards are written
into a temporary directory and swapped in whole; the manifest lists each shard with its sample count, size and
sha256 (tar has no payload checksum, so the loader can verify a shard it doubts).
"""

from __future__ import annotations

import io
import os
import shutil
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from retro_dist.data.format import Layout, file_sha256, load_npy, sample_key

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
    if not ctx.world.is_main:
        return {}
    layout, m = Layout(ctx.root), ctx.manifest
    seq_len, chunk_size, k = m["seq_len"], m["chunk_size"], m["num_neighbors"]
    per_sample = seq_len // chunk_size
    per_shard = samples_per_shard(seq_len, per_sample, k, max_samples=ctx.config.shard_samples,
                                  max_bytes=ctx.config.shard_bytes)
    tmp = layout.root / f".shards.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shards: dict[str, list[dict[str, Any]]] = {}
    try:
        for split in ("train", "val"):
            num_samples = m["counts"][split]["samples"]
            shards[split] = []
            if num_samples == 0:
                continue
            stream = load_npy(layout.chunks(split)).reshape(-1)
            neighbors = load_npy(layout.neighbors(split))
            bar = tqdm(total=num_samples, desc=f"shard {split}", unit="sample", mininterval=1.0)
            for number, start in enumerate(range(0, num_samples, per_shard)):
                name = layout.shard_name(split, number)
                end = min(num_samples, start + per_shard)
                with wds.TarWriter(str(tmp / name), mtime=0.0) as sink:  # fixed mtime: reproducible bytes
                    for s in range(start, end):
                        sink.write({
                            "__key__": sample_key(split, s),
                            "tokens.npy": _npy_bytes(np.ascontiguousarray(stream[s * seq_len: (s + 1) * seq_len + 1])),
                            "neighbors.npy": _npy_bytes(np.ascontiguousarray(neighbors[s * per_sample: (s + 1) * per_sample])),
                        })
                bar.update(end - start)
                shards[split].append({"name": name, "samples": end - start, "bytes": (tmp / name).stat().st_size,
                                      "sha256": file_sha256(tmp / name)})
            bar.close()
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        # swap the whole directory: readers see the old shards or all the new ones
        old = layout.root / f".shards.old-{os.getpid()}"
        if layout.shards.exists():
            layout.shards.rename(old)
        tmp.rename(layout.shards)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ctx.facts["shards"] = shards
    return {f"{split}_shards": len(v) for split, v in shards.items()} | {
        f"{split}_samples": sum(s["samples"] for s in v) for split, v in shards.items()}


if __name__ == "__main__":
    from data_prep.pipeline import main
    raise SystemExit(main(stage="shard"))
