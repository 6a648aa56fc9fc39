"""The training loop around a DeepSpeed engine: accumulation, LR schedule, validation, metrics, checkpoints,
preemption. `Trainer.train` is torchtitan's loop: `train_step`, then log, validate, checkpoint or stop.

On a GPU every host synchronisation stalls the queue of kernels: the loop keeps the loss on the device, reads it back
once per logging window (with the window's timings), and votes on a stop signal every few steps (`vote_every`)."""

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
from retro_dist.evaluate import Evaluator
from retro_dist.model import RetroConfig
from retro_dist.model.dropout import sample_keyed

from .ds_config import BatchPlan
from .metrics import Metrics, console_line, model_flops_per_sample, peak_memory_gb
from .timing import StepTimer, StepTimes

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: preempted or out of time, checkpoint saved; launch/slurm requeues on it
# seconds of training between two stop votes on a GPU: SLURM sends SIGKILL KillWait (default 30 s) after SIGTERM, and
# the checkpoint that follows the vote must fit in what is left
VOTE_WINDOW_S = 5.0
MAX_VOTE_EVERY = 50


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


def votes_every(step_s: float, *, asynchronous: bool) -> int:
    """Steps between two stop votes: every step where the host waits for the device anyway (CPU), else as many steps
    as fit in VOTE_WINDOW_S. Computed from an all-reduced step time, so every rank agrees."""
    if not asynchronous or step_s <= 0:
        return 1
    return max(1, min(MAX_VOTE_EVERY, int(VOTE_WINDOW_S / step_s)))


def loss_scale(optimizer) -> float:
    """fp16's current loss scale: ZeRO 1-3 and the fused optimizer keep it as `cur_scale`, ZeRO 0's unfused optimizer
    (torch's AdamW under fp16) in its `loss_scale_config`."""
    config = getattr(optimizer, "loss_scale_config", None)
    return float(config.cur_scale if config is not None else optimizer.cur_scale)


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption); checked between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


class Trainer:
    def __init__(self, run: RunConfig, engine, plan: BatchPlan, *, loader, checkpointer, config: RetroConfig,
                 device: torch.device, precision: str, peak_flops: float, dataset_fingerprint: str):
        self.run, self.engine, self.plan, self.device = run, engine, plan, device
        self.loader, self.checkpointer = loader, checkpointer
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(run.run_dir)
        self.precision, self.peak_flops, self.fingerprint = precision, peak_flops, dataset_fingerprint
        self.metrics = Metrics(self.run_dir, enabled=run.logging.tensorboard and self.rank == 0)
        self.step = 0
        self.seq_len = loader.manifest["seq_len"]
        self.flops_per_sample = model_flops_per_sample(config, self.seq_len, loader.num_neighbors,
                                                       retrieval=run.data.retrieval)
        self.stop = StopFlag()
        self.evaluator: Evaluator | None = None
        self.asynchronous = device.type == "cuda"
        self.vote_every = 1  # until the first logging window has measured a step
        self.timer = StepTimer(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.skipped_at_log = loader.skipped

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
        self.skipped_at_log = self.loader.skipped

    # the loop ------------------------------------------------------------------------------------------------------

    def train(self) -> int:
        """Train to train.steps; returns the process exit code (REQUEUE_EXIT_CODE after a preemption save)."""
        batches, steps, logging = self.loader.forever(), self.run.train.steps, self.run.logging
        self.timer.reset()
        while self.step < steps:
            lr = self.set_lr()
            self.train_step(batches)
            self.step += 1
            last = self.step == steps
            if self.step % logging.every == 0 or last:
                self.log(lr)
            if logging.val_every and (self.step % logging.val_every == 0 or last):
                self.validate()
            code = self.checkpoint_or_stop()
            if code is not None:
                return code
        return 0

    def set_lr(self) -> float:
        lr = lr_at(self.step, self.run)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, batches) -> None:
        """One optimizer step over `plan.accumulation` micro-batches. Batches were range-checked on the host when
        their shards were read (retro_dist.data.shards), so the copies run ahead without a synchronisation."""
        for _ in range(self.plan.accumulation):
            wait = time.perf_counter()
            batch = next(batches)
            self.timer.add_data(time.perf_counter() - wait)
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            retrieved = batch["retrieved"]
            retrieved = retrieved.to(self.device, non_blocking=True) if retrieved is not None else None
            start = self.timer.now()
            # dropout masks by (seed, step, position in the global batch): the same at any world size, and drawn
            # again alike by activation checkpointing's recompute inside backward
            with sample_keyed(self.run.train.seed, self.step, batch["position"]):
                loss = self.engine(tokens, retrieved, return_loss=True)
                self.engine.backward(loss)
            middle = self.timer.now()
            self.engine.step()
            self.timer.add("fwd_bwd", start, middle)
            self.timer.add("optimizer", middle, self.timer.now())
            self.loss_sum += loss.detach().double() / self.plan.accumulation
        self.timer.steps += 1

    def checkpoint_or_stop(self) -> int | None:
        """Save on schedule, at the end, or when any rank got a stop signal; the exit code when stopping."""
        steps = self.run.train.steps
        scheduled = self.step % self.run.checkpoint.every == 0 or self.step == steps
        preempted = (scheduled or self.step % self.vote_every == 0) and self._agree_on_stop()
        if scheduled or preempted:
            tag = self.checkpointer.save(self.step, self.client_state())
            if self.rank == 0:
                print(f"saved checkpoint {self.run_dir / 'checkpoints' / tag}", flush=True)
        if not preempted:
            return None
        if self.rank == 0:
            print(f"stopping at step {self.step} on signal {self.stop.signal or 'from another rank'}: checkpoint "
                  f"saved, exit code {REQUEUE_EXIT_CODE} asks the launcher to requeue", flush=True)
            ask_launcher_to_requeue()
        return REQUEUE_EXIT_CODE

    def _agree_on_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.signal is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _sum(self, values: list[torch.Tensor | float]) -> list[float]:
        """Values summed over ranks, in one collective on the rank's device and one read back."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        dist.all_reduce(t)
        return t.tolist()

    def log(self, lr: float) -> None:
        times = self.timer.read()
        loss_sum, skipped, step_s = self._sum([self.loss_sum, float(self.loader.skipped - self.skipped_at_log),
                                              times.step])
        self.loss_sum.zero_()
        self.skipped_at_log = self.loader.skipped
        self.vote_every = votes_every(step_s / self.world, asynchronous=self.asynchronous)
        values = self.scalars(lr, loss_sum / self.world / max(1, times.steps), skipped, times)
        if self.rank == 0:
            eta = (self.run.train.steps - self.step) * times.step
            print(console_line(self.step, self.run.train.steps, values, eta), flush=True)
            self.metrics.scalars(self.step, values)
        self.timer.reset()

    def scalars(self, lr: float, loss: float, skipped: float, t: StepTimes) -> dict[str, float]:
        samples = t.steps * self.plan.global_batch
        flops = samples * self.flops_per_sample / max(t.wall, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "train/loss": loss, "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "perf/tokens_per_s": samples * self.seq_len / t.wall, "perf/samples_per_s": samples / t.wall,
            "perf/tflops": flops / 1e12, "perf/mfu": flops / (self.peak_flops * self.world),
            "time/step_s": t.step, "time/data_s": t.data, "time/fwd_bwd_s": t.fwd_bwd,
            "time/optimizer_s": t.optimizer, "memory/peak_gb": peak_memory_gb(self.device),
            "data/skipped_samples": skipped,
        }
        if self.precision == "fp16":
            values["train/loss_scale"] = loss_scale(self.engine.optimizer)
        return values

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

