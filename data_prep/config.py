"""PrepareConfig: every option of the data_prep pipeline, typed and documented in one place."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    """Text files, directories of them (.txt .md .rst .text .jsonl, recursively) and JSON-lines files with a `text`
    field (one document per line); any other file given by name is read as one text document."""
    tokenizer: str | None = None
    """A Hugging Face tokenizer.json to use; None trains a byte-level BPE on a sample of the train split."""
    tokenizer_sample_mb: int = 256
    """Megabytes of train text (the first ones, in input order) the BPE tokenizer is trained on: enough for a 32k
    vocabulary, and bounded whatever the corpus size."""
    tokenize_block_mb: float = 64.0
    """Megabytes of input text per tokenize work block: the unit dealt to ranks and of resume after a kill (plain
    JSON-lines files are cut at line starts; compressed files are one block each). Bounds tokenize's memory."""
    vocab_size: int = 32000
    """Vocabulary size of the trained tokenizer (ignored with --tokenizer)."""
    chunk_size: int = 64
    """Tokens per retrieval chunk."""
    seq_len: int = 2048
    """Tokens per training sample (a multiple of chunk_size); each sample also holds one label token."""
    doc_align: str = "none"
    """`none`: documents are joined end to end; `chunk`: each document starts a new chunk (its last chunk is filled
    with pad, which the loss ignores), so text shared by the starts of two documents gives chunks and continuations
    that line up token for token, which a small model learns to copy (docs/reading-neighbors.md)."""
    val_fraction: float = 0.02
    """Share of documents in the validation split, chosen by a stable hash of each document's text."""
    num_neighbors: int = 2
    """Neighbors retrieved per chunk."""
    embedder: str = "minilm"
    """Chunk embedder: `minilm` (all-MiniLM-L6-v2), `minilm-static` (distilled from it: semantic, ~80x faster on
    CPU) or `hash-<dim>` (fast, lexical, lower quality)."""
    embed_batch: int = 64
    """Chunks per embedder call."""
    index_factory: str = "auto"
    """faiss factory string, or `auto`: exact (Flat) for small databases, IVF above, compressed (IVF-PQ, candidates
    re-ranked exactly from the stored embeddings) where full vectors would exceed --index-memory-mb."""
    index_memory_mb: int = 2048
    """Most memory the index may take, per process that loads it: `auto` compresses it above this."""
    index_recall: float = 0.9
    """recall@10 against exact search that the index's search parameters (nprobe, efSearch) are tuned to reach at
    build time, on a sample of the dataset's own queries; the measured recall is recorded in the manifest."""
    block_size: int = 8192
    """Chunks per work block in embed/neighbors: the unit of MPI parallelism and of resume after a kill."""
    shard_samples: int = 1000
    """Most samples per webdataset shard."""
    shard_bytes: int = 256 * 1024 ** 2
    """Most bytes per webdataset shard."""
    on_bad_utf8: str = "skip"
    """`skip`: drop undecodable bytes and count them in the manifest; `error`: stop at the first such file."""

    def validate(self) -> None:
        if self.chunk_size < 1 or self.seq_len < self.chunk_size or self.seq_len % self.chunk_size:
            raise ValueError(f"seq_len={self.seq_len} must be a positive multiple of chunk_size={self.chunk_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must lie in [0, 1)")
        if self.num_neighbors < 1:
            raise ValueError(f"num_neighbors={self.num_neighbors} must be at least 1")
        if self.doc_align not in ("none", "chunk"):
            raise ValueError(f"doc_align={self.doc_align!r} must be 'none' or 'chunk'")
        if self.on_bad_utf8 not in ("skip", "error"):
            raise ValueError(f"on_bad_utf8={self.on_bad_utf8!r} must be 'skip' or 'error'")
        if not 0.0 < self.index_recall <= 1.0:
            raise ValueError(f"index_recall={self.index_recall} must lie in (0, 1]")
        if not self.tokenize_block_mb > 0:
            raise ValueError(f"tokenize_block_mb={self.tokenize_block_mb} must be positive")
        for name in ("vocab_size", "tokenizer_sample_mb", "index_memory_mb", "embed_batch", "block_size", "shard_samples", "shard_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per PrepareConfig field, default None so that values stored in the manifest are kept."""
    for f in dataclasses.fields(PrepareConfig):
        flag = "--" + f.name.replace("_", "-")
        doc = _DOCS.get(f.name, "").replace("%", "%%")
        default = f.default if f.default is not dataclasses.MISSING else "[]"
        if f.name == "inputs":
            parser.add_argument("--input", dest="inputs", nargs="+", default=None, help=doc)
            continue
        kind = {int: int, float: float}.get(type(f.default), str)
        parser.add_argument(flag, dest=f.name, type=kind, default=None, help=f"{doc} (default: {default})")


def resolve(stored: dict[str, Any] | None, args: argparse.Namespace) -> PrepareConfig:
    """Options given now override the ones the dataset was prepared with; the rest keep their stored values."""
    values = dict(stored or {})
    for f in dataclasses.fields(PrepareConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    known = {f.name for f in dataclasses.fields(PrepareConfig)}
    config = PrepareConfig(**{k: v for k, v in values.items() if k in known})
    config.validate()
    return config


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string under each field) for --help."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(PrepareConfig)))
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


_DOCS = _field_docs()
