"""Tokenize's global pass: token parts of blocks -> one split's chunks.npy and chunk_docs.npy, written in place.

Each block left one part per split (its documents' tokens and lengths). A segment is a run of one part's documents
placed in an output split; from the parts' document counts every segment gets its first token offset and first
document id, rank 0 allocates the outputs at full size, and every rank writes its own blocks' segments there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from retro_dist.data.format import create_npy, load_npy, pwrite_all

SPLITS = ("train", "val")


class Segment:
    """Documents [lo, hi) of part (block, source split), placed in an output split at token `start`, doc id `base`."""

    def __init__(self, parts: Path, block: int, source: str, lo: int, hi: int):
        self.parts, self.block, self.source, self.lo, self.hi = parts, block, source, lo, hi
        self.start = self.base = 0

    def _lengths(self) -> np.ndarray:
        return load_npy(self.parts / f"{self.block:06d}.{self.source}.lengths.npy", mmap=False)

    def ends(self) -> np.ndarray:
        """Exclusive end offset of each document, relative to the segment's first token; read when asked, not kept
        (every segment's ends held for the whole run would grow with the corpus: 8 bytes per document)."""
        return np.cumsum(self._lengths()[self.lo:self.hi])

    def token_range(self) -> tuple[int, int]:
        """[first, last) token of this segment inside its part's token array."""
        first = int(self._lengths()[:self.lo].sum()) if self.lo else 0
        return first, first + self.tokens

    @property
    def tokens(self) -> int:
        return int(self._lengths()[self.lo:self.hi].sum())


def place_segments(stats: list[dict[str, Any]], parts: Path, val_fraction: float) -> dict[str, list[Segment]]:
    """Each split's segments in stream order, with token offsets and first document ids.

    A corpus too small to give any validation document by hash gives its last train document to validation.
    """
    segments = {split: [Segment(parts, b, split, 0, s[split]["documents"]) for b, s in enumerate(stats)
                        if s[split]["documents"]] for split in SPLITS}
    train_docs = sum(s["train"]["documents"] for s in stats)
    if val_fraction > 0 and not segments["val"] and train_docs > 1:
        last = segments["train"][-1]
        segments["val"] = [Segment(parts, last.block, "train", last.hi - 1, last.hi)]
        last.hi -= 1
        if last.hi == last.lo:
            segments["train"].pop()
    for segs in segments.values():
        start = base = 0
        for seg in segs:
            seg.start, seg.base = start, base
            start += seg.tokens
            base += seg.hi - seg.lo
    return segments


def split_counts(segments: list[Segment], c) -> dict[str, int]:
    tokens = sum(s.tokens for s in segments)
    return {"documents": sum(s.hi - s.lo for s in segments), "tokens": tokens,
            "chunks": -(-tokens // c.chunk_size), "samples": max(0, (tokens - 1) // c.seq_len)}


def allocate(paths: tuple[Path, Path], tokens: int, chunk_size: int, pad_id: int) -> tuple[int, int]:
    """Rank 0: create the chunks / chunk_docs .npy files at full size (the last chunk's tail already pad).
    Returns the byte offset of each one's data."""
    num_chunks = -(-tokens // chunk_size)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    offsets = (create_npy(paths[0], (num_chunks, chunk_size), "int32"), create_npy(paths[1], (num_chunks, 2), "int64"))
    if num_chunks * chunk_size > tokens:
        fd = os.open(paths[0], os.O_WRONLY)
        try:
            pwrite_all(fd, np.full(num_chunks * chunk_size - tokens, pad_id, np.int32), offsets[0] + 4 * tokens)
        finally:
            os.close(fd)
    return offsets


def write_split(segments: list[Segment], owned: set[int], parts: Path, paths: tuple[Path, Path],
                 offsets: tuple[int, int], total: int, chunk_size: int) -> None:
    """Write this rank's segments: their tokens, and the rows of chunk_docs for chunks that start in them.

    chunk_docs[c] = (document of token c * chunk_size, document of token min((c + 1) * chunk_size, total) - 1); a
    chunk's last token may lie in a later segment, whose document lengths are read from its part.
    """
    if not any(seg.block in owned for seg in segments):
        return
    starts = np.array([seg.start for seg in segments], dtype=np.int64)
    fds = [os.open(path, os.O_WRONLY) for path in paths]
    try:
        for i, seg in enumerate(segments):
            if seg.block not in owned:
                continue
            first, last = seg.token_range()
            tokens = load_npy(parts / f"{seg.block:06d}.{seg.source}.tokens.npy")
            pwrite_all(fds[0], tokens[first:last], offsets[0] + 4 * seg.start)
            end = seg.start + seg.tokens
            rows = np.arange(-(-seg.start // chunk_size), -(-end // chunk_size), dtype=np.int64)
            if not len(rows):
                continue
            docs = np.empty((len(rows), 2), np.int64)
            docs[:, 0] = seg.base + np.searchsorted(seg.ends(), rows * chunk_size - seg.start, side="right")
            lasts = np.minimum((rows + 1) * chunk_size, total) - 1
            owner = np.searchsorted(starts, lasts, side="right") - 1  # the segment holding each chunk's last token
            for j in np.unique(owner):
                other, where = segments[j], owner == j
                docs[where, 1] = other.base + np.searchsorted(other.ends(), lasts[where] - other.start, side="right")
            pwrite_all(fds[1], docs, offsets[1] + 16 * int(rows[0]))
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
