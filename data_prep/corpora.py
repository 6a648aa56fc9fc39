"""Corpora every machine has without downloads, used by the tests, the benchmarks and the demo:

- `stdlib_docstrings`: the docstrings of Python's standard library (PSF licence, a few MB of English).
- `copy_task_docs`: a synthetic copy task: documents of random words, each written twice under different headers,
  so a model can only predict the second copy's words by reading its neighbors (the first copy).

    python -m data_prep.corpora OUT_DIR [--limit N]    # one .txt document per docstring
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from pathlib import Path


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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    docs = stdlib_docstrings(args.limit)
    write_corpus(args.out, docs)
    print(f"wrote {len(docs)} documents ({sum(map(len, docs)) / 1e6:.1f} MB) to {args.out}")
