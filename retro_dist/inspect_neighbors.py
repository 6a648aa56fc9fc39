"""`retro-dist neighbors`: what the chunks of a split retrieved, read back from a dataset directory.

For each chunk: its sample, documents and text; for each of its neighbors: rank, database id, documents (of the
chunk and of its continuation), the cosine similarity of the two stored embeddings, and the text as chunk ‖
continuation. `gather` reads it into plain JSON-able dicts; `format_text` prints them one text per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retro_dist.data.format import DB_SPLIT, SPLITS, DatasetError, Layout, load_manifest, load_npy, stage_done

BOUNDARY = " ‖ "  # between a neighbor chunk and its continuation, in printed text


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    # a zero vector has no direction: call it 0 rather than nan, which JSON cannot hold
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def _check_range(what: str, value: int, count: int, where: str) -> None:
    if not 0 <= value < count:
        valid = f"0..{count - 1}" if count else "none"
        raise ValueError(f"{what} {value} is out of range: {where} has {count} {what}s (valid: {valid})")


def _require(manifest: dict[str, Any], stage: str, root: str | Path) -> None:
    if not stage_done(manifest, stage):
        raise DatasetError(f"{root} is incomplete (stage {stage!r} has not finished): run "
                           f"`retro-dist prepare --stage {stage} --out {root}` (or the whole pipeline)")


class _Reader:
    """The arrays of one dataset, memory-mapped, and the tokenizer; turns ids into records."""

    def __init__(self, root: str | Path, manifest: dict[str, Any], split: str, *, with_neighbors: bool):
        from tokenizers import Tokenizer

        layout = Layout(root)
        if not layout.tokenizer.is_file():
            raise DatasetError(f"{layout.tokenizer} is missing: the dataset is incomplete; re-run `retro-dist prepare`")
        self.tokenizer, self.pad_id = Tokenizer.from_file(str(layout.tokenizer)), manifest["pad_id"]
        self.split, self.num_samples = split, manifest["counts"][split]["samples"]
        self.per_sample = manifest["seq_len"] // manifest["chunk_size"]
        self.chunks, self.docs = load_npy(layout.chunks(split)), load_npy(layout.chunk_docs(split))
        self.db_chunks, self.db_docs = load_npy(layout.chunks(DB_SPLIT)), load_npy(layout.chunk_docs(DB_SPLIT))
        self.neighbors_path, self.with_neighbors = layout.neighbors(split), with_neighbors
        if with_neighbors:
            self.neighbors = load_npy(self.neighbors_path)
            self.queries, self.keys = load_npy(layout.embeddings(split)), load_npy(layout.embeddings(DB_SPLIT))

    def decode(self, ids: np.ndarray) -> str:
        # pad says nothing; eos stays visible, it marks a document boundary
        return self.tokenizer.decode([int(t) for t in ids if t != self.pad_id], skip_special_tokens=False)

    def chunk(self, c: int) -> dict[str, Any]:
        sample = c // self.per_sample
        record = {"chunk": c, "sample": sample if sample < self.num_samples else None,
                  "docs": self.docs[c].tolist(), "text": self.decode(self.chunks[c])}
        if self.with_neighbors:
            record["neighbors"] = [self.neighbor(rank, int(j), self.queries[c])
                                   for rank, j in enumerate(self.neighbors[c])]
        return record

    def neighbor(self, rank: int, j: int, query: np.ndarray) -> dict[str, Any]:
        if j < 0:
            return {"rank": rank, "id": -1, "docs": None, "continuation_docs": None, "similarity": None,
                    "text": "", "continuation": ""}
        n = len(self.db_chunks)
        if j >= n:
            raise DatasetError(f"{self.neighbors_path} holds neighbor id {j}, outside the database of {n} chunks: "
                               f"re-run `retro-dist prepare --stage neighbors`")
        has_next = j + 1 < n  # past the last chunk the continuation is empty (pad)
        return {"rank": rank, "id": j, "docs": self.db_docs[j].tolist(),
                "continuation_docs": self.db_docs[j + 1].tolist() if has_next else None,
                "similarity": cosine(query, self.keys[j]), "text": self.decode(self.db_chunks[j]),
                "continuation": self.decode(self.db_chunks[j + 1]) if has_next else ""}


def gather(root: str | Path, *, split: str = "val", sample: int | None = None, chunk: int | None = None,
           db_chunk: int | None = None) -> dict[str, Any]:
    """The chunks of `sample`, or the one `chunk`, of `split`, each with its neighbors; or one database chunk alone."""
    given = [flag for flag, v in (("--sample", sample), ("--chunk", chunk), ("--db-chunk", db_chunk)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --sample, --chunk, --db-chunk (got {' and '.join(given) or 'none'})")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    manifest = load_manifest(root)
    with_neighbors = db_chunk is None
    split = split if with_neighbors else DB_SPLIT
    _require(manifest, "neighbors" if with_neighbors else "tokenize", root)
    counts = manifest["counts"][split]
    per_sample = manifest["seq_len"] // manifest["chunk_size"]
    if sample is not None:
        _check_range("sample", sample, counts["samples"], f"the {split} split")
        ids = range(sample * per_sample, (sample + 1) * per_sample)
    else:
        c = chunk if with_neighbors else db_chunk
        _check_range("chunk", c, counts["chunks"], f"the {split} split" if with_neighbors else "the database")
        ids = [c]
    reader = _Reader(root, manifest, split, with_neighbors=with_neighbors)
    return {"dataset": str(root), "split": split if with_neighbors else "db", "sample": sample,
            "seq_len": manifest["seq_len"], "chunk_size": manifest["chunk_size"],
            "chunks": [reader.chunk(c) for c in ids]}


def one_line(text: str, width: int) -> str:
    """Newlines as ⏎, other control characters escaped, cut to `width` characters (0: no limit)."""
    text = "".join("⏎" if ch == "\n" else ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return text[:width - 1] + "…" if 0 < width < len(text) else text


def _docs(pair: list[int]) -> str:
    return f"doc {pair[0]}" if pair[0] == pair[1] else f"docs {pair[0]}-{pair[1]}"


def format_text(report: dict[str, Any], *, width: int = 200) -> str:
    if width < 0:
        raise ValueError(f"--width must be 0 (no limit) or positive, not {width}")
    chunks = report["chunks"]
    what = (f"sample {report['sample']} = chunks {chunks[0]['chunk']}-{chunks[-1]['chunk']}"
            if report["sample"] is not None else f"chunk {chunks[0]['chunk']}")
    lines = [f"{report['dataset']}: {report['split']} {what} (seq_len {report['seq_len']}, "
             f"chunk_size {report['chunk_size']})"]
    for c in chunks:
        sample = f"sample {c['sample']}" if c["sample"] is not None else "in no full sample"
        lines += [f"chunk {c['chunk']} · {sample} · {_docs(c['docs'])}", f"    {one_line(c['text'], width)}"]
        for n in c.get("neighbors", ()):
            if n["id"] < 0:
                lines.append(f"  #{n['rank']}  none")
                continue
            docs = _docs(n["docs"]) + BOUNDARY + (_docs(n["continuation_docs"]) if n["continuation_docs"] else "end")
            lines += [f"  #{n['rank']}  db {n['id']} · cos {n['similarity']:.3f} · {docs}",
                      f"      {one_line(n['text'] + BOUNDARY + n['continuation'], width)}"]
    return "\n".join(lines)
