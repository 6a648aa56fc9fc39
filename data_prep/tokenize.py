"""Stage 1, tokenize: documents -> train/val token streams (documents joined by eos) cut into chunks.

Writes tokenizer.json, db/chunks.npy + db/chunk_docs.npy (train: the retrieval database) and val/chunks.npy +
val/chunk_docs.npy.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from retro_dist.data.format import DatasetError, Layout, atomic_path, save_npy

from .stage import StageContext

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|eos|>", "[SEP]")
_SURROGATES = re.compile("[\udc80-\udcff]")  # undecodable bytes, as surrogateescape maps them


def input_files(inputs: list[str]) -> list[Path]:
    """Files named directly, and text/JSON-lines files under named directories, in a stable order."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | JSONL_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise DatasetError(f"input {name} does not exist")
    return files


def inputs_fingerprint(inputs: list[str]) -> list[tuple[str, int, int]]:
    """Path, size and mtime of every input file: cheap, and changes when any input does."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in input_files(inputs)]


def read_documents(files: list[Path], *, on_bad_utf8: str, stats: dict[str, int]) -> Iterator[str]:
    for path in files:
        data = path.read_bytes()
        text = data.decode("utf-8", errors="surrogateescape")
        bad = len(_SURROGATES.findall(text))
        if bad:
            if on_bad_utf8 == "error":
                raise DatasetError(f"{path} is not valid UTF-8 ({bad} undecodable bytes): convert it (iconv -f "
                                   f"LATIN1 -t UTF-8) or pass --on-bad-utf8 skip to drop those bytes")
            stats["bad_utf8_bytes"] += bad
            stats["files_with_bad_utf8"] += 1
            text = _SURROGATES.sub("", text)
        if path.suffix in JSONL_SUFFIXES:
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DatasetError(f"{path}:{number}: not a JSON object with a 'text' field") from None
                if not isinstance(doc, str):
                    raise DatasetError(f"{path}:{number}: 'text' is {type(doc).__name__}, not a string")
                yield doc
        else:
            yield text


def is_val(text: str, fraction: float) -> bool:
    """Stable across runs, machines and input order: a hash of the text, not a random draw."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < fraction * 2 ** 64


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_NAMES[0], EOS_NAMES[0]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def special_ids(tokenizer, source: str) -> tuple[int, int]:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > np.iinfo(np.int32).max:
        raise DatasetError(f"tokenizer {source} has {len(vocab)} tokens, more than int32 chunks can hold")
    found = {}
    for kind, names in (("pad", PAD_NAMES), ("eos", EOS_NAMES)):
        ids = [vocab[n] for n in names if n in vocab]
        if not ids:
            raise DatasetError(f"tokenizer {source} has no {kind} token (looked for {', '.join(names)}): add one "
                               f"as a special token, or omit --tokenizer to train one")
        found[kind] = ids[0]
    return found["pad"], found["eos"]


def tokenize_stream(tokenizer, docs: list[str], eos_id: int, *, desc: str, align: int = 1,
                    pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (token stream int32, exclusive end offset of each document int64); each ends with eos, then
    pad up to a multiple of `align` tokens (1: no padding)."""
    pieces, lengths = [], []
    bar = tqdm(total=len(docs), desc=desc, unit="doc", disable=not docs, mininterval=1.0)
    for start in range(0, len(docs), 1000):
        for enc in tokenizer.encode_batch(docs[start:start + 1000], add_special_tokens=False):
            length = len(enc.ids) + 1
            ids = np.asarray(enc.ids + [eos_id] + [pad_id] * (-length % align), dtype=np.int32)
            pieces.append(ids)
            lengths.append(len(ids))
        bar.update(min(1000, len(docs) - start))
    bar.close()
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return stream, np.cumsum(np.asarray(lengths, dtype=np.int64))


def cut_chunks(stream: np.ndarray, doc_ends: np.ndarray, chunk_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream -> chunks [c, chunk_size] (last one padded) and the document ids of each chunk's first/last token."""
    num_chunks = -(-len(stream) // chunk_size)
    chunks = np.full(num_chunks * chunk_size, pad_id, dtype=np.int32)
    chunks[: len(stream)] = stream
    first = np.arange(num_chunks, dtype=np.int64) * chunk_size
    last = np.minimum(first + chunk_size, len(stream)) - 1
    docs = np.stack([np.searchsorted(doc_ends, first, side="right"),
                     np.searchsorted(doc_ends, last, side="right")], axis=1).astype(np.int64)
    return chunks.reshape(num_chunks, chunk_size), docs


def run(ctx: StageContext) -> dict[str, Any]:
    c, layout = ctx.config, Layout(ctx.root)
    if not ctx.world.is_main:
        return {}
    stats = {"bad_utf8_bytes": 0, "files_with_bad_utf8": 0, "empty_documents": 0}
    files = input_files(c.inputs)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for doc in read_documents(files, on_bad_utf8=c.on_bad_utf8, stats=stats):
        if not doc.strip():
            stats["empty_documents"] += 1
            continue
        splits["val" if is_val(doc, c.val_fraction) else "train"].append(doc)
    if not splits["train"] and not splits["val"]:
        raise DatasetError(f"no documents in {' '.join(c.inputs) or '(no --input)'}: give text files (.txt .md .rst), "
                           f"JSON-lines files with a 'text' field, or directories holding them")
    if c.val_fraction > 0 and not splits["val"] and len(splits["train"]) > 1:
        splits["val"].append(splits["train"].pop())  # a tiny corpus still gets a validation document

    if c.tokenizer:
        from tokenizers import Tokenizer
        if not Path(c.tokenizer).is_file():
            raise DatasetError(f"tokenizer {c.tokenizer} does not exist")
        tokenizer = Tokenizer.from_file(c.tokenizer)
    else:
        ctx.log(f"[tokenize] training a byte-level BPE tokenizer (vocab {c.vocab_size}) on "
                f"{len(splits['train'])} documents")
        tokenizer = train_tokenizer(splits["train"], c.vocab_size)
    pad_id, eos_id = special_ids(tokenizer, c.tokenizer or "(trained)")
    with atomic_path(layout.tokenizer) as tmp:
        tokenizer.save(str(tmp))

    counts: dict[str, Any] = {}
    for split, docs in splits.items():
        align = c.chunk_size if c.doc_align == "chunk" else 1
        stream, doc_ends = tokenize_stream(tokenizer, docs, eos_id, desc=f"tokenize {split}", align=align,
                                           pad_id=pad_id)
        chunks, chunk_docs = cut_chunks(stream, doc_ends, c.chunk_size, pad_id)
        save_npy(layout.chunks(split), chunks)
        save_npy(layout.chunk_docs(split), chunk_docs)
        samples = max(0, (len(stream) - 1) // c.seq_len)
        counts[split] = {"documents": len(docs), "tokens": int(len(stream)), "chunks": int(len(chunks)),
                         "samples": samples}
    if counts["train"]["samples"] == 0:
        raise DatasetError(f"the train split has {counts['train']['tokens']} tokens, too few for one sample of "
                           f"seq_len={c.seq_len} (+1 label token): add text or lower --seq-len")
    ctx.facts.update(tokenizer="tokenizer.json", vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
                     pad_id=pad_id, eos_id=eos_id, chunk_size=c.chunk_size, seq_len=c.seq_len, doc_align=c.doc_align,
                     counts=counts, input_stats=stats)
    return {"documents": sum(v["documents"] for v in counts.values()), "train_tokens": counts["train"]["tokens"],
            "val_tokens": counts["val"]["tokens"], "db_chunks": counts["train"]["chunks"], **stats}


if __name__ == "__main__":
    from data_prep.pipeline import main
    raise SystemExit(main(stage="tokenize"))
