"""Every torch.load of a checkpoint runs with weights_only=True: tensors, containers and a short allowlist of
DeepSpeed's own plain types, never arbitrary pickled code.

DeepSpeed loads its checkpoint files with `torch.load(..., weights_only=False)`; inside `safe_torch_load()` that
argument is overridden. `python -m retro_dist.train.safe_load MODULE ARGS...` runs a DeepSpeed tool (for example
`deepspeed.checkpoint.ds_to_universal`) under the same rule.

A file that holds anything else is refused with one line naming it (UnsafeCheckpoint, a ValueError): PyTorch's own
message suggests `weights_only=False`, which would run whatever the file carries.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import runpy
import sys
from typing import Any, Iterator

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


class UnsafeCheckpoint(ValueError):
    """A checkpoint or model file holding pickled objects outside the allow-list."""


def _refusal(file: Any, error: pickle.UnpicklingError) -> UnsafeCheckpoint:
    name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else getattr(file, "name", "a checkpoint file")
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if not found:  # not a refused global: a damaged file, whose reason PyTorch gives after the advice we drop
        reason = str(error).rsplit("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0][:200]
        return UnsafeCheckpoint(f"{name} cannot be read as a checkpoint ({reason}): it is damaged or was not written "
                                f"by torch.save; write it again")
    what = f" ({found.group(1)})"
    return UnsafeCheckpoint(f"{name} holds objects outside the safe allow-list of checkpoint types{what}: retro_dist "
                            f"never unpickles arbitrary code; use a checkpoint written by retro-dist train, or re-save "
                            f"the weights as plain tensors (torch.save(model.state_dict(), path))")


def safe_load(file: Any, **kwargs: Any) -> Any:
    """torch.load of one file under the allow-list; UnsafeCheckpoint (one line) if it holds anything else."""
    with safe_torch_load():
        return torch.load(file, **kwargs)


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as e:
            raise _refusal(args[0] if args else kwargs.get("f"), e) from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(_allowed()):
            yield
    finally:
        torch.load = original


if __name__ == "__main__":
    module, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        with safe_torch_load():
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except UnsafeCheckpoint as e:  # one line: the caller reports the last line of stderr
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
