"""Small real-text corpora for data_prep tests: docstrings of Python's standard library (on every machine)."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path


def stdlib_docstrings(limit: int, *, min_chars: int = 200) -> list[str]:
    """Up to `limit` module/class/function docstrings of at least min_chars, in a stable order."""
    docs: list[str] = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc not in docs:
                    docs.append(doc)
                    if len(docs) >= limit:
                        return docs
    return docs


def write_corpus(directory: Path, docs: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:05d}.txt").write_text(doc)
    return directory
