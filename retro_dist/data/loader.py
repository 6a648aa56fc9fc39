"""RetroLoader: webdataset shards of tokens + neighbor ids -> RETRO batches, equal on every rank, resumable exactly,
in one global order whatever the world size, DataLoader workers or micro-batch / accumulation split.

The plan ("canonical streams", after MosaicML streaming's canonical nodes). A run fixes, when it starts, a global
batch G and a number of canonical streams C (default: gcd(G, 8), so 1, 2, 4 and 8 ranks all fit whenever G is a
multiple of 8); both are recorded in the loader state and kept on resume. For an epoch:

- The shards are shuffled by (seed, epoch) and dealt to the C streams so that every stream holds exactly its
  quota of Q = B q samples, B = floor(samples / G) global batches per epoch, q = G / C (see `deal`): stream s first
  takes whole shards s, s + C, ... of the first floor(shards / C) C in epoch order, up to its quota; what those
  shards hold beyond a stream's quota and the remaining shards form a pool, dealt in contiguous runs of samples to
  the streams still short of their quota, in stream order. So an epoch yields every sample at most once and all but
  samples - B G < G of them. Each shard is read whole and sequentially (no random access into tars), checked, and
  its samples permuted by (seed, epoch, shard): shuffling at shard granularity plus within shards, as a pure
  function of the seed.
- Global batch t (t < B) takes samples [t q, (t + 1) q) of every stream, streams in order. So the samples of global
  batch t are a fixed function of (seed, epoch, dataset, C, G).
- Rank r of W takes streams r, r + W, ... (W must divide C): its G / W samples of batch t are its streams' pieces in
  stream order, cut into micro-batches of `batch_size` (accumulation = G / (W * batch_size)). Every rank yields the
  same number of micro-batches. The loss of a step is the mean over the same G samples at any world size.
- DataLoader workers split a rank's streams into contiguous runs (the largest worker count <= num_workers that
  divides them; extra workers stay idle), each yielding one collated part of each batch for its streams; the main
  process joins the parts in stream order.
- Cost: per global batch a rank decodes G / W samples. Per epoch, all ranks together read every shard once, plus
  one more read of a shard for each stream that takes a run of it from the pool while another stream reads it too:
  at most C - 1 extra reads, none when whole shards fill every quota (equal shards, a shard count divisible by C).
  A rank reads its streams' shards (about 1/W of the data) plus at most one extra shard per stream.
- A bad sample under `on_bad_sample=skip` is replaced by the first good sample after it in its shard's permuted
  order, or, when the whole shard is bad, from the next shard of the epoch order that has one: a pure function of
  the data, so ranks stay equal, positions stay count-based and resume stays exact. Only a split with no good sample
  at all is an error.

State: {epoch, batches (global batches done in this epoch), global_batch, streams, seed, split, skipped}. Positions
are re-derived from the manifest's sample counts, so a resume on any world size, worker count or micro-batch split
(with the same G and C) continues the same global batch sequence with no sample repeated or skipped.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .format import DatasetError, Layout, load_manifest, load_npy, neighbor_tokens
from .shards import DataError, Sample, SampleSpec, read_shard

_MIX = 0x9E3779B97F4A7C15  # seeds of (seed, epoch, shard) kept apart


@dataclass(frozen=True)
class Item:
    """Slots [start, stop) of a shard's samples in their permuted order."""
    shard: int
    start: int
    stop: int


def deal(order: list[int], sizes: list[int], streams: int, quota: int) -> list[list[Item]]:
    """Each stream's items, `quota` samples in all: whole shards first, then runs of a pool of samples.

    Stream s takes shards order[s], order[s + C], ... of the first floor(len(order) / C) C whole, in order, until it
    has `quota` samples; the pool (what those shards hold past their stream's quota, in stream order, then the
    remaining shards in epoch order) is cut into consecutive runs for the streams still short, in stream order. A
    shard is read by a second stream only where a run of the pool comes from a shard its owner reads too or a run
    boundary falls inside a shard: at most C - 1 times in all, since such streams are distinct.
    """
    whole = len(order) // streams * streams
    plan: list[list[Item]] = [[] for _ in range(streams)]
    pool: list[Item] = []
    for s in range(streams):
        need = quota
        for shard in order[s:whole:streams]:
            take = min(sizes[shard], need)
            if take:
                plan[s].append(Item(shard, 0, take))
            if take < sizes[shard]:
                pool.append(Item(shard, take, sizes[shard]))
            need -= take
    pool += [Item(shard, 0, sizes[shard]) for shard in order[whole:]]
    pool.reverse()  # taken from the end
    for items in plan:
        need = quota - sum(it.stop - it.start for it in items)
        while need:
            piece = pool.pop()  # C * quota <= the samples of all shards: the pool holds what the streams lack
            take = min(piece.stop - piece.start, need)
            items.append(Item(piece.shard, piece.start, piece.start + take))
            if piece.start + take < piece.stop:
                pool.append(Item(piece.shard, piece.start + take, piece.stop))
            need -= take
    return plan


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A page-locked host buffer: host-to-device copies with non_blocking=True are asynchronous only from one."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def join(parts: list[torch.Tensor], *, pin: bool) -> torch.Tensor:
    """Concatenate along the batch axis; with `pin`, straight into a page-locked buffer (no second copy)."""
    if not pin:
        return torch.cat(parts)
    out = pinned_empty((sum(len(p) for p in parts), *parts[0].shape[1:]), parts[0].dtype)
    return torch.cat(parts, out=out)


def world_from_env() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    from retro_dist.launch_env import discover
    mapped, _ = discover()
    return int(mapped["RANK"]), int(mapped["WORLD_SIZE"])


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


def default_streams(global_batch: int, world_size: int) -> int:
    """gcd(G, 8): 1, 2, 4 and 8 ranks all fit whenever G is a multiple of 8. When the world size does not divide
    that (e.g. 3 ranks), one stream per rank: the order then holds for this world size only."""
    streams = math.gcd(global_batch, 8)
    return streams if streams % world_size == 0 else world_size


def check_streams(global_batch: int, streams: int, world_size: int, batch_size: int) -> None:
    """One line naming the numbers that work when the world size, streams, global and micro batch do not fit."""
    problems = []
    if global_batch % streams:
        problems.append(f"{streams} canonical streams do not divide the global batch {global_batch}")
    if streams % world_size:
        fits = [w for w in range(1, streams + 1) if streams % w == 0]
        problems.append(f"{world_size} ranks do not divide the {streams} canonical streams (world sizes that "
                        f"work: {', '.join(map(str, fits))})")
    elif global_batch % (world_size * batch_size):
        share = global_batch // world_size
        fits = [b for b in range(1, share + 1) if share % b == 0]
        problems.append(f"micro batch {batch_size} does not divide a rank's {share} samples of the global batch "
                        f"{global_batch} (micro batches that work: {', '.join(map(str, fits))})")
    if problems:
        raise ValueError("data plan: " + "; ".join(problems))


def _ignore_stop_signals(_worker_id: int) -> None:
    """SLURM's --signal, scancel --signal and many schedulers signal every process of a job or a process group:
    a worker must not die of SIGTERM (torch's worker handler exits on it) or SIGUSR1; the main process handles them
    (checkpoint, exit 75) and shuts its workers down itself. Workers still exit when the main process dies (torch's
    watchdog)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class _EpochStream(IterableDataset):
    """What each DataLoader worker (or the main process, with 0 workers) iterates: (t, its streams' part of global
    batch t) for t from `first` to the end of the epoch."""

    def __init__(self, loader: "RetroLoader", epoch: int, first: int):
        self.loader, self.epoch, self.first = loader, epoch, first

    def __iter__(self) -> Iterator[tuple[int, dict[int, dict[str, Any]]]]:
        info = get_worker_info()
        mine, active = self.loader.rank_streams(), self.loader.active_workers()
        worker = 0 if info is None else info.id
        if worker >= active:
            return
        try:
            share = len(mine) // active  # a contiguous run of streams: the parts join by concatenation
            yield from self.loader._pieces(self.epoch, mine[worker * share:(worker + 1) * share], self.first)
        except (DataError, DatasetError) as e:
            if info is None:
                raise
            # DataLoader would re-raise it as "Caught DataError in DataLoader worker process 0. Original Traceback
            # ...": the user's one line (which shard, what is wrong) buried in a worker traceback. Handed over as a
            # value, the main process raises it as it is.
            yield -1, e


class RetroLoader:
    """Iterate one epoch of micro-batches: {'tokens': int64 [b, seq_len + 1], 'retrieved': int64 [b, k, r,
    2 * chunk_size] or None, 'index': int64 [b] sample indices}. `len()` is the number of micro-batches per epoch,
    equal on every rank. `global_batch` (default batch_size x world size) and `streams` (default_streams) fix the
    global order; see the module docstring. `pin_memory` (for runs on CUDA) puts tokens and retrieved in
    page-locked memory, so that `.to(device, non_blocking=True)` overlaps the copy with compute."""

    def __init__(self, dataset: str | Path, split: str, *, batch_size: int, num_workers: int = 0, seed: int = 0,
                 num_neighbors: int | None = None, retrieval: bool = True, on_bad_sample: str = "error",
                 rank: int | None = None, world_size: int | None = None, shard_urls: list[str] | None = None,
                 global_batch: int | None = None, streams: int | None = None, pin_memory: bool = False):
        self.layout = Layout(dataset)
        self.manifest = m = load_manifest(dataset)
        if not m.get("stages", {}).get("shard", {}).get("done"):
            raise DatasetError(f"{dataset} is incomplete (stage 'shard' not done): finish `retro-dist prepare`")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        env_rank, env_world = world_from_env()
        self.rank, self.world_size = (env_rank if rank is None else rank), (env_world if world_size is None else world_size)
        self.split, self.batch_size, self.num_workers, self.seed = split, batch_size, num_workers, seed
        self.retrieval, self.on_bad_sample, self.pin_memory = retrieval, on_bad_sample, pin_memory
        self.num_neighbors = m["num_neighbors"] if num_neighbors is None else num_neighbors
        if not 1 <= self.num_neighbors <= m["num_neighbors"]:
            raise ValueError(f"num_neighbors={self.num_neighbors}: the dataset has {m['num_neighbors']} per chunk")
        self.shards = m["shards"].get(split) or []
        self.urls = shard_urls or [str(self.layout.shards / s["name"]) for s in self.shards]
        if len(self.urls) != len(self.shards):
            raise ValueError(f"{len(self.urls)} shard URLs given for {len(self.shards)} shards of split {split!r}")
        self.total = sum(s["samples"] for s in self.shards)
        self._set_plan(global_batch or batch_size * self.world_size, streams)
        self.spec = SampleSpec.from_manifest(m, m["counts"]["train"]["chunks"])
        self.epoch, self.batches, self.micro, self.skipped = 0, 0, 0, 0
        self._db: np.ndarray | None = None
        self._cache: dict[int, list[Sample | None]] = {}
        self._good_fallback: dict[tuple[int, int], int] = {}

    def _set_plan(self, global_batch: int, streams: int | None) -> None:
        self.global_batch = global_batch
        self.streams = streams or default_streams(global_batch, self.world_size)
        check_streams(global_batch, self.streams, self.world_size, self.batch_size)
        self.accumulation = global_batch // (self.world_size * self.batch_size)
        self.batches_per_epoch = self.total // global_batch  # global batches
        if self.batches_per_epoch == 0:
            raise DatasetError(f"split {self.split!r} of {self.layout.root} has {self.total} samples, fewer than one "
                               f"global batch of {global_batch}")

    # the plan --------------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _MIX]).permutation(len(self.shards))

    def _items(self, epoch: int, stream: int) -> list[Item]:
        sizes = [s["samples"] for s in self.shards]
        quota = self.batches_per_epoch * (self.global_batch // self.streams)
        return deal([int(s) for s in self._order(epoch)], sizes, self.streams, quota)[stream]

    def rank_streams(self) -> list[int]:
        return list(range(self.rank, self.streams, self.world_size))

    def active_workers(self) -> int:
        """The largest worker count <= num_workers that divides this rank's streams: equal pieces per worker keep
        DataLoader's round robin in step with the batches."""
        n = len(self.rank_streams())
        return max(w for w in range(1, max(1, self.num_workers) + 1) if n % w == 0)

    # workers ---------------------------------------------------------------------------------------------------

    def _db_chunks(self) -> np.ndarray:
        if self._db is None:  # opened lazily in each worker: memory maps do not cross process boundaries
            self._db = load_npy(self.layout.chunks("train"))
        return self._db

    def _read(self, shard: int) -> list[Sample | None]:
        """A shard's samples (None for bad ones under skip), the last few kept: each of the rank's streams holds one
        shard at a time, replacements may need one more."""
        if shard not in self._cache:
            if len(self._cache) >= len(self.rank_streams()) + 2:  # one per stream: fewer re-read shards every piece
                self._cache.pop(next(iter(self._cache)))
            meta = self.shards[shard]
            self._cache[shard] = read_shard(self.urls[shard], expected_samples=meta["samples"],
                                            sha256=meta.get("sha256"), spec=self.spec, policy=self.on_bad_sample)
        return self._cache[shard]

    def _permuted(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard, _MIX]).permutation(self.shards[shard]["samples"])

    def _replacement(self, epoch: int, shard: int, slot: int) -> Sample:
        """The good sample that stands in for bad sample `slot` (in permuted order) of `shard`: the next good one in
        the same permuted order, else the first good one of the next shard (epoch order) that has any."""
        samples, order = self._read(shard), self._permuted(epoch, shard)
        for k in range(1, len(order)):
            candidate = samples[order[(slot + k) % len(order)]]
            if candidate is not None:
                return candidate
        key = (epoch, shard)
        if key not in self._good_fallback:
            shards = [int(s) for s in self._order(epoch)]
            start = shards.index(shard)
            for other in shards[start + 1:] + shards[:start]:
                if any(s is not None for s in self._read(other)):
                    self._good_fallback[key] = other
                    break
            else:
                raise DatasetError(f"split {self.split!r}: every sample of every shard is bad")
        other = self._good_fallback[key]
        good = [s for s in (self._read(other)[i] for i in self._permuted(epoch, other)) if s is not None]
        return good[slot % len(good)]

    def _stream_samples(self, epoch: int, stream: int, start: int) -> Iterator[tuple[Sample, bool]]:
        """Stream `stream` of the epoch from its sample `start` on: (sample, replaced)."""
        for item in self._items(epoch, stream):
            if start >= item.stop - item.start:  # before the position: skipped unread
                start -= item.stop - item.start
                continue
            samples, order = self._read(item.shard), self._permuted(epoch, item.shard)
            for slot in range(item.start + start, item.stop):
                sample = samples[order[slot]]
                yield (sample, False) if sample is not None else (self._replacement(epoch, item.shard, slot), True)
            start = 0

    def _pieces(self, epoch: int, streams: list[int], first: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(t, one collated batch of these streams' pieces of global batch t, in stream order) for t from `first`."""
        q = self.global_batch // self.streams
        sources = {s: self._stream_samples(epoch, s, first * q) for s in streams}
        positions = torch.cat([torch.arange(s * q, (s + 1) * q) for s in streams])  # places in the global batch
        for t in range(first, self.batches_per_epoch):
            # one collated item per global batch for all of this worker's streams: every tensor crossing from a
            # worker costs a shared-memory segment, and a piece per stream (q may be 1 sample) cost 2-4x the
            # loader's throughput with workers
            taken = [next(sources[s]) for s in streams for _ in range(q)]
            part = self._collate([x for x, _ in taken], sum(r for _, r in taken))
            part["position"] = positions
            yield t, part

    def _collate(self, batch: list[Sample], skipped: int) -> dict[str, Any]:
        tokens = torch.from_numpy(np.stack([t for _, t, _ in batch]))
        retrieved = None
        if self.retrieval:
            ids = np.stack([n[:, : self.num_neighbors] for _, _, n in batch])
            # int64 by numpy: torch's int32 -> int64 copy goes through its thread pool, ms when a core is busy
            retrieved = torch.from_numpy(neighbor_tokens(self._db_chunks(), ids, pad_id=self.manifest["pad_id"])
                                         .astype(np.int64))
        return {"tokens": tokens, "retrieved": retrieved, "index": torch.tensor([i for i, _, _ in batch]),
                "skipped": skipped}

    # iteration and state ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.batches_per_epoch * self.accumulation

    def _rank_batches(self) -> Iterator[dict[str, Any]]:
        """This rank's share of each remaining global batch of the epoch: its workers' parts in stream order."""
        stream = _EpochStream(self, self.epoch, self.batches)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=_ignore_stop_signals,
                            prefetch_factor=4 if self.num_workers else None)
        active, pending = self.active_workers(), {}
        for t, part in loader:
            if isinstance(part, Exception):
                raise part
            pending.setdefault(t, []).append(part)
            if len(pending[t]) == active:
                parts = sorted(pending.pop(t), key=lambda p: int(p["position"][0]))
                self.skipped += sum(p["skipped"] for p in parts)
                # what goes to the device is pinned; index and position are bookkeeping that stays on the host
                pin = {"tokens": self.pin_memory, "retrieved": self.pin_memory, "index": False, "position": False}
                yield {key: None if parts[0][key] is None else join([p[key] for p in parts], pin=pin[key])
                       for key in pin}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The remaining micro-batches of the current epoch; afterwards the loader stands at the next epoch."""
        b = self.batch_size
        for share in self._rank_batches():
            for k in range(self.micro, self.accumulation):
                self.micro = (k + 1) % self.accumulation
                if self.micro == 0:
                    self.batches += 1
                yield {key: None if v is None else v[k * b:(k + 1) * b] for key, v in share.items()}
        if self.batches >= self.batches_per_epoch:
            self.epoch, self.batches, self.micro = self.epoch + 1, 0, 0

    def forever(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        """Plain data, the same on every rank (it names no rank): checkpoints are taken between optimizer steps."""
        if self.micro:
            raise RuntimeError(f"loader state asked for in the middle of global batch {self.batches} "
                               f"(micro-batch {self.micro} of {self.accumulation}): save between optimizer steps")
        return {"epoch": self.epoch, "batches": self.batches, "global_batch": self.global_batch,
                "streams": self.streams, "seed": self.seed, "split": self.split, "skipped": self.skipped,
                "samples": (self.epoch * self.batches_per_epoch + self.batches) * self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["split"] != self.split:
            raise ValueError(f"loader state is for split {state['split']!r} seed {state['seed']}, this loader "
                             f"reads split {self.split!r} with seed {self.seed}")
        if "streams" not in state:
            raise ValueError("loader state from before canonical streams (no 'streams'): it cannot be continued "
                             "exactly; start a new run directory")
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"the run was started with global batch {state['global_batch']}, this one has "
                             f"{self.global_batch}: keep train.global_batch={state['global_batch']} to resume")
        self._set_plan(state["global_batch"], state["streams"])
        self.epoch, self.batches, self.micro, self.skipped = state["epoch"], state["batches"], 0, state["skipped"]
