"""Corpora every machine has without downloads, used by the tests, the benchmarks and the demo:

- `stdlib_docstrings`: the docstrings of Python's standard library (PSF licence, a few MB of English).
- `copy_task_docs`: a synthetic copy task: documents of random words, each written twice under different headers,
  so a model can only predict the second copy's words by reading its neighbors (the first copy).
- `installed_texts`: hundreds of MB of real text (the sources and docs of installed Python packages, then the
  system's documentation), deduplicated, in a stable order: for measuring the pipeline at scale.

    python -m data_prep.corpora OUT_DIR [--limit N]    # one .txt document per docstring
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import os
import random
import re
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator


def stdlib_docstrings(limit: int | None = None, *, min_chars: int = 200) -> list[str]:
    """Up to `limit` distinct module/class/function docstrings of at least min_chars, in a stable order."""
    docs: dict[str, None] = {}  # ordered set
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "test" in path.relative_to(root).parts[:1] or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc not in docs:
                    docs[doc] = None
                    if limit is not None and len(docs) >= limit:
                        return list(docs)
    return list(docs)


def stdlib_sources(packages: tuple[str, ...] | None = None) -> list[str]:
    """The source files of Python's standard library (tests left out), in a stable order; `packages` keeps only
    the files under those top-level packages. Code repeats across files (licence headers, shared idioms, families of
    generated modules such as the `encodings` codecs), which is what retrieval can copy."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0].startswith("test") or "site-packages" in path.parts or "tests" in parts:
            continue
        if packages is not None and parts[0] not in packages:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            docs.append(text)
    return docs


def _words(count: int) -> list[str]:
    """The first `count` distinct lowercase words of the stdlib docstrings: a fixed vocabulary of real words."""
    words: dict[str, None] = {}
    for doc in stdlib_docstrings():
        for word in re.findall(r"\b[a-z]{3,12}\b", doc):
            words.setdefault(word, None)
        if len(words) >= count:
            break
    return list(words)[:count]


def copy_task_docs(num_docs: int = 1200, *, vocab_words: int = 1119, words_per_doc: int = 60,
                   aligned: bool = False, seed: int = 0) -> list[str]:
    """A copy task: num_docs // 2 texts of random words, each written twice under different headers and shuffled
    apart, so a model predicts the second copy's words only by reading its neighbors (the first copy is another
    document, which the no-leakage rule allows it to retrieve). In-context copying cannot help.

    aligned=False: headers of different lengths, so the copies' chunk boundaries fall at unrelated offsets (copying
    needs content matching). aligned=True: one-word headers, for `copy_task_tokenizer` (one token per word) with
    words_per_doc = 2 * chunk_size - 2, so every document fills exactly two chunks with its eos and a neighbor's
    continuation lines up token for token with what follows the chunk (copying by position)."""
    vocab = _words(vocab_words)
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs // 2):
        body = " ".join(rng.choice(vocab) for _ in range(words_per_doc))
        if aligned:
            docs += [f"record {body}", f"duplicate {body}"]
        else:
            docs += [f"Record {i}.\n{body}", f"Copy of record number {i}, kept as written:\n{body}"]
    rng.shuffle(docs)
    return docs


def copy_task_tokenizer(path: Path, *, vocab_words: int = 1119) -> Path:
    """A word-level tokenizer (one token per word of the copy task's vocabulary, `<pad>` = 0, `<eos>` = 1), saved as
    tokenizer.json for `retro-dist prepare --tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "record": 3, "duplicate": 4}
    for word in _words(vocab_words):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens(["<pad>", "<eos>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def prepare_copy_task(out: Path, *, aligned: bool, num_docs: int = 1200, seq_len: int = 256,
                      chunk_size: int = 64, chunks_per_doc: int = 4, num_neighbors: int = 2) -> Path:
    """A copy-task dataset in out/ds (hash-256 embedder, exact index): aligned with the word-level tokenizer and
    documents of exactly `chunks_per_doc` chunks (every chunk but the last one's successor is copyable), or
    misaligned with a byte-level BPE of 2048 tokens trained on it. Returns the dataset directory."""
    from data_prep.pipeline import main as prepare

    words = chunks_per_doc * chunk_size - 2 if aligned else 60
    text = write_corpus(out / "text", copy_task_docs(num_docs, words_per_doc=words, aligned=aligned))
    tokenizer = (["--tokenizer", str(copy_task_tokenizer(out / "tokenizer.json"))] if aligned
                 else ["--vocab-size", "2048"])
    args = ["--input", str(text), "--out", str(out / "ds"), *tokenizer, "--seq-len", str(seq_len), "--chunk-size",
            str(chunk_size), "--embedder", "hash-256", "--num-neighbors", str(num_neighbors), "--val-fraction", "0.05"]
    if prepare(args) != 0:
        raise RuntimeError(f"retro-dist prepare {' '.join(args)} failed")
    return out / "ds"


def write_corpus(directory: Path, docs: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:05d}.txt").write_text(doc)
    return directory


PYTHON_TEXT_SUFFIXES = frozenset({".py", ".rst", ".txt", ".md"})


def installed_text_roots() -> list[tuple[Path, frozenset[str] | None]]:
    """Where `installed_texts` reads, in order, with the file suffixes kept there (None: any text file): this
    interpreter's site-packages and standard library, every other Python found, the system's documentation (read
    decompressed), then other installed software's Python sources (such as SDKs under /usr/lib)."""
    paths = sysconfig.get_paths()
    python = [Path(paths["purelib"]), Path(paths["stdlib"])]
    for pattern in ("/usr/lib/python3*", "/usr/local/lib/python3*", "~/.pyenv/versions/*/lib/python3*"):
        python += [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))]
    docs = [Path(p) for p in ("/usr/share/doc", "/usr/share/info", "/usr/share/man")]
    return ([(p, PYTHON_TEXT_SUFFIXES) for p in python] + [(p, None) for p in docs]
            + [(Path("/usr/lib"), PYTHON_TEXT_SUFFIXES)])


def installed_texts(*, max_doc_bytes: int = 1 << 20) -> Iterator[tuple[str, str]]:
    """(path, text) of every installed text file under `installed_text_roots`, in a stable order (roots in order,
    sorted paths within each), so any prefix of it is the same on one machine. A file is skipped when its text was
    seen before, or when its path inside a Python installation was (another Python's copy of the same module is a
    near-duplicate that would make retrieval unrealistically easy); also binary, non-UTF-8, empty and over
    max_doc_bytes (generated data tables) files."""
    seen_keys: set[str] = set()
    seen_texts: set[bytes] = set()
    for root, suffixes in installed_text_roots():
        for path in _sorted_files(root):
            if suffixes is not None and path.suffix not in suffixes:
                continue
            key = _install_key(path)
            if key in seen_keys:
                continue
            text = _read_text(path, max_doc_bytes)
            if text is None:
                continue
            digest = hashlib.sha1(text.encode()).digest()
            if digest in seen_texts:
                continue
            seen_keys.add(key)
            seen_texts.add(digest)
            yield str(path), text


def _sorted_files(root: Path) -> Iterator[Path]:
    """Regular files under root, depth first in sorted order, not following links."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = Path(directory, name)
            if not path.is_symlink() and path.is_file():
                yield path


def _install_key(path: Path) -> str:
    """The path inside its Python installation (after site-packages / dist-packages / pythonX.Y), else the path."""
    parts = path.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in ("site-packages", "dist-packages") or re.fullmatch(r"python\d(\.\d+)?", parts[i]):
            return "/".join(parts[i + 1:])
    return str(path)


def _read_text(path: Path, max_bytes: int) -> str | None:
    """The file's text (gzip read decompressed), or None when binary, not UTF-8, blank or over max_bytes."""
    try:
        with (gzip.open(path) if path.suffix == ".gz" else path.open("rb")) as f:
            data = f.read(max_bytes + 1)
        text = data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    return text if len(data) <= max_bytes and "\0" not in text and text.strip() else None


def write_jsonl_corpus(directory: Path, docs: Iterable[str], *, max_bytes: int,
                       part_bytes: int = 64 << 20) -> dict[str, int]:
    """Write docs as JSON-lines files (`{"text": ...}` per line, parts of about part_bytes) until their UTF-8 text
    reaches max_bytes. Returns the documents, text bytes and files written."""
    directory.mkdir(parents=True, exist_ok=True)
    documents = total = part = written = 0
    out = None
    try:
        for doc in docs:
            if total >= max_bytes:
                break
            if out is None or written >= part_bytes:
                if out is not None:
                    out.close()
                out = open(directory / f"docs-{part:05d}.jsonl", "w", encoding="utf-8")
                part, written = part + 1, 0
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line)
            total += len(doc.encode())
            documents += 1
    finally:
        if out is not None:
            out.close()
    return {"documents": documents, "text_bytes": total, "files": part}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    docs = stdlib_docstrings(args.limit)
    write_corpus(args.out, docs)
    print(f"wrote {len(docs)} documents ({sum(map(len, docs)) / 1e6:.1f} MB) to {args.out}")
