"""Dropout whose mask for a sample depends on that sample's place in the global batch, not on the rank, micro-batch
or neighbours it is computed with: the same masks at any world size or accumulation split.

A mask is drawn from its own generator, seeded from (run seed, optimizer step, the sample's position in its global
batch, the dropout site): a pure function of the run and the step. The trainer sets these keys around each
micro-batch's forward and backward with `sample_keyed`; activation checkpointing's recompute, which runs inside that
backward, draws the same masks again. Without keys (a model used outside the trainer) a site is plain dropout on
torch's global generator, and attention dropout stays inside scaled_dot_product_attention.

Cost: one generator per sample and site per micro-batch, drawing as many numbers as plain dropout; and attention
with keyed dropout runs unfused (SDPA's fused kernels draw their masks from the global generator for the whole
batch), so it holds the probabilities [b, h, n, n] as SDPA's math path does: measured by bench/dropout.py.
"""

from __future__ import annotations

import hashlib
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DropoutKeys:
    seed: int
    step: int
    positions: tuple[int, ...]  # each local sample's position in its global batch, in micro-batch order


# A module global, not a ContextVar: on GPU autograd runs backward (and a checkpoint's recompute) on its own thread.
_keys: DropoutKeys | None = None


def _ints(positions: Tensor | list[int]) -> tuple[int, ...]:
    # one read of a host tensor, not one per element
    return tuple(positions.tolist() if isinstance(positions, Tensor) else map(int, positions))


@contextmanager
def sample_keyed(seed: int, step: int, positions: Tensor | list[int]) -> Iterator[None]:
    """Within this block, every KeyedDropout draws sample i's mask from (seed, step, positions[i], site)."""
    global _keys
    previous, _keys = _keys, DropoutKeys(seed, step, _ints(positions))
    try:
        yield
    finally:
        _keys = previous


def keys_active() -> bool:
    """Whether masks are keyed now (inside `sample_keyed`)."""
    return _keys is not None


def mask_seed(seed: int, step: int, position: int, site: int) -> int:
    """A 64-bit generator seed of the four keys (blake2b: no two keys share a seed by arithmetic accident)."""
    packed = struct.pack("<4q", seed, step, position, site)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")


class KeyedDropout(nn.Module):
    """nn.Dropout(p) with per-sample masks under `sample_keyed`. The input's first dimension is the local samples,
    or samples times a fixed factor in sample-major order ((b k) chunks, (b k r) neighbors), as RETRO lays them out.
    `site` numbers the dropout modules of one model (RETRO sets it), so no two sites share a mask."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.site = p, 0

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keys = _keys
        if keys is None:
            return F.dropout(x, self.p, training=True)
        samples = len(keys.positions)
        if samples == 0 or x.shape[0] % samples:
            raise ValueError(f"keyed dropout: a first dimension of {x.shape[0]} is not a multiple of the "
                             f"{samples} samples whose positions were given")
        rows = x.shape[0] // samples
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        generator = torch.Generator(device=x.device)
        for i, position in enumerate(keys.positions):
            generator.manual_seed(mask_seed(keys.seed, keys.step, position, self.site))
            part = keep[i * rows:(i + 1) * rows]
            part.copy_(torch.rand(part.shape, generator=generator, device=x.device) >= self.p)
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


def number_sites(model: nn.Module) -> int:
    """Give each KeyedDropout of `model` its own site number, in module order; returns how many there are."""
    sites = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    for i, module in enumerate(sites):
        module.site = i
    return len(sites)
