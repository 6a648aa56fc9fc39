"""`retro-dist export`: a checkpoint of any ZeRO stage -> one model directory, streamed.

The fp32 master weights are read from the ZeRO partitions a batch of parameters at a time (READ_BATCH_BYTES): each
rank's optimizer file is memory-mapped (`torch.load(mmap=True)`, weights only), the batch's slices copied out, and the
mapping dropped before the next rank's, and after every READ_BATCH_BYTES copied under it (touched pages of a mapping
count in the process's RSS while it is mapped, so one large parameter would otherwise cost twice its size).
The Adam moments in the same files are never touched. Each consolidated tensor is converted to the export dtype and
written straight into its safetensors file, so the peak is about one batch, not the model (DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` holds the whole fp32 model plus every rank's flat groups).

On-disk layout (DeepSpeed 0.19, as its `deepspeed/utils/zero_to_fp32.py` reads it):
  - `*_model_states.pt` (rank 0's): `param_shapes` (one ordered {name: shape} per parameter group), `buffer_names`
    with the buffers in `module`, `shared_params` ({alias: source}).
  - `*zero_pp_rank_R_mp_rank_00_optim_states.pt`, one per rank R, under `optimizer_state_dict`:
    ZeRO 1/2 (and stage 0 under bf16's partitioned optimizer): `single_partition_of_fp32_groups[g]` is rank R's
    equal slice of group g's flat vector (the ranks' slices concatenated in rank order); inside that vector the
    parameters lie in `param_shapes[g]` order, each followed by its `param_alignment_paddings[g][i]`.
    ZeRO 3: every parameter is split on its own into ceil(numel / N) elements per rank (the last padded);
    `fp32_flat_groups` of rank R concatenates rank R's pieces of every parameter in `param_shapes` order.
  - a plain stage-0 checkpoint has no partitions: `mp_rank_00_model_states.pt`'s `module` is the whole model, and
    under bf16/fp16 its `optimizer.fp32_groups` holds the fp32 masters.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from retro_dist.atomic import fsync_path, write_text_atomic
from retro_dist.data.format import Layout
from retro_dist.model import RETRO, RetroConfig
from retro_dist.pretrained import (CONFIG_NAME, DEFAULT_MAX_SHARD_SIZE, TensorSpec, weight_files, write_weights)

from .checkpoint import newest_whole, read_meta, tag_for
from .safe_load import safe_torch_load

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
READ_BATCH_BYTES = 64 * 2**20  # fp32 bytes consolidated per pass over the ranks' files
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _load(path: Path) -> dict:
    """A checkpoint file mapped, not read: tensors are views of the file, paged in only where they are touched."""
    with safe_torch_load():
        return torch.load(path, map_location="cpu", mmap=True)


@dataclass
class _Piece:
    """`length` elements of rank `rank`'s flat group `group` from `start`, landing at `dest` in the parameter."""
    rank: int
    group: int
    start: int
    length: int
    dest: int


@dataclass
class Partitions:
    """Where every tensor of a checkpoint lies; `read` consolidates a few of them."""
    directory: Path
    shapes: dict[str, tuple[int, ...]]  # output order: parameters, then buffers and shared aliases
    files: list[Path] = field(default_factory=list)  # rank R's optimizer file at R; empty for a plain stage 0
    groups_key: str = ""
    pieces: dict[str, list[_Piece]] = field(default_factory=dict)
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)  # buffers of a ZeRO checkpoint, read once
    model_file: Path | None = None  # plain stage 0: the tensors in `whole` are read from here, a batch at a time
    whole: dict[str, tuple] = field(default_factory=dict)  # name -> its keys inside model_file's dict

    def is_floating(self, name: str) -> bool:
        return name in self.pieces or name in self.whole or self.fixed[name].is_floating_point()

    @torch.no_grad()  # the saved groups require grad: a copy under autograd would keep every mapping alive
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """fp32 copies of `names` (buffers keep their dtype), mapping one rank's file at a time."""
        out = {n: torch.empty(math.prod(self.shapes[n]), dtype=torch.float32) for n in names if n in self.pieces}
        step = max(1, READ_BATCH_BYTES // 4)  # elements copied under one mapping, so a large parameter is too
        for rank in sorted({p.rank for n in out for p in self.pieces[n]}):
            groups, mapped = None, 0
            for name, flat in out.items():
                for p in self.pieces[name]:
                    for lo in range(0, p.length if p.rank == rank else 0, step):
                        n = min(step, p.length - lo)
                        if groups is None or mapped + n > step:
                            groups = None  # unmap the touched pages before mapping afresh
                            groups, mapped = _load(self.files[rank])["optimizer_state_dict"][self.groups_key], 0
                        flat[p.dest + lo:p.dest + lo + n] = groups[p.group][p.start + lo:p.start + lo + n]
                        mapped += n
            del groups  # unmaps the file before the next rank's
        result = {n: out[n].view(self.shapes[n]) for n in out}
        wanted = [n for n in names if n in self.whole]
        states = _load(self.model_file) if wanted else None
        for name in wanted:
            t = states
            for key in self.whole[name]:
                t = t[key]
            t = t.reshape(self.shapes[name])  # a slice of a flat group has the parameter's shape
            result[name] = t.to(torch.float32 if t.is_floating_point() else t.dtype, copy=True)
        del states  # unmapped: its touched pages leave the RSS
        for name in names:
            if name not in result:
                result[name] = self.fixed[name]
        return result


def open_checkpoint(directory: Path, config: RetroConfig) -> Partitions:
    """Locate every tensor of a whole checkpoint directory without reading any weights."""
    optim = {int(m.group(1)): p for p in directory.glob("*zero_pp_rank_*_optim_states.pt")
             if (m := _OPTIM_FILE.search(p.name))}
    if not optim:
        return _open_stage0(directory, config)
    head = _load(optim[min(optim)])["optimizer_state_dict"]
    stage = int(head.get("zero_stage", 1))  # bf16's stage-0 optimizer writes no stage: its layout is ZeRO 1's
    count = head["partition_count"]
    world = max(count) if isinstance(count, list) else int(count)
    if sorted(optim) != list(range(world)):
        lacking = sorted(set(range(world)) - set(optim))
        raise ValueError(f"checkpoint {directory} is incomplete: it was saved by {world} ranks but the optimizer "
                         f"partitions of ranks {lacking or sorted(optim)} are missing or extra; export another step")
    groups_key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    sizes = [t.numel() for t in head[groups_key]]
    paddings = head.get("param_alignment_paddings")
    del head
    model_file = directory / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3
                              else "mp_rank_00_model_states.pt")
    states = _load(model_file)
    param_shapes = [{k: tuple(v) for k, v in g.items()} for g in states["param_shapes"]]
    fixed = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in states["module"].items()
             if k in states["buffer_names"]}
    shared = dict(states.get("shared_params") or {})
    del states
    pieces = _pieces_zero3(param_shapes, sizes, world) if stage == 3 else _pieces_zero12(param_shapes, sizes,
                                                                                           world, paddings)
    shapes = {name: shape for g in param_shapes for name, shape in g.items()}
    shapes.update({k: tuple(v.shape) for k, v in fixed.items()})
    for alias, source in shared.items():  # tied weights: the alias is written as a copy of its source
        if source in pieces:
            pieces[alias], shapes[alias] = pieces[source], shapes[source]
    return Partitions(directory, shapes, [optim[r] for r in range(world)], groups_key, pieces, fixed)


def _open_stage0(directory: Path, config: RetroConfig) -> Partitions:
    """Plain stage 0: the module is the model. Under bf16 or fp16 the module holds 16-bit weights and the fp32
    masters are the optimizer's `fp32_groups` (one list per parameter group, in the group's order; bf16, and fp16's
    unfused optimizer) or `fp32_groups_flat` (one flat tensor per group: fp16's fused optimizer); the groups are the
    trainer's `param_groups` of the model, rebuilt on the meta device to name them."""
    from .parallelize import param_groups

    model_file = directory / "mp_rank_00_model_states.pt"
    states = _load(model_file)
    module = states["module"]
    shapes = {k: tuple(v.shape) for k, v in module.items()}
    whole = {k: ("module", k) for k in module}
    optimizer = states.get("optimizer") or {}
    masters, flat = optimizer.get("fp32_groups"), optimizer.get("fp32_groups_flat")
    if masters is not None or flat is not None:
        with torch.device("meta"):
            model = RETRO(config)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
        if masters is not None:
            fits = [len(g) for g in groups] == [len(g) for g in masters] and all(
                shapes.get(n) == tuple(t.shape) for g, ts in zip(groups, masters) for n, t in zip(g, ts))
            whole.update({n: ("optimizer", "fp32_groups", gi, i) for gi, g in enumerate(groups)
                          for i, n in enumerate(g)})
        else:  # one flat tensor per group: the group's parameters one after another
            sizes = [[math.prod(shapes.get(n, (-1,))) for n in g] for g in groups]
            fits = [sum(z) for z in sizes] == [t.numel() for t in flat]
            for gi, (g, z) in enumerate(zip(groups, sizes)):
                for n, start, numel in zip(g, itertools.accumulate([0, *z]), z):
                    whole[n] = ("optimizer", "fp32_groups_flat", gi, slice(start, start + numel))
        if not fits:
            raise ValueError(f"checkpoint {directory}: the optimizer's fp32 master weights do not follow the "
                             f"model's parameter groups; it was saved by another model shape")
    del states, module, optimizer, masters, flat
    return Partitions(directory, shapes, model_file=model_file, whole=whole)


def _pieces_zero12(param_shapes: list[dict], sizes: list[int], world: int,
                   paddings: list[list[int]] | None) -> dict[str, list[_Piece]]:
    """Group g's flat vector is the ranks' equal slices (sizes[g] each) in rank order; a parameter may straddle
    two ranks' slices."""
    pieces: dict[str, list[_Piece]] = {}
    for g, shapes in enumerate(param_shapes):
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel, pos, pieces[name] = math.prod(shape), offset, []
            while pos < offset + numel:
                rank, within = divmod(pos, sizes[g])
                take = min(sizes[g] - within, offset + numel - pos)
                pieces[name].append(_Piece(rank, g, within, take, pos - offset))
                pos += take
            offset += numel + (paddings[g][i] if paddings else 0)
        if offset > sizes[g] * world:
            raise ValueError(f"parameter group {g} needs {offset} elements but the {world} partitions hold "
                             f"{sizes[g] * world}: the checkpoint's files do not belong together")
    return pieces


def _pieces_zero3(param_shapes: list[dict], sizes: list[int], world: int) -> dict[str, list[_Piece]]:
    """Every parameter split into ceil(numel / world) per rank; each rank's pieces follow one another across its
    flat groups (a piece may straddle two groups)."""
    starts = [0, *itertools.accumulate(sizes)]
    pieces: dict[str, list[_Piece]] = {}
    offset = 0
    for name, shape in ((n, s) for g in param_shapes for n, s in g.items()):
        numel = math.prod(shape)
        per_rank = math.ceil(numel / world)
        pieces[name] = []
        for rank in range(world):
            lo, hi = rank * per_rank, min((rank + 1) * per_rank, numel)
            pos = offset
            while lo < hi:
                g = bisect.bisect_right(starts, pos) - 1
                if g >= len(sizes):
                    raise ValueError(f"parameter {name} lies beyond the partitions' {starts[-1]} elements: the "
                                     f"checkpoint's files do not belong together")
                take = min(starts[g + 1] - pos, hi - lo)
                pieces[name].append(_Piece(rank, g, pos - starts[g], take, lo))
                pos, lo = pos + take, lo + take
        offset += per_rank
    if offset != starts[-1]:
        raise ValueError(f"the parameters take {offset} elements per rank but the partitions hold {starts[-1]}: "
                         f"the checkpoint's files do not belong together")
    return pieces


def check_names(config: RetroConfig, shapes: dict[str, tuple[int, ...]], tag: str) -> None:
    """The checkpoint's names and shapes against the run's model, built on the meta device (no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RETRO(config).state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} {shapes[k]} != {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {tag} does not match the run's model config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, shapes {wrong[:3]})")


def _stream(source: Partitions, specs: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors in `specs` order, consolidated a batch at a time and converted one at a time."""
    batch: list[TensorSpec] = []
    for i, spec in enumerate(specs):
        batch.append(spec)
        if i + 1 < len(specs) and sum(math.prod(s.shape) for s in batch + [specs[i + 1]]) * 4 <= READ_BATCH_BYTES:
            continue
        fp32 = source.read([s.name for s in batch])
        for s in batch:
            t = fp32.pop(s.name)
            if s.dtype == torch.float16 and t.numel() and t.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError(f"{s.name} holds values up to {t.abs().max().item():.4g}, beyond fp16's range "
                                 f"(65504): export with --dtype bf16 or fp32")
            yield s.name, t.to(s.dtype)
            del t  # written: not held while the next batch is read
        batch = []


def _publish(staging: Path, out: Path) -> None:
    """Move a finished export into `out`, config.json last (and the old one first out), so `out` is never a model
    directory with a config but partial weights."""
    if not out.exists():
        os.replace(staging, out)
        fsync_path(out.parent)
        return
    with contextlib.suppress(FileNotFoundError):
        (out / CONFIG_NAME).unlink()
    for stale in weight_files(out):
        stale.unlink()
    fsync_path(out)
    for path in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_NAME):
        os.replace(path, out / path.name)
        fsync_path(out)


def export(run_dir: str | Path, out: str | Path, *, step: int | None = None, dtype: str = "fp32",
           max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    checkpoints = run_dir / "checkpoints"
    tag = tag_for(step) if step is not None else (newest_whole(checkpoints) if checkpoints.is_dir() else None)
    if tag is None:
        raise ValueError(f"{run_dir} has no whole checkpoint to export (looked in {checkpoints})")
    read_meta(checkpoints, tag)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} is missing: {run_dir} is not a retro-dist run directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory: choose another path")
    run_config = json.loads(config_path.read_text())
    if run_config["model"].get("retrofit"):  # a transformers base with retrieval added: retro_dist/retrofit
        from retro_dist.retrofit.export import export_retrofit
        return export_retrofit(checkpoints / tag, out, run_config, dtype=dtype, max_shard_size=max_shard_size)
    config = RetroConfig.from_dict(run_config["resolved"]["model"])
    source = open_checkpoint(checkpoints / tag, config)
    check_names(config, source.shapes, tag)
    specs = [TensorSpec(name, shape, DTYPES[dtype] if source.is_floating(name) else source.fixed[name].dtype)
             for name, shape in source.shapes.items()]
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_weights(staging, specs, _stream(source, specs), max_shard_size=max_shard_size)
        tokenizer = Layout(run_config["data"]["dataset"]).tokenizer
        if tokenizer.is_file():
            shutil.copy(tokenizer, staging / "tokenizer.json")
            fsync_path(staging / "tokenizer.json")
        write_text_atomic(staging / CONFIG_NAME, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
