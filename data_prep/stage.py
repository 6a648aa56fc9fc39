"""Running one stage: skip when its inputs fingerprint matches the manifest, else redo it, time it, record it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from retro_dist.data.format import STAGES, atomic_path, fingerprint, load_manifest, require_stage, save_manifest

from .config import PrepareConfig
from .parallel import PrepError, World

# which options each stage's output depends on: changing another option does not redo it
STAGE_OPTIONS = {
    "tokenize": ("inputs", "tokenizer", "vocab_size", "chunk_size", "seq_len", "val_fraction", "on_bad_utf8",
                 "doc_align", "tokenizer_sample_mb"),
    "embed": ("embedder",),
    "index": ("index_factory", "index_memory_mb", "index_recall"),
    "neighbors": ("num_neighbors",),
    "shard": ("shard_samples", "shard_bytes"),
}


@dataclass
class StageContext:
    root: Path
    config: PrepareConfig
    world: World
    manifest: dict[str, Any]
    fingerprint: str
    facts: dict[str, Any] = field(default_factory=dict)  # top-level manifest entries this stage sets

    def log(self, message: str) -> None:
        if self.world.is_main:
            print(message, flush=True)


def upstream(stage: str) -> str | None:
    i = STAGES.index(stage)
    return STAGES[i - 1] if i else None


def stage_fingerprint(stage: str, config: PrepareConfig, manifest: dict[str, Any], extra: Any = None) -> str:
    prev = upstream(stage)
    prev_fp = manifest["stages"][prev]["fingerprint"] if prev else None
    options = {k: getattr(config, k) for k in STAGE_OPTIONS[stage]}
    for name, old in (("doc_align", "none"), ("tokenizer_sample_mb", 256)):
        if options.get(name) == old:
            del options[name]  # the behaviour before the option existed: datasets prepared then stay up to date
    return fingerprint(stage, options, prev_fp, extra)


def run_stage(stage: str, root: Path, config: PrepareConfig, world: World,
              work: Callable[[StageContext], dict[str, Any]], *, extra_fingerprint: Any = None,
              force: bool = False) -> bool:
    """Run `work` unless the stage is done with the same fingerprint. Returns whether it ran.

    Redoing a stage clears the done flag of every later stage first: their outputs were made from the old ones.
    A stage that fails before it changed any output (bad input found by its first checks: an empty --input, too
    little text) puts the manifest back byte for byte: a refused run must not undo a finished dataset.
    """
    manifest = load_manifest(root, required=stage != "tokenize")
    prev = upstream(stage)
    if prev:
        require_stage(manifest, prev, root=root, needed_by=stage)
    fp = stage_fingerprint(stage, config, manifest, extra_fingerprint)
    record = manifest["stages"].get(stage, {})
    if record.get("done") and record.get("fingerprint") == fp and not force:
        if world.is_main:
            print(f"[{stage}] up to date (fingerprint {fp[:12]}), skipped", flush=True)
        return False
    world.barrier()  # every rank has read the manifest before rank 0 changes it
    before = kept = None
    if world.is_main:
        before = outputs_signature(root)
        kept = (root / "manifest.json").read_bytes() if (root / "manifest.json").is_file() else None
        for later in STAGES[STAGES.index(stage):]:
            manifest["stages"].setdefault(later, {})["done"] = False
        manifest["config"] = config.to_dict()
        save_manifest(root, manifest)
    start = time.perf_counter()
    ctx = StageContext(root=root, config=config, world=world, manifest=manifest, fingerprint=fp)
    error: BaseException | None = None
    counts: dict[str, Any] = {}
    try:
        counts = work(ctx) or {}
    except Exception as e:  # noqa: BLE001 - reported by every rank below, re-raised on this one
        error = e
    first = world.gather_errors(error)
    if first is not None and world.is_main and outputs_signature(root) == before:
        restore_manifest(root, kept)
    if error is not None:
        raise error
    if first is not None:
        raise PrepError(f"stage {stage!r} failed on another rank: {first}")
    wall = time.perf_counter() - start
    if world.is_main:
        manifest = load_manifest(root)
        manifest.update(ctx.facts)
        manifest["stages"][stage] = {"done": True, "fingerprint": fp, "wall_time_s": round(wall, 3),
                                     "counts": counts}
        save_manifest(root, manifest)
        print(f"[{stage}] done in {wall:.1f}s: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    world.barrier()
    return True


def outputs_signature(root: Path) -> set[tuple[str, int, int, int]]:
    """Name, inode, size and mtime of every output file of the dataset directory: the manifest and hidden work
    (temporaries, parts, the lock) left out. Stages work in hidden temporaries and publish by renaming them over
    their outputs (a new inode), so a stage that published anything changes this; one that did not can have
    its manifest put back."""
    found = set()
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if relative.name == "manifest.json" or any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            st = path.stat()
            found.add((str(relative), st.st_ino, st.st_size, st.st_mtime_ns))
    return found


def restore_manifest(root: Path, kept: bytes | None) -> None:
    """The manifest as it was before the stage started (absent if there was none)."""
    path = root / "manifest.json"
    if kept is None:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(kept)
