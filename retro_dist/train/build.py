"""Builds the model that training wraps: the one place that seeds it, partitions it as it is created under ZeRO-3,
applies activation checkpointing, and counts its parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from retro_dist.model import RETRO, RetroConfig

from .parallelize import apply_activation_checkpointing


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_model(config: RetroConfig, ds_config: dict[str, Any], *, seed: int,
                activation_checkpointing: str, retrofit: Any = None) -> tuple[RETRO, int]:
    """The model to hand `deepspeed.initialize`, and its parameter count.

    Under ZeRO stage 3 it is built inside `deepspeed.zero.Init` (from the resolved ds_config, so precision and
    offload agree with the engine): each module's parameters are partitioned over the ranks as soon as that module
    exists, so no rank ever holds the whole model. Every rank seeds the same generator and zero.Init keeps rank 0's
    values, and the DeepNet init runs through `Module.apply`, which zero.Init gathers one module at a time: the
    initial weights are those of a plain build, whatever the number of ranks. On a GPU zero.Init creates the
    parameters on the device, whose generator draws other numbers than the CPU's: the same on every world size
    still, but not the ZeRO 0-2 weights."""
    if retrofit is not None:  # a RetrofitConfig: a transformers base with retrieval added (retro_dist/retrofit)
        from retro_dist.retrofit.build import build_retrofit
        model = build_retrofit(retrofit, config, ds_config, seed=seed, zero3=zero_stage(ds_config) == 3,
                               activation_checkpointing=activation_checkpointing)
        return model, parameter_count(model)
    torch.manual_seed(seed)  # the same initial weights on every rank
    if zero_stage(ds_config) == 3:
        import deepspeed
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = RETRO(config)
    else:
        model = RETRO(config)
    apply_activation_checkpointing(model, activation_checkpointing)
    return model, parameter_count(model)


def parameter_count(model: nn.Module) -> int:
    """Parameters of the whole model, also once ZeRO-3 has partitioned them: a partitioned parameter's own tensor is
    an empty placeholder, and its full size is kept in `ds_numel`."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
