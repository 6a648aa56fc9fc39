"""`retro-dist export`: a checkpoint of any ZeRO stage -> one model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from retro_dist.data.format import Layout
from retro_dist.model import RETRO, RetroConfig

from .checkpoint import newest_whole, read_meta, tag_for
from .safe_load import safe_torch_load

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def consolidated_state_dict(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights through DeepSpeed's own consolidation (ZeRO 1-3, and stage 0 with bf16's partitioned
    optimizer); a plain stage-0 checkpoint holds the whole module already."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_torch_load():
        if any((checkpoints / tag).glob("*zero_pp_rank_*")):
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
        states = torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", map_location="cpu")
    return {k: v.float() for k, v in states["module"].items()}


def export(run_dir: str | Path, out: str | Path, *, step: int | None = None, dtype: str = "fp32") -> Path:
    run_dir, out = Path(run_dir), Path(out)
    checkpoints = run_dir / "checkpoints"
    tag = tag_for(step) if step is not None else (newest_whole(checkpoints) if checkpoints.is_dir() else None)
    if tag is None:
        raise ValueError(f"{run_dir} has no whole checkpoint to export (looked in {checkpoints})")
    read_meta(checkpoints, tag)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} is missing: {run_dir} is not a retro-dist run directory")
    run_config = json.loads(config_path.read_text())
    config = RetroConfig.from_dict(run_config["resolved"]["model"])
    state = consolidated_state_dict(checkpoints, tag)
    model = RETRO(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {tag} does not match the run's model config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.to(DTYPES[dtype]).save_pretrained(out)
    tokenizer = Layout(run_config["data"]["dataset"]).tokenizer
    if tokenizer.is_file():
        shutil.copy(tokenizer, out / "tokenizer.json")
    return out
