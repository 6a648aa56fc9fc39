"""The DeepSpeed config actually used: engine settings from ds_configs/, everything else from the run config.

The batch arithmetic lives here and only here: micro_batch x accumulation x data-parallel size = global batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retro_dist.config import RunConfig

# the package's copy of the top-level ds_configs/ (a symlink in a checkout, real files in the wheel): found the same
# way in a checkout, an editable install and `pip install .`
DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
# keys the run config owns: a ds_config that sets them would make a value live in two files
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
              "scheduler", "bf16", "fp16", "gradient_clipping")


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    accumulation: int
    world_size: int
    streams: int = 0
    """Canonical loader streams (retro_dist.data.loader): fixed when a run starts, they fix the global order."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size


def batch_plan(global_batch: int, micro_batch: int, world_size: int) -> BatchPlan:
    """micro_batch x accumulation x world_size = global batch, with the loader's default canonical streams for it
    (a resumed run's loader keeps the count its checkpoint recorded). Bad numbers are one line naming the ones that
    work."""
    from retro_dist.data.loader import check_streams, default_streams  # the loader owns the stream rules

    per_step = micro_batch * world_size
    if global_batch == 0:
        global_batch = per_step
    if global_batch % per_step:
        share = [b for b in range(1, global_batch + 1) if global_batch % (b * world_size) == 0]
        raise ValueError(f"train.global_batch={global_batch} is not a multiple of data.micro_batch={micro_batch} x "
                         f"{world_size} ranks = {per_step}; pick a global batch that is, or a micro batch of "
                         f"{', '.join(map(str, share)) or 'none: use fewer ranks'}")
    streams = default_streams(global_batch, world_size)
    check_streams(global_batch, streams, world_size, micro_batch)
    return BatchPlan(micro_batch, global_batch // per_step, world_size, streams)


def engine_settings(run: RunConfig) -> dict[str, Any]:
    """The engine-only JSON of ds_configs/ (or train.ds_config), checked: fails with one line on a bad file."""
    path = Path(run.train.ds_config) if run.train.ds_config else DS_CONFIGS / f"zero{run.train.zero_stage}.json"
    if not path.is_file():
        raise ValueError(f"DeepSpeed config {path} does not exist")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    owned = [k for k in OWNED_KEYS if k in settings]
    if owned:
        raise ValueError(f"{path} sets {', '.join(owned)}: those come from the run config (data.micro_batch, "
                         f"train.global_batch, optim.*, train.precision); keep engine settings only in ds_configs")
    stage = settings.get("zero_optimization", {}).get("stage", 0)
    if run.train.ds_config and stage != run.train.zero_stage:
        raise ValueError(f"{path} is ZeRO stage {stage} but train.zero_stage={run.train.zero_stage}: make them agree")
    return settings


def build_ds_config(run: RunConfig, settings: dict[str, Any], plan: BatchPlan, precision: str, *,
                    load_universal: bool = False) -> dict[str, Any]:
    zero = settings.get("zero_optimization", {})
    offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
    optimizer_params: dict[str, Any] = {"lr": run.optim.lr, "betas": list(run.optim.betas), "eps": run.optim.eps,
                                        "weight_decay": run.optim.weight_decay}
    if not offload:
        optimizer_params["torch_adam"] = True  # torch's AdamW: no JIT-built fused kernel needed, same updates
    config = {
        **settings,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": run.optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 200},
    }
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    return config
