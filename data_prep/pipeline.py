"""`retro-dist prepare` / `python -m data_prep`: run the staged pipeline, or some of its stages, on a dataset directory.

    retro-dist prepare --input corpus/ --out data/mycorpus               # all stages, sensible defaults
    retro-dist prepare --stage embed --out data/mycorpus --embedder hash-256
    mpirun -n 4 retro-dist prepare --input corpus/ --out data/mycorpus   # every stage split across 4 ranks

Every stage skips itself when its inputs and options are unchanged, and redoes itself (and invalidates the stages
after it) when they changed. Options not given keep the values the dataset was prepared with.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
from pathlib import Path

from retro_dist.console import error_line, stderr_line
from retro_dist.data.format import STAGES, DatasetError, file_sha256, load_manifest
from retro_dist.lock import DirectoryLock, LockHeld, hold_directory, pid_alive

from . import config as config_mod
from .parallel import PrepError
from . import embed, index, neighbors, shard, tokenize
from .parallel import World
from .readers import inputs_fingerprint
from .stage import run_stage

RUNS = {"tokenize": tokenize.run, "embed": embed.run, "index": index.run, "neighbors": neighbors.run,
        "shard": shard.run}  # the stages, in order (retro_dist.data.format.STAGES)
assert tuple(RUNS) == STAGES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retro-dist prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prepare_arguments(parser)
    return parser


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the dataset directory (created if missing)")
    parser.add_argument("--stage", choices=STAGES, action="append",
                        help="run only this stage (repeatable); default: all, in order")
    parser.add_argument("--force", action="store_true", help="redo the stages even when up to date")
    config_mod.add_arguments(parser)


def run(args: argparse.Namespace, stages: list[str]) -> None:
    root = Path(args.out)
    world = World()
    lock = lock_dataset(root, world)
    try:
        _run_stages(root, world, args, stages)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(root: Path, world: World, args: argparse.Namespace, stages: list[str]) -> None:
    _set_threads(world)
    stored = load_manifest(root, required=False).get("config")
    config = config_mod.resolve(stored, args)
    for stage in stages:
        extra = None
        if stage == "tokenize":
            if not config.inputs:
                raise DatasetError("no input: pass --input PATH... (text files, JSON-lines files or directories)")
            extra = (inputs_fingerprint(config.inputs), file_sha256(config.tokenizer) if config.tokenizer
                     and Path(config.tokenizer).is_file() else None)
        run_stage(stage, root, config, world, RUNS[stage], extra_fingerprint=extra, force=args.force)


def lock_dataset(root: Path, world: World) -> DirectoryLock | None:
    """Rank 0 takes the dataset directory's lock before anything is written and, holding it, removes what killed
    runs left; every rank learns the outcome, so all of them refuse with the same line."""
    lock, refusal = None, None
    if world.is_main:
        try:
            lock = hold_directory(root, "prepare")
            remove_stale_temporaries(root)
        except LockHeld as e:
            refusal = str(e)
    refusal = world.bcast(refusal)
    if refusal is not None:
        raise LockHeld(refusal)
    return lock


def remove_stale_temporaries(root: Path) -> None:
    """What killed runs left: shard's swap directories (named by fingerprint, never reused by a rerun with other
    options) and atomic writers' `.NAME.tmp-PID` files of dead processes. Only called under the dataset lock, so no
    other prepare is writing here; a temporary of a live pid is kept anyway (a pid is reused only after its end)."""
    for path in [*root.glob(".shards.tmp-*"), *root.glob(".shards.old-*")]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.rglob(".*.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _set_threads(world: World) -> None:
    """Ranks on one node share its cores: one torch/faiss/tokenizers thread pool per rank, sized to its share."""
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", world.size)))
    threads = max(1, (os.cpu_count() or 1) // max(1, local))
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's (or the launcher's) choice wins
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    for name in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):  # the tokenizers library's pool, read when first used
        os.environ.setdefault(name, str(threads))
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        pass
    import faiss
    faiss.omp_set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args, args.stage or list(STAGES))


def run_cli(args: argparse.Namespace, stages: list[str]) -> int:
    try:
        run(args, stages)
    except (DatasetError, ValueError, FileNotFoundError, PrepError, LockHeld) as e:
        error_line("retro-dist prepare", e)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:
            error_line("retro-dist prepare", f"disk full while writing {e.filename or args.out}: free space and "
                       f"re-run; finished stages and finished blocks are kept")
            return 2
        raise
    except KeyboardInterrupt:
        stderr_line("retro-dist prepare: interrupted; re-run the same command to resume")
        return 130
    return 0

