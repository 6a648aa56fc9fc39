"""The dataset directory (format version 1): paths, manifest, atomic writers. The one module that knows the layout.

DATASET/
  manifest.json                format, tokenizer facts, counts, per-stage done flag + fingerprint + wall time
  tokenizer.json               the LM tokenizer (Hugging Face tokenizers format)
  db/chunks.npy                int32 [num_db_chunks, chunk_size]: the train split's token stream cut into chunks
  db/chunk_docs.npy            int64 [num_db_chunks, 2]: document id of each chunk's first and last token
  db/embeddings.npy            float16 [num_db_chunks, dim]
  db/index.faiss               faiss index over db/embeddings.npy
  {split}/chunks.npy           (val only; train's are db/chunks.npy) the same, for a split outside the database
  {split}/chunk_docs.npy       (val only)
  {split}/embeddings.npy       (val only) query embeddings
  {split}/neighbors.npy        int32 [num_chunks_of_split, num_neighbors]: ids into db/chunks.npy, -1 = none
  shards/{split}-{NNNNNN}.tar  webdataset shards: tokens.npy int32 [seq_len + 1], neighbors.npy int32 [k, r]
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from retro_dist.atomic import atomic_path  # re-exported: the dataset writers and their callers use it

FORMAT_NAME = "retro_dist.dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DB_SPLIT = "train"  # the retrieval database is the train split's stream
STAGES = ("tokenize", "embed", "index", "neighbors", "shard")


class DatasetError(ValueError):
    """A dataset directory that is missing, incomplete or of another format: one line saying what and how to fix."""


class Layout:
    """Paths inside one dataset directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    manifest = property(lambda self: self.root / "manifest.json")
    tokenizer = property(lambda self: self.root / "tokenizer.json")
    db = property(lambda self: self.root / "db")
    index = property(lambda self: self.db / "index.faiss")
    shards = property(lambda self: self.root / "shards")

    def split_dir(self, split: str) -> Path:
        return self.db if split == DB_SPLIT else self.root / split

    def chunks(self, split: str) -> Path:
        return self.split_dir(split) / "chunks.npy"

    def chunk_docs(self, split: str) -> Path:
        return self.split_dir(split) / "chunk_docs.npy"

    def embeddings(self, split: str) -> Path:
        return self.split_dir(split) / "embeddings.npy"

    def neighbors(self, split: str) -> Path:
        return self.root / split / "neighbors.npy"

    @staticmethod
    def shard_name(split: str, number: int) -> str:
        return f"{split}-{number:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:09d}"


# manifest ---------------------------------------------------------------------------------------------------------

def new_manifest() -> dict[str, Any]:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "stages": {}}


def load_manifest(root: str | Path, *, required: bool = True) -> dict[str, Any]:
    path = Layout(root).manifest
    if not path.is_file():
        if required:
            raise DatasetError(f"{root} is not a retro_dist dataset (no manifest.json): build it with "
                               f"`retro-dist prepare --input TEXT... --out {root}`")
        return new_manifest()
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); remove it and re-run `retro-dist prepare`") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                           f"retro_dist reads {FORMAT_NAME!r} version {FORMAT_VERSION}: rebuild the dataset with "
                           f"`retro-dist prepare` into a new directory")
    return manifest


def save_manifest(root: str | Path, manifest: dict[str, Any]) -> None:
    path = Layout(root).manifest
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def stage_done(manifest: dict[str, Any], stage: str) -> bool:
    return bool(manifest.get("stages", {}).get(stage, {}).get("done"))


def require_stage(manifest: dict[str, Any], stage: str, *, root: str | Path, needed_by: str) -> None:
    if not stage_done(manifest, stage):
        raise DatasetError(f"stage {needed_by!r} needs stage {stage!r} first, and {root} has not finished it: "
                           f"run `retro-dist prepare --stage {stage} --out {root}` (or the whole pipeline)")


# fingerprints and atomic writes ----------------------------------------------------------------------------------

def fingerprint(*parts: Any) -> str:
    """A stable digest of JSON-able parts (parameters, upstream fingerprints, input file stats)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def file_sha256(path: str | Path, *, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def npy_header(shape: tuple[int, ...], dtype: np.dtype | str) -> bytes:
    """The .npy header (format 2.0) of every array this module writes, whole or in place."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def create_npy(path: str | Path, shape: tuple[int, ...], dtype: np.dtype | str) -> int:
    """A full-size .npy file whose rows are not written yet (a sparse file), created atomically; returns the byte
    offset of its data, for ranks to fill it in place with pwrite_all."""
    header = npy_header(shape, dtype)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            f.truncate(len(header) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return len(header)


def pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
    """Write `array`'s bytes at `offset` of an open file, 64 MB per call, until every byte is out (a write may be
    short); plain writes, not a memory map, so a full disk raises OSError(ENOSPC) instead of SIGBUS."""
    view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + (1 << 26)], offset + done)


class NpyAppender:
    """Writes a .npy file row block by row block with plain file writes.

    Not a memory map: on a full disk a write raises OSError(ENOSPC) instead of killing the process with SIGBUS.
    """

    def __init__(self, file, shape: tuple[int, ...], dtype: np.dtype | str):
        self.file, self.shape, self.dtype, self.rows = file, tuple(shape), np.dtype(dtype), 0
        file.write(npy_header(self.shape, self.dtype))

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"rows of shape {rows.shape} do not fit an array of shape {self.shape} at row {self.rows}")
        view = memoryview(rows.reshape(-1).view(np.uint8))
        for start in range(0, len(view), 1 << 26):  # 64 MB per write
            self.file.write(view[start:start + (1 << 26)])
        self.rows += len(rows)


@contextlib.contextmanager
def npy_writer(path: str | Path, shape: tuple[int, ...], dtype: np.dtype | str) -> Iterator[NpyAppender]:
    """A new .npy file filled by appending rows, renamed into place only when complete and without error."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            out = NpyAppender(f, shape, dtype)
            yield out
            if out.rows != shape[0]:
                raise ValueError(f"{path}: {out.rows} rows written, {shape[0]} expected")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with npy_writer(path, array.shape, array.dtype) as out:
        out.append(array)


def load_npy(path: str | Path, *, mmap: bool = True) -> np.ndarray:
    if not Path(path).is_file():
        raise DatasetError(f"{path} is missing: the dataset is incomplete; re-run `retro-dist prepare`")
    return np.load(path, mmap_mode="r" if mmap else None)


# neighbors -> tokens -------------------------------------------------------------------------------------------

def neighbor_tokens(db_chunks: np.ndarray, ids: np.ndarray, *, pad_id: int) -> np.ndarray:
    """Neighbor ids [..., r] -> tokens [..., r, 2 * chunk_size]: each neighbor chunk followed by its continuation
    (the next database chunk; pad past the last one); id -1 gives all pad."""
    num_chunks, chunk_size = db_chunks.shape
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.max() >= num_chunks or ids.min() < -1):
        bad = ids[(ids >= num_chunks) | (ids < -1)].flat[0]
        raise DatasetError(f"neighbor id {bad} is outside the database of {num_chunks} chunks")
    out = np.full(ids.shape + (2 * chunk_size,), pad_id, dtype=np.int32)
    flat_ids, flat_out = ids.reshape(-1), out.reshape(-1, 2 * chunk_size)
    has = flat_ids >= 0
    flat_out[has, :chunk_size] = db_chunks[flat_ids[has]]
    has_next = has & (flat_ids + 1 < num_chunks)
    flat_out[has_next, chunk_size:] = db_chunks[flat_ids[has_next] + 1]
    return out
