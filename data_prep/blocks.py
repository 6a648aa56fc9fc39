"""Block-parallel, resumable computation of one row-aligned array (embeddings, neighbors), written in place.

Rows are cut into fixed blocks of `block_size`; ranks take blocks round-robin. Rank 0 first creates the whole output
(npy header + full size) under a work directory named by the stage fingerprint; every rank then writes each of its
blocks at the block's row offset, fsyncs, and only then leaves an empty `.done` marker for it. When every block is
done, rank 0 renames the output into place and removes the work directory. Nobody concatenates, no rank holds more
than one block, and a killed run leaves durable blocks that the next run with the same fingerprint keeps. Fixed blocks
mean a row's result never depends on the number of ranks or on how often the run was interrupted.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from retro_dist.atomic import fsync_path
from retro_dist.data.format import create_npy, npy_header, pwrite_all

from .parallel import PrepError
from .stage import StageContext

@dataclass
class BlockStats:
    blocks_computed: int  # by this rank, in this run
    rows_per_s: float  # rows computed by all ranks in this run / the run's wall time (0.0 when nothing was left)


def _marker(lo: int, hi: int) -> str:
    return f"rows-{lo:012d}-{hi:012d}.done"  # named by rows, so a changed block_size never reuses a block


def _undone(work: Path, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    done = set(os.listdir(work))  # one listing, not a stat per block
    return [(lo, hi) for lo, hi in blocks if _marker(lo, hi) not in done]


def _usable(data: Path, shape: tuple[int, int], dtype: np.dtype) -> bool:
    try:
        array = np.load(data, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.shape == shape and array.dtype == dtype


def compute_blocks(ctx: StageContext, *, out: Path, num_rows: int, width: int, dtype: str,
                   compute: Callable[[int, int], np.ndarray], desc: str, unit: str = "chunk") -> BlockStats:
    """Fill `out` [num_rows, width] with compute(lo, hi) per block of rows [lo, hi)."""
    world, block, dtype = ctx.world, ctx.config.block_size, np.dtype(dtype)
    shape = (num_rows, width)
    blocks = [(lo, min(num_rows, lo + block)) for lo in range(0, num_rows, block)]
    work = out.parent / f".{out.stem}.parts-{ctx.fingerprint[:16]}"
    data = work / out.name
    start = time.perf_counter()

    def prepare() -> int:
        if not _usable(data, shape, dtype):
            shutil.rmtree(work, ignore_errors=True)  # markers of another shape's rows mean nothing
        work.mkdir(parents=True, exist_ok=True)
        if not data.exists():
            create_npy(data, shape, dtype)
        # no rank writes a marker before every rank has this answer: it is what the whole run has left to do
        return sum(hi - lo for lo, hi in _undone(work, blocks))

    def finish() -> None:
        missing = [f"{lo}..{hi}" for lo, hi in _undone(work, blocks)]
        if missing:
            raise PrepError(f"{desc}: rows {', '.join(missing[:3])} were not written by any rank")
        os.replace(data, out)
        fsync_path(out.parent)
        shutil.rmtree(work)
        for stale in out.parent.glob(f".{out.stem}.parts-*"):  # work of runs with other settings
            shutil.rmtree(stale, ignore_errors=True)

    rows_left = world.on_main(prepare)
    mine = _undone(work, [blocks[b] for b in world.my_blocks(len(blocks))])
    bar = tqdm(total=sum(hi - lo for lo, hi in mine), unit=unit, unit_scale=True, mininterval=1.0,
               desc=f"{desc} (rank 0 of {world.size})" if world.size > 1 else desc,
               disable=not world.is_main or not mine)  # rank 0's share: its rate and ETA stand for every rank's
    error = None
    try:
        with bar:
            _write_blocks(data, mine, compute, width=width, dtype=dtype, header=len(npy_header(shape, dtype)),
                          desc=desc, progress=bar.update)
    except Exception as e:  # noqa: BLE001 - every rank raises it, or the first rank's, in check
        error = e
    world.check(error)
    world.on_main(finish)
    seconds = time.perf_counter() - start
    return BlockStats(blocks_computed=len(mine), rows_per_s=round(rows_left / seconds, 1) if rows_left else 0.0)


def _write_blocks(data: Path, blocks: list[tuple[int, int]], compute: Callable[[int, int], np.ndarray], *,
                  width: int, dtype: np.dtype, header: int, desc: str, progress: Callable[[int], Any]) -> None:
    """compute(lo, hi) for each block, written at its offset in `data`, made durable, then marked done."""
    fd = os.open(data, os.O_WRONLY)
    try:
        for lo, hi in blocks:
            result = np.ascontiguousarray(compute(lo, hi), dtype=dtype)
            if result.shape != (hi - lo, width):
                raise PrepError(f"{desc}: rows {lo}..{hi} gave shape {result.shape}, expected {(hi - lo, width)}")
            pwrite_all(fd, result, header + lo * width * dtype.itemsize)
            os.fsync(fd)  # the rows are durable before their marker says so
            (data.parent / _marker(lo, hi)).touch()
            progress(hi - lo)
    finally:
        os.close(fd)
