"""Building a retrofit for training: the RetroConfig of its retrieval part from the dataset, the base's tokenizer
checked against the dataset's, and the model built plain or partitioned under ZeRO-3 with the base's weights read
from its own safetensors one tensor at a time (no rank ever holds the whole model)."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retro_dist.data.format import DatasetError, Layout
from retro_dist.model import RetroConfig

from .model import (RetrofitConfig, RetrofitError, RetrofitRETRO, load_base, read_base_config, retro_config,
                    settings_from_section)


def check_tokenizer(base: str | Path, dataset: str | Path) -> None:
    """The dataset must be tokenized with the base's own tokenizer: other ids mean other words to the base."""
    mine, theirs = Path(base) / "tokenizer.json", Layout(dataset).tokenizer
    if not mine.is_file():
        raise DatasetError(f"{base} has no tokenizer.json: a retrofit trains on data tokenized by the base's own "
                           f"tokenizer (save it beside the weights, then `retro-dist prepare --tokenizer` it)")
    if not theirs.is_file() or json.loads(mine.read_text()).get("model") != json.loads(theirs.read_text()).get("model"):
        raise DatasetError(f"the dataset {dataset} was tokenized with another tokenizer than the base's ({mine}): "
                           f"prepare it with `retro-dist prepare --tokenizer {mine}`")


def retrofit_model_config(section: Any, manifest: dict, dataset: str | Path) -> RetroConfig:
    """The retrieval part's RetroConfig for a run's model section: vocabulary from the base, sequence length,
    chunk size and pad id from the dataset, whose tokenizer must be the base's."""
    settings = settings_from_section(section)
    check_tokenizer(settings.base, dataset)
    base_config = read_base_config(settings.base)
    if manifest["vocab_size"] > base_config.vocab_size:
        raise DatasetError(f"the dataset's vocabulary ({manifest['vocab_size']}) is larger than the base's "
                           f"({base_config.vocab_size}): prepare it with the base's tokenizer")
    return retro_config(settings, base_config, max_seq_len=manifest["seq_len"], chunk_size=manifest["chunk_size"],
                        pad_id=manifest["pad_id"])


def retrofit_settings(section: Any) -> RetrofitConfig | None:
    return settings_from_section(section) if section.retrofit else None


def build_retrofit(settings: RetrofitConfig, config: RetroConfig, ds_config: dict[str, Any], *, seed: int,
                   activation_checkpointing: str, zero3: bool) -> RetrofitRETRO:
    """The retrofit to hand `deepspeed.initialize`. The new weights come from `seed` drawn right after the base
    exists, so they are the same however the base was made (loaded, or built empty and filled under ZeRO-3)."""
    from retro_dist.train.parallelize import apply_activation_checkpointing

    if zero3:
        import deepspeed
        from transformers import AutoModelForCausalLM

        base_config = read_base_config(settings.base)
        with torch.device("meta"):  # imports the family's modules and torch._dynamo before zero.Init patches
            AutoModelForCausalLM.from_config(base_config)  # Tensor.__new__, which torch._dynamo's polyfills refuse
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            base = AutoModelForCausalLM.from_config(base_config, dtype=torch.float32)
            torch.manual_seed(seed)
            model = RetrofitRETRO(base, settings, config)
        load_partitioned(base, Path(settings.base))
    else:
        base = load_base(settings.base)
        torch.manual_seed(seed)
        model = RetrofitRETRO(base, settings, config)
    # the project's per-block checkpointing, over the base's decoder layers and the encoder's blocks
    apply_activation_checkpointing(types.SimpleNamespace(decoder=types.SimpleNamespace(blocks=model.decoder_layers),
                                                         encoder=model.encoder), activation_checkpointing)
    if _rank() == 0:
        total, trainable = count_parameters(model)
        print(f"retrofit of {settings.base} ({model.base.config.model_type}, {config.dec_depth} layers): "
              f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable ({trainable / total:.1%}); CCA after "
              f"layers {list(config.dec_cross_attn_layers)}; base {'frozen' if settings.freeze_base else 'trained'}",
              flush=True)
    return model


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(directory.glob("*.safetensors"))


@torch.no_grad()
def load_partitioned(base: nn.Module, directory: Path) -> None:
    """Fill a base partitioned by zero.Init from its safetensors: each tensor is memory-mapped, gathered into its
    parameter on rank 0 and partitioned again, one at a time."""
    import deepspeed
    from safetensors import safe_open

    params = dict(base.named_parameters())  # tied weights appear once, under the name the checkpoint keeps
    seen: set[str] = set()
    rank = _rank()
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key not in params:
                    continue  # a tied alias (lm_head.weight) or a buffer the model computes itself
                p = params[key]
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        p.copy_(f.get_tensor(key).to(p.dtype))
                seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise RetrofitError(f"{directory}'s safetensors lack {len(missing)} of the base's weights (e.g. "
                            f"{missing[:3]}): save the base again with save_pretrained")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable), also once ZeRO-3 has partitioned them (the full size is in `ds_numel`)."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
