"""RetroLoader: webdataset shards of tokens + neighbor ids -> RETRO batches, equal on every rank, resumable exactly.

The plan of an epoch is a pure function of (seed, epoch, world size, rank, workers, batch size) and the manifest:

- Shards are shuffled per epoch. With at least as many shards as ranks, rank r reads shards r, r + W, ...; with
  fewer, every rank reads every shard and takes every W-th sample. DataLoader workers split a rank's share the same
  way. Each shard is read whole, checked, and its samples permuted per (epoch, shard): shuffling at shard
  granularity plus within shards, without a cross-shard buffer whose state could not be restored.
- Every rank yields the same number of batches per epoch: floor(samples / (world * batch)). A rank whose shards
  hold fewer samples wraps around to the start of its share; one with more stops early. Per epoch a rank therefore
  repeats or skips at most about one shard's worth of samples; samples skipped as bad are replaced the same way.
- The state after every batch travels with it from the worker; `state_dict()` holds each worker's position, so a
  restart yields exactly the batches the uninterrupted run would have. With another world size, worker count or
  batch size, the position is re-derived from the global number of samples consumed in the epoch: the rest of
  that epoch is re-dealt over the new ranks (some of its samples may be seen twice or not at all), later epochs
  follow the new plan exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .format import DatasetError, Layout, load_manifest, load_npy, neighbor_tokens
from .shards import Sample, SampleSpec, read_shard

_MIX = 0x9E3779B97F4A7C15  # seeds of (seed, epoch, shard) kept apart


@dataclass(frozen=True)
class Item:
    """One shard, or every `stride`-th of its samples from `offset`."""
    shard: int
    offset: int = 0
    stride: int = 1


def split_items(items: list[Item], parts: int, part: int) -> list[Item]:
    """Deal items to `parts` consumers: whole items when there are enough, else interleaved samples of every item."""
    if len(items) >= parts:
        return items[part::parts]
    return [Item(it.shard, it.offset + part * it.stride, it.stride * parts) for it in items]


def world_from_env() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_compatible(manifest: dict[str, Any], config) -> None:
    """One clear error when a dataset does not fit a RetroConfig."""
    problems = []
    if manifest["chunk_size"] != config.chunk_size:
        problems.append(f"chunk_size {manifest['chunk_size']} vs model {config.chunk_size}")
    if manifest["vocab_size"] > config.num_tokens:
        problems.append(f"vocab_size {manifest['vocab_size']} > model num_tokens {config.num_tokens}")
    if manifest["pad_id"] != config.pad_id:
        problems.append(f"pad_id {manifest['pad_id']} vs model {config.pad_id}")
    if manifest["seq_len"] > config.max_seq_len:
        problems.append(f"seq_len {manifest['seq_len']} > model max_seq_len {config.max_seq_len}")
    if problems:
        raise DatasetError("dataset and model disagree: " + "; ".join(problems))


class _EpochStream(IterableDataset):
    """What each DataLoader worker (or the main process, with 0 workers) iterates: its batches of one epoch."""

    def __init__(self, loader: "RetroLoader", epoch: int, positions: list[tuple[int, int, int]], first: int):
        self.loader, self.epoch, self.positions, self.first = loader, epoch, positions, first

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        # DataLoader takes batches from its workers round-robin starting at worker 0; batch j of the epoch belongs
        # to plan worker j % workers, so after a resume at batch p, DataLoader worker i plays plan worker p + i
        worker = 0 if info is None else (info.id + self.first) % info.num_workers
        yield from self.loader._worker_batches(self.epoch, worker, self.positions[worker])


class RetroLoader:
    """Iterate one epoch of batches: {'tokens': int64 [b, seq_len + 1], 'retrieved': int64 [b, k, r, 2 * chunk_size]
    or None, 'index': int64 [b] sample indices}. `len()` is the number of batches per epoch, equal on every rank."""

    def __init__(self, dataset: str | Path, split: str, *, batch_size: int, num_workers: int = 0, seed: int = 0,
                 num_neighbors: int | None = None, retrieval: bool = True, on_bad_sample: str = "error",
                 rank: int | None = None, world_size: int | None = None, shard_urls: list[str] | None = None):
        self.layout = Layout(dataset)
        self.manifest = m = load_manifest(dataset)
        if not m.get("stages", {}).get("shard", {}).get("done"):
            raise DatasetError(f"{dataset} is incomplete (stage 'shard' not done): finish `retro-dist prepare`")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        env_rank, env_world = world_from_env()
        self.rank, self.world_size = (env_rank if rank is None else rank), (env_world if world_size is None else world_size)
        self.split, self.batch_size, self.num_workers, self.seed = split, batch_size, num_workers, seed
        self.retrieval, self.on_bad_sample = retrieval, on_bad_sample
        self.num_neighbors = m["num_neighbors"] if num_neighbors is None else num_neighbors
        if not 1 <= self.num_neighbors <= m["num_neighbors"]:
            raise ValueError(f"num_neighbors={self.num_neighbors}: the dataset has {m['num_neighbors']} per chunk")
        self.shards = m["shards"].get(split) or []
        self.urls = shard_urls or [str(self.layout.shards / s["name"]) for s in self.shards]
        if len(self.urls) != len(self.shards):
            raise ValueError(f"{len(self.urls)} shard URLs given for {len(self.shards)} shards of split {split!r}")
        total = sum(s["samples"] for s in self.shards)
        self.batches_per_epoch = total // (self.world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DatasetError(f"split {split!r} of {dataset} has {total} samples, fewer than one batch of "
                               f"{batch_size} for each of {self.world_size} ranks")
        self.spec = SampleSpec.from_manifest(m, m["counts"]["train"]["chunks"])
        self.epoch, self.batches, self.skipped = 0, 0, 0
        self.positions = self._start_positions()
        self._db: np.ndarray | None = None

    # the plan --------------------------------------------------------------------------------------------------

    def _items(self, epoch: int, worker: int) -> list[Item]:
        order = np.random.default_rng([self.seed, epoch, _MIX]).permutation(len(self.shards))
        mine = split_items([Item(int(s)) for s in order], self.world_size, self.rank)
        return split_items(mine, max(1, self.num_workers), worker)

    def _worker_budget(self, worker: int) -> int:
        workers = max(1, self.num_workers)
        return self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)

    def _selected(self, item: Item) -> int:
        n = self.shards[item.shard]["samples"]
        return max(0, -(-(n - item.offset) // item.stride))

    def _start_positions(self) -> list[tuple[int, int, int]]:
        """(item cursor, sample cursor within the item, batches yielded) per worker at the start of an epoch."""
        return [(0, 0, 0) for _ in range(max(1, self.num_workers))]

    def _positions_after(self, epoch: int, batches: int) -> list[tuple[int, int, int]]:
        """Worker positions after `batches` batches of this rank, from the manifest's counts alone."""
        workers = max(1, self.num_workers)
        out = []
        for w in range(workers):
            done = batches // workers + (w < batches % workers)
            samples, cursor, items = done * self.batch_size, 0, self._items(epoch, w)
            sizes = [self._selected(it) for it in items]
            if sum(sizes) == 0:
                raise DatasetError(f"worker {w} of rank {self.rank} has no samples")
            while samples >= sizes[cursor % len(items)]:  # whole items consumed (empty ones included)
                samples -= sizes[cursor % len(items)]
                cursor += 1
            out.append((cursor, samples, done))
        return out

    # workers ---------------------------------------------------------------------------------------------------

    def _db_chunks(self) -> np.ndarray:
        if self._db is None:  # opened lazily in each worker: memory maps do not cross process boundaries
            self._db = load_npy(self.layout.chunks("train"))
        return self._db

    def _worker_batches(self, epoch: int, worker: int, position: tuple[int, int, int]) -> Iterator[dict[str, Any]]:
        items = self._items(epoch, worker)
        cursor, within, done = position
        budget, skipped, batch = self._worker_budget(worker), 0, []
        empty_rounds = 0
        while done < budget:
            item = items[cursor % len(items)]
            meta = self.shards[item.shard]
            samples = read_shard(self.urls[item.shard], expected_samples=meta["samples"],
                                      sha256=meta.get("sha256"), spec=self.spec, policy=self.on_bad_sample)
            order = np.random.default_rng([self.seed, epoch, item.shard, _MIX]).permutation(len(samples))
            chosen = order[item.offset::item.stride]
            good_in_item = 0
            while within < len(chosen) and done < budget:
                sample = samples[chosen[within]]
                within += 1
                if sample is None:
                    skipped += 1
                    continue
                good_in_item += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    done += 1
                    next_position = (cursor + (within == len(chosen)), within % len(chosen), done)
                    yield self._collate(batch, worker, next_position, skipped)
                    batch, skipped = [], 0
            if within >= len(chosen):
                cursor, within = cursor + 1, 0
            empty_rounds = 0 if good_in_item else empty_rounds + 1
            if empty_rounds > len(items):
                raise DatasetError(f"rank {self.rank} worker {worker}: every sample of its shards is bad")

    def _collate(self, batch: list[Sample], worker: int, position: tuple[int, int, int],
                 skipped: int) -> dict[str, Any]:
        tokens = torch.from_numpy(np.stack([t for _, t, _ in batch]))
        retrieved = None
        if self.retrieval:
            ids = np.stack([n[:, : self.num_neighbors] for _, _, n in batch])
            retrieved = torch.from_numpy(neighbor_tokens(self._db_chunks(), ids, pad_id=self.manifest["pad_id"])).long()
        return {"tokens": tokens, "retrieved": retrieved, "index": torch.tensor([i for i, _, _ in batch]),
                "_state": (worker, position, skipped)}

    # iteration and state ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the current epoch; afterwards the loader stands at the next epoch."""
        stream = _EpochStream(self, self.epoch, list(self.positions), self.batches % max(1, self.num_workers))
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers else None)
        for batch in loader:
            worker, position, skipped = batch.pop("_state")
            self.positions[worker] = position
            self.batches += 1
            self.skipped += skipped
            yield batch
        if self.batches >= self.batches_per_epoch:
            self.epoch, self.batches = self.epoch + 1, 0
            self.positions = self._start_positions()

    def forever(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "seed": self.seed, "skipped": self.skipped,
                "world_size": self.world_size, "rank": self.rank, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "split": self.split, "positions": [list(p) for p in self.positions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["split"] != self.split:
            raise ValueError(f"loader state is for split {state['split']!r} seed {state['seed']}, this loader "
                             f"reads split {self.split!r} with seed {self.seed}")
        self.epoch, self.skipped = state["epoch"], state["skipped"]
        same_plan = all(state[k] == getattr(self, k) for k in ("world_size", "rank", "num_workers", "batch_size"))
        if same_plan:
            self.batches = state["batches"]
            self.positions = [tuple(p) for p in state["positions"]]
            return
        # another plan: continue after the same number of samples consumed in this epoch, across all ranks
        consumed = state["batches"] * state["batch_size"] * state["world_size"]
        self.batches = min(self.batches_per_epoch, consumed // (self.batch_size * self.world_size))
        self.positions = self._positions_after(self.epoch, self.batches)
