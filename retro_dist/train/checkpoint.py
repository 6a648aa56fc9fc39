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


class Checkpointer:
    def __init__(self, engine, run_dir: Path, *, keep: int):
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

    def load(self, tag: str, *, universal: bool = False) -> dict[str, Any]:
        load_tag = f"{tag}_universal" if universal else tag
        try:
            with safe_torch_load():
                _, client_state = self.engine.load_checkpoint(str(self.dir), tag=load_tag, load_module_strict=True,
                                                              load_optimizer_states=True,
                                                              load_lr_scheduler_states=False)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {self.dir / load_tag} does not fit this model ({first}); it was saved by "
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
