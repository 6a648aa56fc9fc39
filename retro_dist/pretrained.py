"""On-disk form of a model: config.json + safetensors weights, written atomically, loaded without unpickling.

Two forms, the convention every model hub tool reads:
  - `model.safetensors`, one file, when the weights fit under the shard size;
  - `model-00001-of-0000N.safetensors` ... + `model.safetensors.index.json` ({"metadata": {"total_size": bytes},
    "weight_map": {name: file}}) above it.
Weights are streamed: `write_weights` takes the tensors one at a time, in a plan fixed up front (names, shapes,
dtype), and writes each file's safetensors header first and its bytes as they come, so a writer never holds more
than the tensor in hand. config.json is written last: a directory with a config.json always has whole weights.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file

from retro_dist.atomic import atomic_path, write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
DEFAULT_MAX_SHARD_SIZE = 2 * 10**9  # the hub's convention, in decimal bytes

# safetensors' dtype names (the format's spec); the weights of this project use the first three
_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Consecutive tensors packed greedily under `max_shard_size` bytes; a larger tensor sits alone in its shard."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    """The safetensors header: u64 length, then JSON padded with spaces to 8 bytes so the data stays aligned."""
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        entries[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_weights(directory: Path, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]], *,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write `tensors` (given in the order of `specs`, each matching its spec) as one file or as shards + index;
    each file atomically. Returns the names written."""
    shards = plan_shards(specs, max_shard_size)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [shard_name(i, len(shards)) for i in range(len(shards))]
    stream = iter(tensors)
    for name, shard in zip(names, shards):
        with atomic_path(directory / name) as tmp, open(tmp, "wb") as f:
            f.write(_header(shard))
            for spec in shard:
                got_name, t = next(stream)
                if got_name != spec.name or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                    raise RuntimeError(f"tensor {got_name} {tuple(t.shape)} {t.dtype} does not follow the plan "
                                       f"({spec.name} {spec.shape} {spec.dtype})")
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t  # not held while the stream makes the next one
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard}}
        write_text_atomic(directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        names.append(INDEX_NAME)
    return names


def weight_files(directory: Path) -> list[Path]:
    """Every weights file of either form in `directory` (what a new export replaces)."""
    return sorted(p for p in directory.glob("*.safetensors*")
                  if p.name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_PATTERN.match(p.name))


def save_pretrained(config: dict, state_dict: dict[str, torch.Tensor], directory: str | Path, *,
                    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Weights first, config last: a directory with a config.json always has whole weights beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state_dict.items()]
    written = write_weights(directory, specs, state_dict.items(), max_shard_size=max_shard_size)
    for stale in weight_files(directory):
        if stale.name not in written:  # the other form, left by an earlier save
            stale.unlink()
    write_text_atomic(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_pretrained(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """config dict + state dict from either form (one file, or shards named by the index)."""
    directory = Path(directory)
    form = INDEX_NAME if (directory / INDEX_NAME).is_file() else WEIGHTS_NAME
    for name in (CONFIG_NAME, form):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a retro_dist model directory: {name} is missing "
                                    f"(expected {CONFIG_NAME} + {WEIGHTS_NAME} or {INDEX_NAME} with its shards, "
                                    f"as written by save_pretrained or retro-dist export)")
    config = json.loads((directory / CONFIG_NAME).read_text())
    if form == WEIGHTS_NAME:
        return config, load_file(str(directory / WEIGHTS_NAME), device=str(device))
    weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory / INDEX_NAME} names shard {missing[0]}, which is missing "
                                f"({len(missing)} of {len(shards)} shards missing): copy the whole model directory "
                                f"or export it again")
    state: dict[str, torch.Tensor] = {}
    for name in shards:
        state.update(load_file(str(directory / name), device=str(device)))
    if set(state) != set(weight_map):
        raise ValueError(f"{directory}: the shards hold other tensors than {INDEX_NAME} names "
                         f"(e.g. {sorted(set(state) ^ set(weight_map))[:3]}): export the model again")
    return config, state


def load_model(directory: str | Path, **options) -> torch.nn.Module:
    """The model an exported directory holds: RETRO, or a retrofit (config.json with a `retrofit` section: a
    transformers base in DIR/base with retrieval added)."""
    from retro_dist.retrofit.model import RetrofitRETRO, is_retrofit_dir
    if is_retrofit_dir(directory):
        return RetrofitRETRO.from_pretrained(directory, **options)
    from retro_dist.model import RETRO
    return RETRO.from_pretrained(directory, **options)
