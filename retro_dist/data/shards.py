"""Reading one shard: bytes through webdataset (local path or any URL it opens, `pipe:` included), checked against
the manifest's sha256, split into samples, each validated against the dataset's shapes and ranges.

Tar has no payload checksum: a flipped byte inside a member reads back silently. The manifest records each shard's
sha256 and the loader holds whole shards in memory anyway (to shuffle them), so checking costs one hash per shard.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator


class DataError(ValueError):
    """Bad data under the `error` policy: names the shard and the sample."""


@dataclass(frozen=True)
class SampleSpec:
    seq_len: int
    chunk_size: int
    num_neighbors: int
    vocab_size: int
    num_db_chunks: int

    @classmethod
    def from_manifest(cls, manifest: dict, num_db_chunks: int) -> "SampleSpec":
        return cls(manifest["seq_len"], manifest["chunk_size"], manifest["num_neighbors"], manifest["vocab_size"],
                   num_db_chunks)


Sample = tuple[int, np.ndarray, np.ndarray]  # (sample index from its key, tokens int64, neighbor ids int64)


def _check(sample: dict, spec: SampleSpec) -> Sample:
    """Decoded (index, tokens, neighbors), or ValueError saying what is wrong with the sample."""
    try:
        index = int(sample["__key__"].rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"key {sample['__key__']!r} is not SPLIT-NNNNNNNNN") from None
    for key in ("tokens.npy", "neighbors.npy"):
        if key not in sample:
            raise ValueError(f"missing {key} (has {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        neighbors = np.load(io.BytesIO(sample["neighbors.npy"]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"undecodable .npy ({e})") from None
    if tokens.shape != (spec.seq_len + 1,) or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens {tokens.dtype}{list(tokens.shape)}, expected int32[{spec.seq_len + 1}]")
    k = spec.seq_len // spec.chunk_size
    if neighbors.shape != (k, spec.num_neighbors) or neighbors.dtype.kind not in "iu":
        raise ValueError(f"neighbors {neighbors.dtype}{list(neighbors.shape)}, expected int32[{k}, {spec.num_neighbors}]")
    if tokens.min() < 0 or tokens.max() >= spec.vocab_size:
        raise ValueError(f"token id {int(tokens.max() if tokens.max() >= spec.vocab_size else tokens.min())} "
                         f"outside [0, {spec.vocab_size})")
    if neighbors.min() < -1 or neighbors.max() >= spec.num_db_chunks:
        bad = int(neighbors.max() if neighbors.max() >= spec.num_db_chunks else neighbors.min())
        raise ValueError(f"neighbor id {bad} outside [-1, {spec.num_db_chunks})")
    return index, tokens.astype(np.int64), neighbors.astype(np.int64)


def read_shard(url: str, *, expected_samples: int, sha256: str | None, spec: SampleSpec, policy: str
               ) -> list[Sample | None]:
    """All samples of a shard in stored order; a bad one is None under `skip`.

    Under `skip`, a shard that fails its checksum or cannot be read gives `expected_samples` Nones, so positions
    (and therefore resume) do not move.
    """
    def bad(what: str, key: str | None = None) -> None:
        message = f"shard {url}" + (f", sample {key}" if key else "") + f": {what}"
        if policy == "error":
            raise DataError(message + " (use --data.on_bad_sample=skip to skip bad samples)")
        warnings.warn("skipping bad data: " + message, stacklevel=3)

    try:
        with gopen(url, "rb") as stream:
            data = stream.read()
    except Exception as e:  # noqa: BLE001 - any opener failure (missing file, failed pipe) is a bad shard
        bad(f"cannot be read ({e})")
        return [None] * expected_samples
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        bad("sha256 differs from the manifest's (corrupt or replaced shard)")
        return [None] * expected_samples
    samples: list[Sample | None] = []
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(io.BytesIO(data), handler=_reraise))
        for sample in group_by_keys(files, handler=_reraise):
            try:
                samples.append(_check(sample, spec))
            except ValueError as e:
                bad(str(e), sample.get("__key__"))
                samples.append(None)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile.ReadError and friends: a truncated or corrupt tar
        bad(f"unreadable tar after {len(samples)} samples ({type(e).__name__}: {e})")
    if len(samples) != expected_samples:
        if len(samples) > expected_samples or policy == "error":
            bad(f"holds {len(samples)} samples, the manifest says {expected_samples}")
        samples = (samples + [None] * expected_samples)[:expected_samples]
    return samples


def _reraise(exn: Exception) -> bool:
    raise exn
