"""`retro-dist train`: parse, build, train, always tear down. Runs under any launcher (see retro_dist/dist.py)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from retro_dist.atomic import write_text_atomic
from retro_dist.config import RunConfig, load_run_config
from retro_dist.console import error_line
from retro_dist.data.format import DatasetError, load_manifest
from retro_dist.data.loader import RetroLoader, check_compatible
from retro_dist.dist import DistInitError
from retro_dist.lock import LockHeld, hold_directory
from retro_dist.model import RetroConfig
from retro_dist.model.presets import preset_config
from retro_dist.precision import Precision, enable_tf32, resolve_precision
from retro_dist.retrofit.build import retrofit_model_config, retrofit_settings

from .build import build_model
from .checkpoint import Checkpointer
from .ds_config import BatchPlan, batch_plan, build_ds_config, engine_settings
from .metrics import peak_flops
from .parallelize import param_groups


def model_config(run: RunConfig, manifest: dict):
    if run.model.retrofit:  # a transformers base with retrieval added: retro_dist/retrofit
        return retrofit_model_config(run.model, manifest, run.data.dataset)
    return preset_config(run.model.preset, num_tokens=manifest["vocab_size"], max_seq_len=manifest["seq_len"],
                         chunk_size=manifest["chunk_size"], pad_id=manifest["pad_id"], **run.model.arch)


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


@dataclass(frozen=True)
class DataSpec:
    """The dataset a run trains on and the model shape it implies, checked against each other."""

    manifest: dict
    config: RetroConfig
    fingerprint: str


def open_dataset(run: RunConfig) -> DataSpec:
    manifest = load_manifest(run.data.dataset)
    if not manifest.get("stages", {}).get("shard", {}).get("done"):
        raise DatasetError(f"{run.data.dataset} is incomplete: finish `retro-dist prepare` first")
    config = model_config(run, manifest)
    check_compatible(manifest, config)
    return DataSpec(manifest, config, manifest["stages"]["shard"]["fingerprint"])


def agree_on_precision(run: RunConfig, device: torch.device) -> Precision:
    """Rank 0's choice for every rank (a CPU's `auto` is a timed comparison, which two ranks could read apart)."""
    import torch.distributed as dist
    choice = [resolve_precision(run.train.precision, device)]  # on every rank: a refusal is one line everywhere
    dist.broadcast_object_list(choice, src=0)
    enable_tf32(device, choice[0].name)
    return choice[0]


def build_engine(model, run: RunConfig, ds_config: dict):
    import deepspeed
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, run.optim.weight_decay),
                                               config=ds_config)
    except Exception as e:  # noqa: BLE001 - DeepSpeed's config validation errors are long pydantic dumps
        first = " ".join(str(e).split())[:400]
        raise ValueError(f"DeepSpeed refused the config ({type(e).__name__}: {first})") from None
    return engine


def build_loader(run: RunConfig, plan: BatchPlan, device: torch.device) -> RetroLoader:
    d = run.data
    return RetroLoader(d.dataset, "train", batch_size=d.micro_batch, num_workers=d.num_workers, seed=run.train.seed,
                       num_neighbors=d.num_neighbors, retrieval=d.retrieval, on_bad_sample=d.on_bad_sample,
                       shard_urls=d.shard_urls, global_batch=plan.global_batch, streams=plan.streams,
                       pin_memory=device.type == "cuda")


def write_resolved(run: RunConfig, data: DataSpec, plan: BatchPlan, precision: str, ds_config: dict) -> None:
    """config.json and ds_config.json of the run directory, written once a resume is accepted: a refused resume
    (other dataset, other model shape) leaves the run as it was."""
    resolved = run.to_dict() | {"resolved": {"model": data.config.to_dict(), "world_size": plan.world_size,
                                             "accumulation": plan.accumulation, "global_batch": plan.global_batch,
                                             "precision": precision}}
    write_text_atomic(Path(run.run_dir) / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    write_text_atomic(Path(run.run_dir) / "ds_config.json", json.dumps(ds_config, indent=2, sort_keys=True) + "\n")


def train(run: RunConfig) -> int:
    """Construction in one order (distributed, dataset, plan, resume point, model, engine, trainer, resume), then the
    loop; the trainer's writers close whatever happens."""
    from retro_dist.dist import init_distributed
    from retro_dist.parent_watch import watch_parent

    from .trainer import Trainer

    info = init_distributed(run.train.dist_timeout_s)
    watch_parent(info.launcher)
    trainer = None
    try:
        lock = lock_run_dir(Path(run.run_dir), info.rank)  # noqa: F841 - held until the process exits
        data = open_dataset(run)
        plan = batch_plan(run.train.global_batch, run.data.micro_batch, info.world_size)
        precision = agree_on_precision(run, info.device)
        settings = engine_settings(run)  # read once, before anything slow: a bad ds_config fails in one line
        checkpointer = Checkpointer(Path(run.run_dir), keep=run.checkpoint.keep)
        point = checkpointer.prepare_resume(run.checkpoint.resume, info.world_size, timeout_s=run.train.dist_timeout_s)
        ds_config = build_ds_config(run, settings, plan, precision.name, load_universal=point is not None and point.universal)
        model, num_params = build_model(data.config, ds_config, seed=run.train.seed,
                                        activation_checkpointing=run.train.activation_checkpointing,
                                        retrofit=retrofit_settings(run.model))
        checkpointer.engine = engine = build_engine(model, run, ds_config)
        peak = peak_flops(info.device, precision.name)
        trainer = Trainer(run, engine, plan, loader=build_loader(run, plan, info.device), checkpointer=checkpointer,
                          config=data.config, device=info.device, precision=precision.name, peak_flops=peak.flops,
                          dataset_fingerprint=data.fingerprint)
        if point is not None:
            checkpointer.resume(point, trainer.restore)
        if info.rank == 0:
            write_resolved(run, data, plan, precision.name, ds_config)
            announce(run, info, engine, plan, precision, num_params, model, point, trainer.step, peak)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()


def announce(run: RunConfig, info, engine, plan: BatchPlan, precision: Precision, num_params: int, model, point, step: int,
             peak) -> None:
    """Rank 0's start-up lines: what trains where, how, and what the MFU is measured against."""
    if point is not None:
        print(f"resumed from {point.tag} at step {step}", flush=True)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    print(f"training {num_params / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trainable) on {info.world_size} "
          f"{info.device.type} rank(s) ({info.launcher}), ZeRO {engine.zero_optimization_stage()}, {precision.name} ({precision.reason}), "
          f"global batch {plan.global_batch} = {plan.micro_batch} x {plan.accumulation} x {info.world_size}, "
          f"activation checkpointing {run.train.activation_checkpointing}", flush=True)
    print(f"MFU against {peak.describe()}", flush=True)
    if info.device.type == "cuda" and attention_dropout(model) > 0:
        print(f"warning: attention dropout {attention_dropout(model)} > 0 runs attention unfused (keyed dropout "
              f"needs the [b, h, n, n] probabilities): slower and more memory than the fused kernels; set "
              f"--model.arch.enc_attn_dropout=0 --model.arch.dec_attn_dropout=0 to use them", flush=True)


def attention_dropout(model) -> float:
    config = getattr(model, "config", None)
    return max(getattr(config, "enc_attn_dropout", 0.0), getattr(config, "dec_attn_dropout", 0.0))


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
        error_line("retro-dist train", e)
        code = 2
    except Exception as e:  # noqa: BLE001 - a crash: full traceback, then a non-zero exit through the same teardown
        if _peer_failed(e):
            # the rank that failed printed its own error; this one only stopped in a collective waiting for it
            import torch.distributed as dist
            error_line("retro-dist train", f"rank {dist.get_rank()} stopped because another rank failed (see that "
                       f"rank's error; {type(e).__name__}: {' '.join(str(e).split())[:160]})")
        else:
            traceback.print_exc()
        code = 1
    return _teardown(code)


# What a collective raises on a surviving rank when another rank is gone: gloo's socket errors, and NCCL's abort,
# watchdog timeout and remote-error messages (raised as DistBackendError or RuntimeError, by torch version)
PEER_FAILURE_TEXTS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                      "NCCL communicator was aborted", "ncclRemoteError", "remote process exited",
                      "Watchdog caught collective operation timeout", "ProcessGroupNCCL is aborted",
                      "NCCL error", "ncclSystemError")


def _peer_failed(e: BaseException) -> bool:
    """An error raised inside a collective because another rank is gone (gloo's socket errors, NCCL's abort)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return peer_failure(e)


def peer_failure(e: BaseException) -> bool:
    import torch.distributed as dist
    if isinstance(e, (dist.DistNetworkError, dist.DistBackendError)):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in PEER_FAILURE_TEXTS)


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
