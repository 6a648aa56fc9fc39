"""Block-parallel, resumable computation of one row-aligned array (embeddings, neighbors).

Rows are cut into fixed blocks of `block_size`; ranks take blocks round-robin and save each as a part file named
by the stage fingerprint; rank 0 concatenates the parts into the output when all exist. A killed run leaves whole
part files (each written atomically), which the next run with the same fingerprint reuses. Fixed blocks mean a row's
result never depends on the number of ranks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from retro_dist.data.format import npy_writer, save_npy

from .stage import StageContext


def compute_blocks(ctx: StageContext, *, out: Path, num_rows: int, width: int, dtype: str,
                   compute: Callable[[int, int], np.ndarray], desc: str, unit: str = "chunk") -> int:
    """Fill `out` [num_rows, width] with compute(lo, hi) per block. Returns the number of blocks computed now."""
    block = ctx.config.block_size
    num_blocks = -(-num_rows // block)
    parts = out.parent / f".{out.stem}.parts-{ctx.fingerprint[:16]}"
    parts.mkdir(parents=True, exist_ok=True)
    mine = [b for b in ctx.world.my_blocks(num_blocks) if not (parts / f"{b:06d}.npy").exists()]
    computed = 0
    rows_mine = sum(min(block, num_rows - b * block) for b in mine)
    with tqdm(total=rows_mine, desc=desc, unit=unit, disable=not ctx.world.is_main or not mine,
              mininterval=1.0) as bar:
        for b in mine:
            lo, hi = b * block, min(num_rows, (b + 1) * block)
            result = np.asarray(compute(lo, hi), dtype=dtype)
            if result.shape != (hi - lo, width):
                raise RuntimeError(f"{desc}: block {b} gave shape {result.shape}, expected {(hi - lo, width)}")
            save_npy(parts / f"{b:06d}.npy", result)
            computed += 1
            bar.update(hi - lo)
    ctx.world.barrier()
    if ctx.world.is_main:
        with npy_writer(out, (num_rows, width), dtype) as array:
            for b in range(num_blocks):
                array.append(np.load(parts / f"{b:06d}.npy"))
        shutil.rmtree(parts)
        for stale in out.parent.glob(f".{out.stem}.parts-*"):  # parts of runs with other settings
            shutil.rmtree(stale, ignore_errors=True)
    ctx.world.barrier()
    return computed
