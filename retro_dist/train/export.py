"""`retro-dist export` (a checkpoint of any ZeRO stage -> one model directory) and `retro-dist eval`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from retro_dist.data.format import Layout, load_manifest
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


@torch.no_grad()
def evaluate(model_dir: str | Path, dataset: str | Path, *, split: str = "val", batch_size: int = 4,
             max_batches: int = 0) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over `split`, with retrieval and with retrieval off; `gain` is
    1 - ppl / ppl_no_retrieval, how much retrieval lowers perplexity."""
    from retro_dist.data.loader import RetroLoader, check_compatible

    model = RETRO.from_pretrained(model_dir).float().eval()
    check_compatible(load_manifest(dataset), model.config)
    loader = RetroLoader(dataset, split, batch_size=batch_size, rank=0, world_size=1)
    on = off = 0.0
    tokens = batches = 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        n = int((batch["tokens"][:, 1:] != model.config.pad_id).sum())  # the labels the mean loss is over
        on += model(batch["tokens"], batch["retrieved"], return_loss=True).item() * n
        off += model(batch["tokens"], None, return_loss=True).item() * n
        tokens += n
        batches += 1
    on, off = on / tokens, off / tokens
    return {"loss": on, "ppl": math.exp(on), "loss_no_retrieval": off, "ppl_no_retrieval": math.exp(off),
            "gain": 1 - math.exp(on - off), "batches": batches, "tokens": tokens}
