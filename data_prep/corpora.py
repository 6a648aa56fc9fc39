"""Real English text that every machine has without downloads: the docstrings of Python's standard library
(PSF licence, a few MB). Used by the tests, the benchmarks and the demo.

    python -m data_prep.corpora OUT_DIR [--limit N]    # one .txt document per docstring
"""

from __future__ import annotations

import ast
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
