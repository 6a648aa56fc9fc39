"""Every torch.load of a checkpoint runs with weights_only=True: tensors, containers and a short allowlist of
DeepSpeed's own plain types, never arbitrary pickled code.

DeepSpeed loads its checkpoint files with `torch.load(..., weights_only=False)`; inside `safe_torch_load()` that
argument is overridden. `python -m retro_dist.train.safe_load MODULE ARGS...` runs a DeepSpeed tool (for example
`deepspeed.checkpoint.ds_to_universal`) under the same rule.
"""

from __future__ import annotations

import contextlib
import importlib
import runpy
import sys
from typing import Iterator

import torch

# every global found in ZeRO 0-3 checkpoints (fp32, bf16, fp16, universal) written by deepspeed 0.19
_ALLOWED = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
            "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")


def _allowed() -> list:
    found = []
    for path in _ALLOWED:
        module, name = path.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_allowed()):
            yield
    finally:
        torch.load = original


if __name__ == "__main__":
    module, sys.argv = sys.argv[1], sys.argv[1:]
    with safe_torch_load():
        runpy.run_module(module, run_name="__main__", alter_sys=True)
