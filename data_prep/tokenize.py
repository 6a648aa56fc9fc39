"""Stage 1, tokenize: documents -> train/val token streams (each document ends with eos) cut into chunks.

Writes tokenizer.json, db/chunks.npy + db/chunk_docs.npy (train: the retrieval database) and val/chunks.npy +
val/chunk_docs.npy.

Streaming and parallel, with memory bounded by the block size (`--tokenize-block-mb`), not by the corpus:
1. rank 0 plans the work blocks (data_prep.readers) and, unless `--tokenizer` is given, trains a byte-level BPE on
   the first `--tokenizer-sample-mb` of train text;
2. ranks take blocks in turn, tokenize them and write one part per block and split (tokens, document lengths);
   a part is whole or absent, so a killed run resumes with the blocks it had not finished;
3. a global pass over the parts' document counts gives every part its token offset and first document id; rank 0
   allocates the outputs and every rank writes its parts' tokens and chunk document ids at their offsets.
The result does not depend on the number of ranks, and equals tokenizing all documents in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from retro_dist.data.format import DatasetError, Layout, atomic_path, save_npy

from .assemble import SPLITS, allocate, place_segments, split_counts, write_split
from .readers import BadUtf8, Block, Piece, plan_blocks, read_block
from .stage import StageContext

# the first name the tokenizer has wins; a tokenizer without a pad token (Llama 2/3) pads with a special token that
# text never yields: Llama 3.1's pad, Llama 3's first reserved token, Llama 2's <unk> (byte fallback never emits it)
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>",
             "<|reserved_special_token_0|>", "<unk>")
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>", "[SEP]")
# UTF-8 bytes per encode_batch call. The tokenizer's per-token objects (~150 B a token in tokenizers 0.23, ~110 B
# without offsets) are most of this stage's memory, and a byte-level BPE gives at most one token per byte: a budget
# in bytes bounds them whatever the text (in characters, dense text such as code or CJK held 1.5-3x more tokens)
BATCH_BYTES = 1 << 20
PIECE_CHARS = 1 << 17  # longer documents are encoded in pieces of at least this many characters, cut between words
PIECE_LIMIT = 1 << 20  # a piece with no place between words to cut it is cut here anyway (tokens may then differ)
# a single space or newline between two letters/digits: no byte-level BPE pre-token crosses it, so cutting a
# document there and encoding the pieces apart gives the same tokens as encoding it whole
_SAFE_CUT = re.compile(r"(?<=[^\W_])[ \n](?=[^\W_])")


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


# encoding ---------------------------------------------------------------------------------------------------------

def _pieces(text: str) -> list[str]:
    """`text` cut at safe places into pieces of PIECE_CHARS to PIECE_LIMIT characters (one piece when shorter)."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = _SAFE_CUT.search(text, start + PIECE_CHARS, start + PIECE_LIMIT)
        if cut is None and len(text) - start <= PIECE_LIMIT:
            break  # no safe place (code without spaces between words, CJK): the rest whole
        end = cut.start() if cut else start + PIECE_LIMIT  # no space between words for 1M characters: cut anyway
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def encode_documents(tokenizer, docs: Iterable[str], eos_id: int, *, align: int = 1,
                     pad_id: int = 0) -> Iterator[np.ndarray]:
    """Each document's token ids int32, then eos, then pad up to a multiple of `align` (1: no padding).

    Documents are encoded in batches of about BATCH_BYTES, long ones in pieces, so memory stays bounded whatever
    the document sizes and the text.
    """
    batch: list[str] = []
    owners: list[int] = []  # document number of each piece in the batch
    open_docs: list[list[np.ndarray]] = []  # the pieces' ids of documents not yet yielded, from document `first` on
    first = size = 0
    # no offsets, the same ids (tokenizers >= 0.21)
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def encode() -> None:
        for owner, enc in zip(owners, encode_batch(batch, add_special_tokens=False)):
            open_docs[owner - first].append(np.asarray(enc.ids, dtype=np.int32))
        batch.clear()
        owners.clear()

    for number, doc in enumerate(docs):
        open_docs.append([])
        for piece in _pieces(doc):
            batch.append(piece)
            owners.append(number)
            size += len(piece) if piece.isascii() else len(piece.encode("utf-8", "surrogatepass"))
            if size >= BATCH_BYTES:
                encode()
                size = 0
                for pieces in open_docs[:number - first]:  # documents before this one are whole now
                    yield _finish(pieces, eos_id, align, pad_id)
                del open_docs[:number - first]
                first = number
    encode()
    for pieces in open_docs:
        yield _finish(pieces, eos_id, align, pad_id)


def _finish(pieces: list[np.ndarray], eos_id: int, align: int, pad_id: int) -> np.ndarray:
    length = sum(len(p) for p in pieces) + 1
    tail = np.asarray([eos_id] + [pad_id] * (-length % align), dtype=np.int32)
    return np.concatenate([*pieces, tail])


# the stage ----------------------------------------------------------------------------------------------------------

def run(ctx: StageContext) -> dict[str, Any]:
    c, world, layout = ctx.config, ctx.world, Layout(ctx.root)
    started = time.perf_counter()
    parts = ctx.root / f".tokenize.parts-{ctx.fingerprint[:16]}-{c.tokenize_block_mb}mb"
    def plan() -> tuple[list[Block], dict[str, int]]:
        parts.mkdir(parents=True, exist_ok=True)
        return plan_blocks(c.inputs, max(1, int(c.tokenize_block_mb * 2**20)))

    blocks, input_stats = world.on_main(plan)
    if not blocks:
        raise _no_documents(c.inputs)

    sample = world.on_main(lambda: _prepare_tokenizer(ctx, blocks, parts / "tokenizer.json"))
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(parts / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # special tokens typed in a document stay text: pad/eos come only from here
    pad_id, eos_id = special_ids(tokenizer, c.tokenizer or "(trained)")

    mine = [b for b in world.my_blocks(len(blocks)) if not (parts / f"{b:06d}.json").exists()]
    error = None
    try:
        with tqdm(total=sum(_piece_bytes(p) for b in mine for p in blocks[b]), desc="tokenize", unit="B",
                  unit_scale=True, mininterval=1.0, disable=not world.is_main or not mine) as bar:
            for b in mine:
                _tokenize_block(blocks[b], parts, b, tokenizer, eos_id, pad_id, ctx)
                bar.update(sum(_piece_bytes(p) for p in blocks[b]))
    except Exception as e:  # noqa: BLE001 - raised on every rank by check
        error = e
    world.check(error)

    stats = [json.loads((parts / f"{b:06d}.json").read_text()) for b in range(len(blocks))]
    segments = place_segments(stats, parts, c.val_fraction)
    counts = {split: split_counts(segs, c) for split, segs in segments.items()}
    if not any(counts[s]["documents"] for s in SPLITS):
        raise _no_documents(c.inputs)
    if counts["train"]["samples"] == 0:
        raise DatasetError(f"the train split has {counts['train']['tokens']} tokens, too few for one sample of "
                           f"seq_len={c.seq_len} (+1 label token): add text or lower --seq-len")

    outputs = {split: (layout.chunks(split), layout.chunk_docs(split)) for split in SPLITS}
    temps = {split: tuple(p.with_name(f".{p.name}.tmp-{ctx.fingerprint[:16]}") for p in paths)
             for split, paths in outputs.items()}
    offsets = world.on_main(lambda: {split: allocate(temps[split], counts[split]["tokens"], c.chunk_size, pad_id)
                                     for split in SPLITS})
    owned, error = set(world.my_blocks(len(blocks))), None
    try:
        for split in SPLITS:
            write_split(segments[split], owned, parts, temps[split], offsets[split], counts[split]["tokens"],
                         c.chunk_size)
    except Exception as e:  # noqa: BLE001 - raised on every rank by check
        error = e
    world.check(error)

    def publish() -> None:
        for split in SPLITS:
            for tmp, path in zip(temps[split], outputs[split]):
                os.replace(tmp, path)
        with atomic_path(layout.tokenizer) as tmp:
            shutil.copyfile(parts / "tokenizer.json", tmp)
        for stale in ctx.root.glob(".tokenize.parts-*"):
            shutil.rmtree(stale, ignore_errors=True)

    world.on_main(publish)

    totals = _merge_stats(stats) | input_stats
    _warn_single_document(ctx, stats, counts["train"])
    ctx.facts.update(tokenizer="tokenizer.json", vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
                     pad_id=pad_id, eos_id=eos_id, chunk_size=c.chunk_size, seq_len=c.seq_len, doc_align=c.doc_align,
                     counts=counts, input_stats=totals, tokenizer_sample=sample)
    return {"documents": sum(v["documents"] for v in counts.values()), "train_tokens": counts["train"]["tokens"],
            "val_tokens": counts["val"]["tokens"], "db_chunks": counts["train"]["chunks"], "blocks": len(blocks),
            "blocks_computed": len(mine),
            "tokens_per_s": round((counts["train"]["tokens"] + counts["val"]["tokens"]) / (time.perf_counter() - started)),
            **totals}


def _no_documents(inputs: list[str]) -> DatasetError:
    return DatasetError(f"no documents in {' '.join(inputs) or '(no --input)'}: give text files (.txt .md .rst, or "
                        f"any text file inside a directory), JSON-lines files with a 'text' field (.jsonl, also "
                        f".jsonl.gz / .jsonl.zst), or directories holding them")


def _piece_bytes(piece: Piece) -> int:
    end = piece.end if piece.end is not None else Path(piece.path).stat().st_size
    return end - piece.start


def _documents(blocks: Iterable[Block], bad: BadUtf8, stats: dict[str, int]) -> Iterator[str]:
    """The non-empty documents of `blocks` in order; empty ones are counted in stats["empty_documents"]."""
    for block in blocks:
        for doc in read_block(block, bad):
            if doc.strip():
                yield doc
            else:
                stats["empty_documents"] += 1


def _prepare_tokenizer(ctx: StageContext, blocks: list[Block], path: Path) -> dict[str, int] | None:
    """Rank 0: the given tokenizer, or a BPE trained on the first --tokenizer-sample-mb of train text, at `path`.
    Returns the size of the sample it was trained on (None for a given tokenizer)."""
    c = ctx.config
    record = path.with_name("tokenizer_sample.json")
    sample_size = None
    if c.tokenizer:
        from tokenizers import Tokenizer
        if not Path(c.tokenizer).is_file():
            raise DatasetError(f"tokenizer {c.tokenizer} does not exist")
        tokenizer = Tokenizer.from_file(c.tokenizer)
    elif path.exists() and record.exists():
        return json.loads(record.read_text())  # trained by a run that was killed later
    else:
        budget, size, sample, any_val = c.tokenizer_sample_mb << 20, 0, [], False
        docs = _documents(blocks, BadUtf8("skip"), {"empty_documents": 0})
        for doc in docs:
            if is_val(doc, c.val_fraction):
                any_val = True
                continue
            if size >= budget:
                break
            data = doc.encode("utf-8", "surrogatepass")
            if size + len(data) > budget:  # a document larger than what is left of the budget: its start only
                doc = data[:budget - size].decode("utf-8", "ignore")
            sample.append(doc)
            size += min(len(data), budget - size)
        else:  # the whole corpus was read: apply the small-corpus rule of place_segments
            if c.val_fraction > 0 and not any_val and len(sample) > 1:
                sample.pop()
        ctx.log(f"[tokenize] training a byte-level BPE tokenizer (vocab {c.vocab_size}) on {len(sample)} documents "
                f"({size / 2**20:.1f} MB)")
        tokenizer = train_tokenizer(sample, c.vocab_size)
        sample_size = {"documents": len(sample), "bytes": size}
    special_ids(tokenizer, c.tokenizer or "(trained)")
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))
    if sample_size is not None:
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps(sample_size))
    return sample_size


def _tokenize_block(block: Block, parts: Path, number: int, tokenizer, eos_id: int, pad_id: int,
                    ctx: StageContext) -> None:
    """One block -> parts/NNNNNN.{split}.tokens.npy / .lengths.npy, then NNNNNN.json (written last: the done mark)."""
    c = ctx.config
    bad = BadUtf8(c.on_bad_utf8)
    stats = {"empty_documents": 0}
    labels: list[str] = []

    def labelled() -> Iterator[str]:
        for doc in _documents([block], bad, stats):
            labels.append("val" if is_val(doc, c.val_fraction) else "train")
            yield doc

    pieces: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    align = c.chunk_size if c.doc_align == "chunk" else 1
    for i, ids in enumerate(encode_documents(tokenizer, labelled(), eos_id, align=align, pad_id=pad_id)):
        pieces[labels[i]].append(ids)
    record: dict[str, Any] = {"empty_documents": stats["empty_documents"], "bad_utf8_bytes": bad.bytes,
                              "files_with_bad_utf8": sorted(bad.files)}
    for split, arrays in pieces.items():
        lengths = np.asarray([len(a) for a in arrays], dtype=np.int64)
        save_npy(parts / f"{number:06d}.{split}.tokens.npy",
                 np.concatenate(arrays) if arrays else np.zeros(0, np.int32))
        save_npy(parts / f"{number:06d}.{split}.lengths.npy", lengths)
        record[split] = {"documents": len(arrays), "tokens": int(lengths.sum()),
                         "largest_document": int(lengths.max(initial=0))}
    with atomic_path(parts / f"{number:06d}.json") as tmp:
        tmp.write_text(json.dumps(record))


def _merge_stats(stats: list[dict[str, Any]]) -> dict[str, int]:
    files = set()
    for s in stats:
        files.update(s["files_with_bad_utf8"])
    return {"bad_utf8_bytes": sum(s["bad_utf8_bytes"] for s in stats), "files_with_bad_utf8": len(files),
            "empty_documents": sum(s["empty_documents"] for s in stats)}


def _warn_single_document(ctx: StageContext, stats: list[dict[str, Any]], train: dict[str, int]) -> None:
    """Retrieval never returns a sample's own documents: a corpus that is mostly one document gets no neighbors."""
    largest = max(s["train"]["largest_document"] for s in stats)
    if train["tokens"] and largest >= train["tokens"] / 2:
        ctx.log(f"[tokenize] warning: one document holds {largest / train['tokens']:.0%} of the train split's "
                f"{train['tokens']} tokens ({train['documents']} documents): retrieval excludes a sample's own "
                f"documents, so its chunks will find few or no neighbors; give one document per file or per "
                f"JSON-lines line")
