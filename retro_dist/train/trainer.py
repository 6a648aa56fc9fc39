"""The training loop around a DeepSpeed engine: accumulation, LR schedule, validation, metrics, checkpoints,
preemption."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from retro_dist.config import RunConfig
from retro_dist.data.loader import RetroLoader
from retro_dist.evaluate import Evaluator
from retro_dist.model import RETRO
from retro_dist.model.dropout import sample_keyed

from .checkpoint import Checkpointer
from .ds_config import BatchPlan
from .metrics import Metrics, console_line, model_flops_per_sample, peak_memory_gb

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: preempted or out of time, checkpoint saved; launch/slurm requeues on it


def ask_launcher_to_requeue() -> None:
    """Rank 0 writes RETRO_REQUEUE_FILE (set by launch/slurm/train.sbatch) on its way out with REQUEUE_EXIT_CODE:
    torchrun reports any failed rank as exit code 1, so with one torchrun per node the 75 never reaches the script."""
    path = os.environ.get("RETRO_REQUEUE_FILE")
    if path:
        Path(path).write_text(f"{REQUEUE_EXIT_CODE}\n")


def lr_at(step: int, run: RunConfig) -> float:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at train.steps (step is 0-based)."""
    o, total = run.optim, run.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption); checked between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


class Trainer:
    def __init__(self, run: RunConfig, engine, model: RETRO, plan: BatchPlan, *, device: torch.device,
                 precision: str, peak_flops: float, dataset_fingerprint: str):
        self.run, self.engine, self.model, self.plan, self.device = run, engine, model, plan, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(run.run_dir)
        self.precision, self.peak_flops, self.fingerprint = precision, peak_flops, dataset_fingerprint
        d = run.data
        self.loader = RetroLoader(d.dataset, "train", batch_size=d.micro_batch, num_workers=d.num_workers,
                                  seed=run.train.seed, num_neighbors=d.num_neighbors, retrieval=d.retrieval,
                                  on_bad_sample=d.on_bad_sample, shard_urls=d.shard_urls,
                                  global_batch=plan.global_batch, streams=plan.streams)
        self.checkpointer = Checkpointer(engine, self.run_dir, keep=run.checkpoint.keep)
        self.metrics = Metrics(self.run_dir, enabled=run.logging.tensorboard and self.rank == 0)
        self.step = 0
        manifest = self.loader.manifest
        self.seq_len = manifest["seq_len"]
        self.flops_per_sample = model_flops_per_sample(model.config, self.seq_len, self.loader.num_neighbors,
                                                       retrieval=d.retrieval)
        self.stop = StopFlag()
        self.evaluator: Evaluator | None = None

    # state -------------------------------------------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "loader": self.loader.state_dict(), "run_config": self.run.to_dict(),
                "dataset_fingerprint": self.fingerprint}

    def restore(self, client_state: dict[str, Any]) -> None:
        if client_state.get("dataset_fingerprint") != self.fingerprint:
            raise ValueError(f"the checkpoint was trained on another dataset (fingerprint "
                             f"{client_state.get('dataset_fingerprint')}, this one {self.fingerprint}): resume "
                             f"with the same data.dataset or start a new run directory")
        self.step = client_state["step"]
        self.loader.load_state_dict(client_state["loader"])

    # the loop ------------------------------------------------------------------------------------------------------

    def train(self) -> int:
        """Train to train.steps; returns the process exit code (REQUEUE_EXIT_CODE after a preemption save)."""
        run, batches = self.run, self.loader.forever()
        window: dict[str, float] = {"data": 0.0, "fwd_bwd": 0.0, "opt": 0.0, "loss": 0.0, "n": 0, "start": time.perf_counter()}
        skipped_before = self.loader.skipped
        train_start, start_step = time.perf_counter(), self.step
        while self.step < run.train.steps:
            lr = lr_at(self.step, run)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            for _ in range(self.plan.accumulation):
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                tokens = batch["tokens"].to(self.device, non_blocking=True)
                retrieved = batch["retrieved"]
                retrieved = retrieved.to(self.device, non_blocking=True) if retrieved is not None else None
                # dropout masks by (seed, step, position in the global batch): the same at any world size, and
                # drawn again alike by activation checkpointing's recompute inside backward
                with sample_keyed(run.train.seed, self.step, batch["position"]):
                    loss = self.engine(tokens, retrieved, return_loss=True)
                    self.engine.backward(loss)
                t2 = time.perf_counter()
                self.engine.step()
                t3 = time.perf_counter()
                window["data"] += t1 - t0
                window["fwd_bwd"] += t2 - t1
                window["opt"] += t3 - t2
                window["loss"] += loss.item() / self.plan.accumulation
            self.step += 1
            window["n"] += 1
            if self.step % run.logging.every == 0 or self.step == run.train.steps:
                self._log(window, lr, skipped_before, train_start, start_step)
                window = {k: 0.0 for k in window} | {"start": time.perf_counter()}
            if run.logging.val_every and (self.step % run.logging.val_every == 0 or self.step == run.train.steps):
                self.validate()
            preempted = self._agree_on_stop()
            if preempted or self.step % run.checkpoint.every == 0 or self.step == run.train.steps:
                tag = self.checkpointer.save(self.step, self.client_state())
                if self.rank == 0:
                    print(f"saved checkpoint {self.run_dir / 'checkpoints' / tag}", flush=True)
            if preempted:
                if self.rank == 0:
                    print(f"stopping at step {self.step} on signal {self.stop.signal or 'from another rank'}: "
                          f"checkpoint saved, exit code {REQUEUE_EXIT_CODE} asks the launcher to requeue", flush=True)
                    ask_launcher_to_requeue()
                return REQUEUE_EXIT_CODE
        return 0

    def _agree_on_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.signal is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def _log(self, w: dict[str, float], lr: float, skipped_before: int, train_start: float, start_step: int) -> None:
        loss, = self._mean([w["loss"] / max(1, w["n"])])
        skipped = torch.tensor([float(self.loader.skipped - skipped_before)])
        dist.all_reduce(skipped)
        elapsed = time.perf_counter() - w["start"]
        samples = w["n"] * self.plan.global_batch
        flops = samples * self.flops_per_sample / max(elapsed, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "train/loss": loss, "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "perf/tokens_per_s": samples * self.seq_len / elapsed, "perf/samples_per_s": samples / elapsed,
            "perf/tflops": flops / 1e12, "perf/mfu": flops / (self.peak_flops * self.world),
            "time/step_s": elapsed / w["n"], "time/data_s": w["data"] / w["n"],
            "time/fwd_bwd_s": w["fwd_bwd"] / w["n"], "time/optimizer_s": w["opt"] / w["n"],
            "memory/peak_gb": peak_memory_gb(self.device), "data/skipped_samples": float(skipped.item()),
        }
        if self.precision == "fp16":
            values["train/loss_scale"] = float(self.engine.optimizer.cur_scale)
        if self.rank == 0:
            rate = (self.step - start_step) / max(time.perf_counter() - train_start, 1e-9)
            print(console_line(self.step, self.run.train.steps, values, (self.run.train.steps - self.step) / max(rate, 1e-9)),
                  flush=True)
            self.metrics.scalars(self.step, values)

    def validate(self) -> dict[str, float]:
        """Token-weighted val loss and perplexity with true neighbors, random neighbors and retrieval off, on the
        first logging.val_samples samples of the split (0: all), through the same Evaluator as `retro-dist eval`."""
        if self.evaluator is None:  # built on first use and kept: it holds this rank's share of the samples
            d = self.run.data
            self.evaluator = Evaluator(d.dataset, "val", batch_size=d.micro_batch,
                                       max_samples=self.run.logging.val_samples, num_neighbors=d.num_neighbors,
                                       seed=self.run.train.seed, rank=self.rank, world_size=self.world,
                                       on_bad_sample=d.on_bad_sample)
        self.engine.eval()
        try:
            r = self.evaluator.run(self.engine, device=self.device, all_reduce=dist.all_reduce)
        finally:
            self.engine.train()
        loss = r["loss"]
        values = {"val/loss": loss["true"], "val/ppl": r["ppl"]["true"],
                  "val/loss_random_neighbors": loss["random"], "val/ppl_random_neighbors": r["ppl"]["random"],
                  "val/loss_no_retrieval": loss["off"], "val/ppl_no_retrieval": r["ppl"]["off"],
                  "val/gain_vs_random": r["gain_vs_random"], "val/gain_vs_off": r["gain_vs_off"]}
        if self.rank == 0:
            print(f"step {self.step} | val loss {loss['true']:.4f} ppl {r['ppl']['true']:.2f} | random neighbors "
                  f"{loss['random']:.4f} ppl {r['ppl']['random']:.2f} | retrieval off {loss['off']:.4f} ppl "
                  f"{r['ppl']['off']:.2f} | gain over random {r['gain_vs_random']:.1%}", flush=True)
            self.metrics.scalars(self.step, values)
        return values

    def close(self) -> None:
        self.metrics.close()
