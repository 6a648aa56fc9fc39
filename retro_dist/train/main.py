"""`retro-dist train`: parse, build, train, always tear down. Runs under any launcher (see retro_dist/dist.py)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch

from retro_dist.atomic import write_text_atomic
from retro_dist.config import RunConfig, load_run_config
from retro_dist.data.format import DatasetError, load_manifest
from retro_dist.data.loader import check_compatible
from retro_dist.dist import DistInitError
from retro_dist.lock import LockHeld, hold_directory
from retro_dist.model.presets import preset_config

from .build import build_model
from .checkpoint import META, convert_to_universal, newest_whole, read_meta
from .ds_config import batch_plan, build_ds_config, engine_settings, resolve_precision
from .metrics import measure_peak_flops
from .parallelize import param_groups


def model_config(run: RunConfig, manifest: dict):
    return preset_config(run.model.preset, num_tokens=manifest["vocab_size"], max_seq_len=manifest["seq_len"],
                         chunk_size=manifest["chunk_size"], pad_id=manifest["pad_id"], **run.model.arch)


def resume_target(run: RunConfig) -> str | None:
    checkpoints = Path(run.run_dir) / "checkpoints"
    mode = run.checkpoint.resume
    if mode == "none":
        return None
    if mode == "auto":
        return newest_whole(checkpoints) if checkpoints.is_dir() else None
    read_meta(checkpoints, mode)  # a named tag must be whole
    return mode


def lock_run_dir(run_dir: Path, rank: int):
    """Rank 0 takes the run directory's lock (one job, however many nodes, is one holder); every rank learns the
    outcome through the process group, so all of them refuse with the same line."""
    import torch.distributed as dist

    lock, refusal = None, [None]
    if rank == 0:
        try:
            lock = hold_directory(run_dir, "training")
        except LockHeld as e:
            refusal = [str(e)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise LockHeld(refusal[0])
    return lock


def remove_paths(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def train(run: RunConfig) -> int:
    import deepspeed
    import torch.distributed as dist

    from retro_dist.dist import init_distributed
    from retro_dist.parent_watch import watch_parent

    from .trainer import Trainer

    info = init_distributed(run.train.dist_timeout_s)
    watch_parent(info.launcher)
    trainer = None
    try:
        lock = lock_run_dir(Path(run.run_dir), info.rank)  # noqa: F841 - held until the process exits
        manifest = load_manifest(run.data.dataset)
        if not manifest.get("stages", {}).get("shard", {}).get("done"):
            raise DatasetError(f"{run.data.dataset} is incomplete: finish `retro-dist prepare` first")
        config = model_config(run, manifest)
        check_compatible(manifest, config)
        plan = batch_plan(run.train.global_batch, run.data.micro_batch, info.world_size)
        precision = resolve_precision(run.train.precision, info.device.type)
        settings = engine_settings(run)  # read once, before anything slow: a bad ds_config fails in one line
        run_dir = Path(run.run_dir)
        tag = resume_target(run)
        universal, made = False, []  # what the universal conversion adds: removed again if the resume is refused
        if tag is not None:
            meta = read_meta(run_dir / "checkpoints", tag)
            universal = meta["world_size"] != info.world_size
            if universal and info.rank == 0:
                print(f"resuming {tag} (saved by {meta['world_size']} ranks) on {info.world_size} ranks through "
                      f"DeepSpeed's universal checkpoint", flush=True)
                out = run_dir / "checkpoints" / f"{tag}_universal"
                if not (out / META).is_file():  # DeepSpeed's converter also writes its `latest_universal` pointer
                    made = [p for p in (out, out.with_name("latest_universal")) if not p.exists()]
                try:
                    convert_to_universal(run_dir / "checkpoints", tag, zero_stage=meta["zero_stage"])
                except ValueError:
                    remove_paths(made)
                    raise
            dist.barrier()
        ds_config = build_ds_config(run, settings, plan, precision, load_universal=universal)

        model, num_params = build_model(config, ds_config, seed=run.train.seed,
                                        activation_checkpointing=run.train.activation_checkpointing)
        try:
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, run.optim.weight_decay),
                                                   config=ds_config)
        except Exception as e:  # noqa: BLE001 - DeepSpeed's config validation errors are long pydantic dumps
            first = " ".join(str(e).split())[:400]
            raise ValueError(f"DeepSpeed refused the config ({type(e).__name__}: {first})") from None
        peak = measure_peak_flops(info.device, torch.bfloat16 if precision == "bf16" else
                                  torch.float16 if precision == "fp16" else torch.float32)
        trainer = Trainer(run, engine, model, plan, device=info.device, precision=precision, peak_flops=peak,
                          dataset_fingerprint=manifest["stages"]["shard"]["fingerprint"])
        if tag is not None:
            try:
                trainer.restore(trainer.checkpointer.load(tag, universal=universal))
            except ValueError:  # every rank refuses here alike (other model shape, other dataset)
                dist.barrier()  # no rank still reads the universal copy
                remove_paths(made)
                raise
            if info.rank == 0:
                print(f"resumed from {tag} at step {trainer.step}", flush=True)
        if info.rank == 0:  # only now: a refused resume (other dataset, other model shape) leaves the run as it was
            resolved = run.to_dict() | {"resolved": {"model": config.to_dict(), "world_size": info.world_size,
                                                     "accumulation": plan.accumulation,
                                                     "global_batch": plan.global_batch, "precision": precision}}
            write_text_atomic(run_dir / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
            write_text_atomic(run_dir / "ds_config.json", json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
        if info.rank == 0:
            print(f"training {num_params / 1e6:.1f}M parameters on {info.world_size} {info.device.type} "
                  f"rank(s) ({info.launcher}), ZeRO {engine.zero_optimization_stage()}, {precision}, global batch "
                  f"{plan.global_batch} = {plan.micro_batch} x {plan.accumulation} x {info.world_size}, "
                  f"activation checkpointing {run.train.activation_checkpointing}", flush=True)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()


def main(argv: list[str] | None = None) -> int:
    """`retro-dist train [--config FILE] [--section.key=value ...]`; returns the exit code."""
    import argparse

    parser = argparse.ArgumentParser(prog="retro-dist train", description=__doc__)
    parser.add_argument("--config", help="YAML or JSON run config (sections: model, data, optim, train, "
                                         "checkpoint, logging); `--section.key=value` overrides it")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args, overrides = parser.parse_known_args(argv)
    code = 0
    try:
        bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
        if bad:
            raise ValueError(f"unexpected arguments {bad}: overrides look like --section.key=value")
        run = load_run_config(args.config, overrides)
        code = train(run)
    except (ValueError, FileNotFoundError, DatasetError, DistInitError, LockHeld) as e:
        print(f"retro-dist train: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        code = 2
    except Exception as e:  # noqa: BLE001 - a crash: full traceback, then a non-zero exit through the same teardown
        if _peer_failed(e):
            # the rank that failed printed its own error; this one only stopped in a collective waiting for it
            import torch.distributed as dist
            print(f"retro-dist train: error: rank {dist.get_rank()} stopped because another rank failed (see that "
                  f"rank's error; {type(e).__name__}: {' '.join(str(e).split())[:160]})", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        code = 1
    return _teardown(code)


PEER_FAILURE_TEXTS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                      "NCCL communicator was aborted")


def _peer_failed(e: BaseException) -> bool:
    """An error raised inside a collective because another rank is gone (gloo's socket errors, NCCL's abort)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(e, dist.DistNetworkError) or (isinstance(e, RuntimeError) and
                                                    any(t in str(e) for t in PEER_FAILURE_TEXTS))


def _teardown(code: int) -> int:
    """Close the process group in the order that avoids gloo's abort at interpreter exit, then exit.

    Measured: without teardown a gloo worker thread racing Python's shutdown aborted 3 runs in 30 ("terminate called
    without an active exception"); with writers closed, barrier, destroy_process_group, flush and os._exit, 0 in 15."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            if code == 0 or code == 75:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer is gone: nothing left to tear down cleanly
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
