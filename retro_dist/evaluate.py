"""Evaluation: token-weighted loss and perplexity with true neighbors, random neighbors and retrieval off, and the
loss by neighbor-overlap bucket. One function for training's validation and `retro-dist eval`.

Why three modes: a model that ignores what it retrieves still gains over retrieval off (the cross-attention path
adds capacity), so the gain that says the model *reads* its neighbors is true against random neighbors. Random
neighbors are database chunks drawn uniformly, seeded by (seed, sample index), so every layout of ranks and batches
draws the same ones; `-1` (no neighbor) stays `-1`.

Overlap (the RETRO paper's leakage measure, section 4.4): the tokens predicted with the help of chunk i's neighbors
are the labels of its cross-attention window, i.e. chunk i + 1 of the sample. A chunk's overlap is the length of the
longest token run it shares with any of chunk i's neighbors (chunk + continuation), over its length. Chunks are
bucketed by it; a gain that survives with the high-overlap chunks removed is not copying of near-duplicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from retro_dist.data.format import DatasetError, Layout, load_manifest, load_npy, neighbor_tokens
from retro_dist.data.shards import SampleSpec, read_shard

MODES = ("true", "random", "off")
# bucket edges of the overlap fraction: (lo, hi], the first bucket [0, 1/8]
BUCKET_EDGES = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)
HIGH_OVERLAP = 0.5  # the gain "with high-overlap chunks removed" keeps chunks of overlap <= this
_RANDOM_SEED_MIX = 0x5EED_4E16  # keeps random-neighbor draws apart from the loader's shuffles


def gain(loss: float, baseline: float) -> float:
    """How much lower perplexity is than the baseline's: 1 - ppl / ppl_baseline = 1 - exp(loss - baseline)."""
    return 1.0 - math.exp(loss - baseline)


def random_neighbor_ids(ids: np.ndarray, sample_index: int, *, num_db_chunks: int, seed: int) -> np.ndarray:
    """Neighbor ids of one sample replaced by uniform database ids, seeded by (seed, sample); -1 stays -1."""
    draw = np.random.default_rng([seed, sample_index, _RANDOM_SEED_MIX]).integers(0, num_db_chunks, ids.shape)
    return np.where(ids < 0, ids, draw)


def longest_common_run(a: np.ndarray, b: np.ndarray, *, pad_id: int) -> np.ndarray:
    """a [N, n], b [N, r, m] token ids -> [N]: the longest run of consecutive tokens of a[i] that also occurs
    consecutively in one of b[i]'s rows. Pad tokens never match."""
    eq = (a[:, None, :, None] == b[:, :, None, :]) & (a != pad_id)[:, None, :, None]  # [N, r, n, m]
    run = np.zeros(eq.shape[:2] + (eq.shape[3],), dtype=np.int32)
    best = np.zeros(eq.shape[0], dtype=np.int32)
    for i in range(eq.shape[2]):  # run[j] = length of the common run ending at a[i], b[j]
        shifted = np.zeros_like(run)
        shifted[..., 1:] = run[..., :-1]
        run = np.where(eq[:, :, i], shifted + 1, 0)
        best = np.maximum(best, run.max(axis=(1, 2)))
    return best


@dataclass
class _Batch:
    index: np.ndarray  # [b] sample indices
    tokens: np.ndarray  # [b, seq_len + 1]
    ids: np.ndarray  # [b, k, r] neighbor ids
    weight: float  # 0 for a filler batch that keeps ranks in step


class Evaluator:
    """The samples of one split (all of them, or the first `max_samples`), dealt to ranks sample by sample
    (rank r takes samples r, r + W, ...), so the figures do not depend on the world size or the batch size."""

    def __init__(self, dataset: str, split: str = "val", *, batch_size: int = 4, max_samples: int = 0,
                 num_neighbors: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 on_bad_sample: str = "error"):
        self.layout, self.manifest = Layout(dataset), load_manifest(dataset)
        m = self.manifest
        if not m.get("stages", {}).get("shard", {}).get("done"):
            raise DatasetError(f"{dataset} is incomplete (stage 'shard' not done): finish `retro-dist prepare`")
        shards = m["shards"].get(split) or []
        if not shards:
            raise DatasetError(f"{dataset} has no samples in split {split!r} (splits: {sorted(m['shards'])})")
        self.num_neighbors = m["num_neighbors"] if num_neighbors is None else num_neighbors
        if not 1 <= self.num_neighbors <= m["num_neighbors"]:
            raise ValueError(f"num_neighbors={self.num_neighbors}: the dataset has {m['num_neighbors']} per chunk")
        self.pad_id, self.chunk_size, self.seed = m["pad_id"], m["chunk_size"], seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.db = load_npy(self.layout.chunks("train"))
        spec = SampleSpec.from_manifest(m, len(self.db))
        total = sum(s["samples"] for s in shards)
        self.num_samples = min(total, max_samples) if max_samples else total
        mine = []  # this rank's samples, read once and kept: a validation set is small
        seen = 0
        for shard in shards:
            if seen >= self.num_samples:
                break
            for sample in read_shard(str(self.layout.shards / shard["name"]), expected_samples=shard["samples"],
                                     sha256=shard.get("sha256"), spec=spec, policy=on_bad_sample):
                if sample is not None and seen < self.num_samples and seen % world_size == rank:
                    mine.append(sample)
                seen += 1
        self.samples = mine
        # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)
        per_rank = -(-self.num_samples // world_size)
        self.num_batches = -(-per_rank // batch_size)
        self._overlaps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def batches(self) -> Iterator[_Batch]:
        for start in range(0, self.num_batches * self.batch_size, self.batch_size):
            chosen = self.samples[start:start + self.batch_size]
            weight = 1.0
            if not chosen:  # a filler batch: this rank ran out of samples, the others have not
                chosen, weight = self.samples[:1] or [None], 0.0
                if chosen[0] is None:
                    raise DatasetError("a rank has no evaluation samples: evaluate on fewer ranks")
            yield _Batch(np.array([s[0] for s in chosen]), np.stack([s[1] for s in chosen]),
                         np.stack([s[2][:, : self.num_neighbors] for s in chosen]), weight)

    def retrieved(self, batch: _Batch, mode: str) -> torch.Tensor | None:
        if mode == "off":
            return None
        ids = batch.ids
        if mode == "random":
            ids = np.stack([random_neighbor_ids(row, int(i), num_db_chunks=len(self.db), seed=self.seed)
                            for row, i in zip(ids, batch.index)])
        return torch.from_numpy(neighbor_tokens(self.db, ids, pad_id=self.pad_id)).long()

    def overlaps(self, batch: _Batch) -> tuple[np.ndarray, np.ndarray]:
        """Per [b, k] window: overlap fraction of the chunk it predicts with its true neighbors, and that chunk's
        label count (the last window of a sample predicts one token: its label token)."""
        cs, (b, k, r) = self.chunk_size, batch.ids.shape
        padded = np.full((b, (k + 1) * cs), self.pad_id, dtype=np.int64)
        padded[:, : batch.tokens.shape[1] - cs] = batch.tokens[:, cs:]
        targets = padded[:, : k * cs].reshape(b * k, cs)  # window i predicts tokens[(i+1)cs : (i+2)cs]
        neighbors = neighbor_tokens(self.db, batch.ids, pad_id=self.pad_id).reshape(b * k, r, -1)
        lengths = (targets != self.pad_id).sum(axis=1)
        run = longest_common_run(targets, neighbors, pad_id=self.pad_id)
        return (run / np.maximum(lengths, 1)).reshape(b, k), lengths.reshape(b, k)

    @torch.no_grad()
    def run(self, model: Callable[..., torch.Tensor], *, device: torch.device | str = "cpu",
            modes: tuple[str, ...] = MODES, all_reduce: Callable[[torch.Tensor], None] | None = None
            ) -> dict[str, Any]:
        """Evaluate `model(seq, retrieved) -> logits` (a RETRO, or a DeepSpeed engine wrapping one: call it on every
        rank, with `all_reduce` summing a float64 tensor across ranks in place)."""
        cs, nb = self.chunk_size, len(BUCKET_EDGES) - 1
        sums = {mode: 0.0 for mode in modes}
        bucket_loss = {mode: np.zeros(nb) for mode in modes}
        bucket_tokens, bucket_chunks, tokens_total = np.zeros(nb), np.zeros(nb), 0.0
        for j, batch in enumerate(self.batches()):
            tokens = torch.from_numpy(batch.tokens).to(device)
            labels = tokens[:, 1:]
            valid = labels != self.pad_id
            if j not in self._overlaps:  # a function of the fixed samples: computed at the first run, kept
                self._overlaps[j] = self.overlaps(batch)
            overlap, lengths = self._overlaps[j]
            bucket = np.clip(np.searchsorted(BUCKET_EDGES, overlap, side="left") - 1, 0, nb - 1)
            k = overlap.shape[1]
            for mode in modes:
                retrieved = self.retrieved(batch, mode)
                logits = model(tokens[:, :-1], retrieved.to(device) if retrieved is not None else None)
                losses = torch.stack([F.cross_entropy(row.float(), lab, reduction="none")
                                      for row, lab in zip(logits, labels)]) * valid  # [b, L]
                sums[mode] += float(losses.sum()) * batch.weight
                # window i: label positions (i+1)cs - 1 ... (i+2)cs - 2 of the loss row
                per_window = F.pad(losses, (0, (k + 1) * cs - losses.shape[1]))[:, cs - 1: cs - 1 + k * cs]
                per_window = per_window.reshape(len(losses), k, cs).sum(-1).double().cpu().numpy()
                np.add.at(bucket_loss[mode], bucket, per_window * batch.weight)
            tokens_total += float(valid.sum()) * batch.weight
            np.add.at(bucket_tokens, bucket, lengths * batch.weight)
            np.add.at(bucket_chunks, bucket, (lengths > 0) * batch.weight)
        totals = Totals(tokens_total, sums, bucket_tokens, bucket_chunks, bucket_loss)
        if all_reduce is not None:
            totals = totals.all_reduced(all_reduce, torch.device(device))
        return summarize(totals)


@dataclass(frozen=True)
class Totals:
    """One rank's (or, summed, every rank's) token-weighted sums: what an evaluation reduces across ranks."""

    tokens: float
    loss: dict[str, float]  # summed token loss per mode
    bucket_tokens: np.ndarray  # [buckets]
    bucket_chunks: np.ndarray  # [buckets]
    bucket_loss: dict[str, np.ndarray]  # mode -> [buckets]

    def flat(self) -> np.ndarray:
        modes = list(self.loss)
        return np.concatenate([[self.tokens], [self.loss[m] for m in modes], self.bucket_tokens, self.bucket_chunks,
                               *[self.bucket_loss[m] for m in modes]]).astype(np.float64)

    @classmethod
    def from_flat(cls, flat: np.ndarray, modes: tuple[str, ...], buckets: int) -> "Totals":
        nm, nb = len(modes), buckets
        rest = flat[1 + nm:]
        return cls(float(flat[0]), {m: float(v) for m, v in zip(modes, flat[1:1 + nm])}, rest[:nb], rest[nb:2 * nb],
                   {m: rest[(2 + i) * nb:(3 + i) * nb] for i, m in enumerate(modes)})

    def all_reduced(self, all_reduce: Callable[[torch.Tensor], None], device: torch.device) -> "Totals":
        """Summed over ranks in one collective, on the rank's device (NCCL takes no host tensor)."""
        t = torch.from_numpy(self.flat()).to(device=device, copy=True)
        all_reduce(t)
        return Totals.from_flat(t.cpu().numpy(), tuple(self.loss), len(self.bucket_tokens))


def summarize(t: Totals) -> dict[str, Any]:
    modes, nb = tuple(t.loss), len(t.bucket_tokens)
    tokens, totals, bucket_tokens, bucket_chunks, bucket_loss = (t.tokens, t.loss, t.bucket_tokens, t.bucket_chunks,
                                                                 t.bucket_loss)
    if tokens == 0:
        raise DatasetError("nothing to evaluate: every label is padding")
    loss = {m: totals[m] / tokens for m in modes}
    out: dict[str, Any] = {"tokens": int(tokens), "loss": loss,
                           "ppl": {m: math.exp(min(v, 50.0)) for m, v in loss.items()}}
    if "true" in modes and "random" in modes:
        out["gain_vs_random"] = gain(loss["true"], loss["random"])
    if "true" in modes and "off" in modes:
        out["gain_vs_off"] = gain(loss["true"], loss["off"])
    buckets = []
    for i in range(nb):
        lo, hi = BUCKET_EDGES[i], BUCKET_EDGES[i + 1]
        entry: dict[str, Any] = {"overlap": f"{'[' if i == 0 else '('}{lo:.3g}, {hi:.3g}]",
                                 "chunks": int(bucket_chunks[i]), "tokens": int(bucket_tokens[i])}
        if bucket_tokens[i]:
            entry["loss"] = {m: bucket_loss[m][i] / bucket_tokens[i] for m in modes}
        buckets.append(entry)
    out["overlap_buckets"] = buckets
    low = [i for i in range(nb) if BUCKET_EDGES[i + 1] <= HIGH_OVERLAP]
    low_tokens = sum(bucket_tokens[i] for i in low)
    if low_tokens and "true" in modes and "random" in modes:
        low_loss = {m: sum(bucket_loss[m][i] for i in low) / low_tokens for m in ("true", "random")}
        out["low_overlap"] = {"max_overlap": HIGH_OVERLAP, "tokens": int(low_tokens), "loss": low_loss,
                              "gain_vs_random": gain(low_loss["true"], low_loss["random"])}
    return out


def format_report(r: dict[str, Any]) -> str:
    """The three-way table and the overlap buckets, as `retro-dist eval` and the demo print them."""
    names = {"true": "true neighbors", "random": "random neighbors", "off": "retrieval off"}
    lines = [f"{'split (' + format(r['tokens'], ',') + ' tokens)':28s} {'loss':>8s} {'perplexity':>11s}"]
    for mode, loss in r["loss"].items():
        lines.append(f"  {names[mode]:26s} {loss:8.4f} {r['ppl'][mode]:11.2f}")
    if "gain_vs_random" in r:
        lines.append(f"true neighbors lower perplexity by {100 * r['gain_vs_random']:.1f}% against random neighbors"
                     + (f" ({100 * r['gain_vs_off']:.1f}% against retrieval off)" if "gain_vs_off" in r else ""))
    lines.append("loss by overlap of the predicted chunk with its neighbors (longest common token run / chunk):")
    for b in r["overlap_buckets"]:
        if "loss" in b:
            detail = "  ".join(f"{m} {v:.4f}" for m, v in b["loss"].items())
            lines.append(f"  {b['overlap']:14s} {b['chunks']:7d} chunks  {detail}")
        else:
            lines.append(f"  {b['overlap']:14s} {b['chunks']:7d} chunks")
    if "low_overlap" in r:
        lo = r["low_overlap"]
        lines.append(f"with chunks of overlap > {lo['max_overlap']:.0%} removed: true {lo['loss']['true']:.4f}, "
                     f"random {lo['loss']['random']:.4f}, gain {100 * lo['gain_vs_random']:.1f}%")
    return "\n".join(lines)


def evaluate_model(model_dir: str, dataset: str, *, split: str = "val", batch_size: int = 4, max_samples: int = 0,
                   num_neighbors: int | None = None, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """`retro-dist eval`: an exported model over a split, on this process and `device` (fp32 weights)."""
    from retro_dist.compat import check_model_fits_dataset
    from retro_dist.pretrained import load_model

    model = load_model(model_dir).float().eval()  # RETRO or a retrofit
    check_model_fits_dataset(model_dir, model.config, dataset, load_manifest(dataset))
    evaluator = Evaluator(dataset, split, batch_size=batch_size, max_samples=max_samples,
                          num_neighbors=num_neighbors, seed=seed)
    return evaluator.run(model.to(device), device=device) | {"split": split, "samples": evaluator.num_samples}
