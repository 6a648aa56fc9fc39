"""`--device auto|cpu|cuda|cuda:N` for the commands that run a model in one process (eval, generate, embedding)."""

from __future__ import annotations

import torch

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """'auto' is the first GPU torch sees, else the CPU; anything else is checked against what is there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use {CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: use {CHOICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: torch sees no GPU on this machine; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this process sees {count} GPU(s) (cuda:0 to cuda:{count - 1})")
    return device
