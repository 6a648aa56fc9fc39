"""On-disk form of a model: config.json + model.safetensors, written atomically, loaded without unpickling."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from retro_dist.atomic import atomic_path, write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(config: dict, state_dict: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Weights first, config last: a directory with a config.json always has whole weights beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text_atomic(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_pretrained(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a retro_dist model directory: {name} is missing "
                                    f"(expected {CONFIG_NAME} + {WEIGHTS_NAME}, as written by save_pretrained)")
    config = json.loads((directory / CONFIG_NAME).read_text())
    return config, load_file(str(directory / WEIGHTS_NAME), device=str(device))
