"""`retro-dist train` in this process with NCCL's device rule enforced on a CPU machine.

NCCL takes only tensors on the rank's GPU; gloo takes anything, so a CPU test cannot see a host tensor handed to a
collective. Here every tensor that retro_dist's training and evaluation code makes with a torch factory and no
`device=` (where it lands in host memory on a GPU run) is tagged, and every collective those modules call refuses a
tagged tensor with NCCL's own message. A host tensor moved with `.to(device)` keeps its tag on CPU (the same object):
the code under test creates its collective tensors on the device instead.

    python -m tests.strict_collectives train --config ... --section.key=value ...
"""

from __future__ import annotations

import sys
import types

import torch
import torch.distributed

MODULES = ("retro_dist.train.trainer", "retro_dist.train.main", "retro_dist.train.timing", "retro_dist.evaluate")
FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "scalar_tensor")
COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all_single")


def _tagging(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        if kwargs.get("device") is None:
            t._host_default = True
        return t
    return make


def _from_numpy(array):
    t = torch.from_numpy(array)
    t._host_default = True
    return t


def _checking(collective, name):
    def call(tensor, *args, **kwargs):
        for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
            if getattr(t, "_host_default", False):
                raise RuntimeError(f"No backend type associated with device type cpu ({name} was given a tensor made "
                                   f"in host memory, not on the rank's device)")
        return collective(tensor, *args, **kwargs)
    return call


def install() -> None:
    import importlib

    fake_torch = types.ModuleType("torch_host_tagging")
    fake_torch.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
    for name in FACTORIES:
        setattr(fake_torch, name, _tagging(getattr(torch, name)))
    fake_torch.from_numpy = _from_numpy
    fake_dist = types.ModuleType("dist_device_checking")
    fake_dist.__dict__.update({k: v for k, v in vars(torch.distributed).items() if not k.startswith("__")})
    for name in COLLECTIVES:
        setattr(fake_dist, name, _checking(getattr(torch.distributed, name), name))
    fake_torch.distributed = fake_dist
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        if hasattr(module, "torch"):
            module.torch = fake_torch
        if hasattr(module, "dist"):
            module.dist = fake_dist


if __name__ == "__main__":
    install()
    from retro_dist.cli import main
    sys.exit(main(sys.argv[1:]))
