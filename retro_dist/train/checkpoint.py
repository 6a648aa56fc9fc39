"""One checkpointer: DeepSpeed checkpoints under RUN/checkpoints/, whole or absent, newest K kept.

A save writes the engine's files into `step_NNNNNNNN/` (DeepSpeed's own `latest` is not written), waits for every
rank, then rank 0 writes `step_NNNNNNNN/meta.json` (the completion mark: step, world size, ZeRO stage) and replaces
`latest` atomically. A kill at any point leaves `latest` naming the previous whole checkpoint. Everything that is not
the engine's (step, loader state, run config, dataset fingerprint) travels in DeepSpeed's client_state.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from retro_dist.atomic import write_text_atomic

from .safe_load import safe_torch_load

META = "meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_whole(directory: Path) -> bool:
    return (directory / META).is_file()


def newest_whole(checkpoints: Path) -> str | None:
    """The tag `latest` names if whole, else the newest whole one (a crash can leave a newer partial directory)."""
    latest = checkpoints / "latest"
    if latest.is_file() and is_whole(checkpoints / latest.read_text().strip()):
        return latest.read_text().strip()
    whole = sorted(p.name for p in checkpoints.glob("step_*") if p.is_dir() and is_whole(p)
                   and not p.name.endswith("_universal"))
    return whole[-1] if whole else None


def read_meta(checkpoints: Path, tag: str) -> dict[str, Any]:
    """The completion mark of `tag`; one line if the step has no checkpoint at all, another if it is partial."""
    path = checkpoints / tag / META
    if not (checkpoints / tag).is_dir():
        steps = sorted(int(p.name.removeprefix("step_")) for p in checkpoints.glob("step_*")
                       if p.name.removeprefix("step_").isdigit() and is_whole(p))
        available = ", ".join(map(str, steps)) if steps else "none"
        step = tag.removeprefix("step_").lstrip("0") or "0"
        raise ValueError(f"checkpoint step {step} does not exist in {checkpoints} (available steps: {available}); "
                         f"pass one of them")
    if not path.is_file():
        raise ValueError(f"checkpoint {checkpoints / tag} is not whole (no {META}): it was interrupted while saving; "
                         f"resume from another tag or use --checkpoint.resume=auto")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ResumePoint:
    tag: str
    universal: bool  # saved by another world size: loaded through DeepSpeed's universal checkpoint
    made: tuple[Path, ...] = ()  # what the universal conversion added: removed again if the resume is refused


class Checkpointer:
    """Saves and resumes the engine (attached once built: `checkpointer.engine = engine`); owns which checkpoint a
    run resumes from, the universal conversion a world-size change needs, and its cleanup when a resume is refused."""

    def __init__(self, run_dir: Path, *, keep: int, engine=None):
        self.engine, self.dir, self.keep = engine, Path(run_dir) / "checkpoints", keep
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def save(self, step: int, client_state: dict[str, Any]) -> str:
        tag = tag_for(step)
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            meta = {"step": step, "world_size": dist.get_world_size(),
                    "zero_stage": self.engine.zero_optimization_stage()}
            write_text_atomic(self.dir / tag / META, json.dumps(meta) + "\n")
            write_text_atomic(self.dir / "latest", tag)
            self._prune(keep_tag=tag)
        dist.barrier()
        return tag

    def target(self, mode: str) -> str | None:
        """The tag `checkpoint.resume` names: none, the newest whole one (auto), or a given tag that must be whole."""
        if mode == "none":
            return None
        if mode == "auto":
            return newest_whole(self.dir) if self.dir.is_dir() else None
        tag = tag_for(int(mode)) if mode.isdigit() else mode
        read_meta(self.dir, tag)
        return tag

    def prepare_resume(self, mode: str, world_size: int, *, timeout_s: float) -> ResumePoint | None:
        """Where this run resumes, before the engine exists (the engine's config depends on it). A checkpoint saved by
        another world size is converted to DeepSpeed's universal format by rank 0 while the other ranks wait on the
        file system, not in a collective: a collective would hit the process group's timeout (and NCCL's watchdog
        would kill every rank) on a large model, whose conversion takes longer."""
        tag = self.target(mode)
        if tag is None:
            return None
        meta = read_meta(self.dir, tag)
        if meta["world_size"] == world_size:
            return ResumePoint(tag, universal=False)
        out, failed = self.dir / f"{tag}_universal", self.dir / f"{tag}_universal.failed"
        made: tuple[Path, ...] = ()
        if not (out / META).is_file():  # DeepSpeed's converter also writes its `latest_universal` pointer
            made = tuple(p for p in (out, out.with_name("latest_universal")) if not p.exists())
        if self.rank == 0:
            failed.unlink(missing_ok=True)
        dist.barrier()  # no rank reads a failure mark left by an earlier attempt
        if self.rank == 0:
            print(f"resuming {tag} (saved by {meta['world_size']} ranks) on {world_size} ranks through DeepSpeed's "
                  f"universal checkpoint", flush=True)
            try:
                convert_to_universal(self.dir, tag, zero_stage=meta["zero_stage"])
            except ValueError as e:
                remove_paths(made)
                write_text_atomic(failed, str(e))
                raise
        else:
            budget = timeout_s + directory_bytes(self.dir / tag) / CONVERT_BYTES_PER_S
            wait_for_conversion(out / META, failed, budget)
        dist.barrier()
        return ResumePoint(tag, universal=True, made=made)

    def resume(self, point: ResumePoint, restore) -> None:
        """Load `point` into the engine and hand its client state to `restore`; a refusal (another model shape,
        another dataset) removes what the universal conversion added and leaves the run as it was."""
        try:
            restore(self.load(point.tag, universal=point.universal))
        except ValueError:  # every rank refuses here alike
            dist.barrier()  # no rank still reads the universal copy
            if self.rank == 0:
                remove_paths(list(point.made))
            raise

    def load(self, tag: str, *, universal: bool = False) -> dict[str, Any]:
        load_tag = f"{tag}_universal" if universal else tag
        try:
            with safe_torch_load():
                _, client_state = self.engine.load_checkpoint(str(self.dir), tag=load_tag, load_module_strict=True,
                                                              load_optimizer_states=True,
                                                              load_lr_scheduler_states=False)
        except RuntimeError as e:
            # torch names the missing and unexpected weights on the lines after its first: one line, cut short
            detail = " ".join(str(e).split()) or type(e).__name__
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            raise ValueError(f"checkpoint {self.dir / load_tag} does not fit this model ({detail}); it was saved by "
                             f"another model shape: start a new run directory or fix model.*") from None
        if client_state is None:
            raise ValueError(f"checkpoint {self.dir / load_tag} could not be loaded")
        return client_state

    def _prune(self, keep_tag: str) -> None:
        whole = sorted(p for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith("_universal"))
        doomed = [p for p in whole if is_whole(p)][: -self.keep] + [p for p in whole if not is_whole(p)]
        for path in doomed:
            if path.name != keep_tag:
                shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(path.with_name(path.name + "_universal"), ignore_errors=True)


# a pessimistic conversion rate (DeepSpeed's converter with one extract and one merge worker reads every shard, then
# writes one file per parameter): the other ranks wait this long per byte of checkpoint, on top of the group timeout
CONVERT_BYTES_PER_S = 20e6


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def wait_for_conversion(done: Path, failed: Path, budget_s: float) -> None:
    """Poll for rank 0's conversion: its completion mark, or the one line it failed with."""
    deadline = time.monotonic() + budget_s
    while not done.is_file():
        if failed.is_file():
            raise ValueError(failed.read_text().strip())
        if time.monotonic() > deadline:
            raise ValueError(f"rank 0 did not finish converting to {done.parent} within {budget_s:.0f}s: look at "
                             f"rank 0's output; raise train.dist_timeout_s if the checkpoint is very large")
        time.sleep(1.0)


def remove_paths(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def convert_to_universal(checkpoints: Path, tag: str, *, zero_stage: int) -> None:
    """DeepSpeed's universal checkpoint of `tag`, for resuming on another world size (rank 0 calls this)."""
    out = checkpoints / f"{tag}_universal"
    if (out / "zero").is_dir() and (out / META).is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "retro_dist.train.safe_load", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoints / tag),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if zero_stage < 3:
        cmd.append("--inject_missing_state")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"
        raise ValueError(f"could not convert {checkpoints / tag} to a universal checkpoint ({tail})")
    shutil.copy(checkpoints / tag / META, out / META)
