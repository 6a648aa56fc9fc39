"""Reading a corpus as a stream of documents, cut into fixed work blocks that ranks take in turn.

Inputs are files and directories. Kinds, by extension (after a `.gz` / `.zst` / `.zstd` compression suffix):
- JSON-lines (`.jsonl`, `.ndjson`): one document per line, in its `text` field;
- text (`.txt`, `.md`, `.rst`, `.text`): one document per file;
- any other file named directly: one text document;
- any other file inside a directory: read as one text document when its first 8 KiB hold no NUL byte (source code,
  licences, man pages), else counted in `skipped_binary_files` (images, archives, compiled code).

A block is a run of whole files of about `block_bytes` bytes, or a byte range of one large uncompressed JSON-lines
file cut at line starts; a compressed file is one block (its lines cannot be reached without decompressing). Blocks
depend on the inputs and `block_bytes` only, never on the number of ranks, and read in order they give the
documents in input order.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from retro_dist.data.format import DatasetError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
CODECS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
SNIFF_BYTES = 8192
_SURROGATES = re.compile("[\udc80-\udcff]")  # undecodable bytes, as surrogateescape maps them


@dataclass(frozen=True)
class Piece:
    """Part of one input file: bytes [start, end) of it (end None: to the end), read as `kind` (jsonl or text)."""

    path: str
    kind: str
    codec: str | None = None
    start: int = 0
    end: int | None = None


Block = tuple[Piece, ...]


def _kind(path: Path, *, named: bool) -> tuple[str | None, str | None]:
    """(kind, codec) of a file: kind jsonl / text, or None for a binary file found in a directory."""
    suffixes = [s.lower() for s in path.suffixes]
    codec = CODECS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if codec and len(suffixes) > 1 else (suffixes[-1] if suffixes and not codec else "")
    if inner in JSONL_SUFFIXES:
        return "jsonl", codec
    if inner in TEXT_SUFFIXES or named:
        return "text", codec
    try:
        with _open(path, codec) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        if codec is None:
            raise
        raise DatasetError(f"{path}: corrupt {codec} data ({e}): re-download or remove the file") from None
    return (None if b"\0" in head else "text"), codec


def _open(path: Path | str, codec: str | None) -> IO[bytes]:
    if codec is None:
        return open(path, "rb")
    if codec == "gzip":
        return gzip.open(path, "rb")
    import zstandard  # only corpora that ship .zst need it

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))


def list_inputs(inputs: list[str]) -> list[Path]:
    """Every file named or under a named directory, in a stable order (for the fingerprint: stat only, no reads)."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise DatasetError(f"input {name} does not exist")
    return files


def inputs_fingerprint(inputs: list[str]) -> list[tuple[str, int, int]]:
    """Path, size and mtime of every input file: cheap, and changes when any input does."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in list_inputs(inputs)]


def plan_blocks(inputs: list[str], block_bytes: int) -> tuple[list[Block], dict[str, int]]:
    """The work blocks of a corpus, and {"skipped_binary_files": n}."""
    blocks: list[Block] = []
    current: list[Piece] = []
    size = 0
    skipped = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            blocks.append(tuple(current))
        current, size = [], 0

    for name in inputs:
        path = Path(name)
        named = not path.is_dir()
        for file in ([path] if named else sorted(p for p in path.rglob("*") if p.is_file())):
            kind, codec = _kind(file, named=named)
            if kind is None:
                skipped += 1
                continue
            length = file.stat().st_size
            if codec is not None:  # unknown length once decompressed: a block of its own
                flush()
                blocks.append((Piece(str(file), kind, codec),))
            elif kind == "jsonl" and length > block_bytes:
                flush()
                for start, end in _line_ranges(file, length, block_bytes):
                    blocks.append((Piece(str(file), kind, None, start, end),))
            else:
                current.append(Piece(str(file), kind))
                size += length
                if size >= block_bytes:
                    flush()
    flush()
    return blocks, {"skipped_binary_files": skipped}


def _line_ranges(path: Path, length: int, block_bytes: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about block_bytes each, every one starting at a line start."""
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + block_bytes < length:
            f.seek(cuts[-1] + block_bytes - 1)
            f.readline()  # to the end of the line holding that byte: the next line starts the next range
            if f.tell() >= length:
                break
            cuts.append(f.tell())
    return list(zip(cuts, cuts[1:] + [length]))


class BadUtf8:
    """Counts undecodable bytes (policy skip) or stops at the first (policy error)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.bytes = 0
        self.files: set[str] = set()

    def clean(self, text: str, where, path: str) -> str:
        """`text` without undecodable bytes; `where` names the place (a string, or a function giving one)."""
        if not _SURROGATES.search(text):
            return text
        bad = len(_SURROGATES.findall(text))
        if self.policy == "error":
            where = where() if callable(where) else where
            raise DatasetError(f"{where} is not valid UTF-8 ({bad} undecodable bytes): convert it (iconv -f LATIN1 "
                               f"-t UTF-8) or pass --on-bad-utf8 skip to drop those bytes")
        self.bytes += bad
        self.files.add(path)
        return _SURROGATES.sub("", text)


def read_block(block: Block, bad: BadUtf8) -> Iterator[str]:
    """The documents of one block, in order."""
    for piece in block:
        if piece.kind == "jsonl":
            yield from _jsonl_documents(piece, bad)
        else:
            with _open(piece.path, piece.codec) as f:
                data = _read_all(f, piece)
            yield bad.clean(data.decode("utf-8", errors="surrogateescape"), piece.path, piece.path)


def _read_all(f: IO[bytes], piece: Piece) -> bytes:
    try:
        return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{piece.path}: corrupt {piece.codec} data ({e}): re-download or remove the file") from None


def _jsonl_documents(piece: Piece, bad: BadUtf8) -> Iterator[str]:
    with _open(piece.path, piece.codec) as f:
        if piece.start:
            f.seek(piece.start)
        position = piece.start
        while piece.end is None or position < piece.end:
            try:
                line = f.readline()
            except (OSError, EOFError, zlib.error) as e:
                raise DatasetError(f"{piece.path}: corrupt {piece.codec} data at line {_line_number(piece, position)} "
                                   f"({e}): re-download or remove the file") from None
            if not line:
                break
            start, position = position, position + len(line)
            if not line.strip():
                continue
            where = lambda: f"{piece.path}:{_line_number(piece, start)}"  # noqa: E731 - counted only on error
            text = bad.clean(line.decode("utf-8", errors="surrogateescape"), where, piece.path)
            try:
                doc = json.loads(text)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DatasetError(f"{where()}: not a JSON object with a 'text' field") from None
            if not isinstance(doc, str):
                raise DatasetError(f"{where()}: 'text' is {type(doc).__name__}, not a string")
            yield doc


def _line_number(piece: Piece, offset: int) -> int:
    """1-based number of the line starting at (decompressed) byte `offset`, counted only when an error needs it."""
    count = 0
    with _open(piece.path, piece.codec) as f:
        remaining = offset
        while remaining > 0:
            try:
                data = f.read(min(remaining, 1 << 20))
            except (OSError, EOFError, zlib.error):
                break
            if not data:
                break
            count += data.count(b"\n")
            remaining -= len(data)
    return count + 1
