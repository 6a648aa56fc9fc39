"""What a step costs and how it went: model FLOPs, the device's peak, TensorBoard scalars, the console line."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from retro_dist.model import RetroConfig


def model_flops_per_sample(c: RetroConfig, seq_len: int, num_neighbors: int, retrieval: bool = True) -> float:
    """Forward + backward FLOPs of one sample (3x forward; matmuls only, attention counted in full as in MFU)."""
    n, cs, r = seq_len, c.chunk_size, num_neighbors
    k, m = n // cs, 2 * cs
    inner, d, e = c.heads * c.dim_head, c.dec_dim, c.enc_dim
    cca = sum(c.has_cross_attn(i, encoder=False) for i in range(1, c.dec_depth + 1)) if retrieval else 0
    enc_cross = sum(c.has_cross_attn(i, encoder=True) for i in range(1, c.enc_depth + 1))
    fwd = 2 * n * (d * 3 * inner + inner * d + 8 * d * d) * c.dec_depth  # decoder self-attention + feed-forward
    fwd += 4 * n * n * inner * c.dec_depth  # decoder attention scores and values
    fwd += 2 * n * d * c.num_tokens + (2 * n * e * d if e != d else 0)  # logits, input projection
    if cca:
        fwd += cca * (2 * n * (d * inner + inner * d) + 2 * k * r * m * d * 2 * inner + 4 * k * cs * (r * m + 1) * inner)
        neighbors = k * r * m
        fwd += c.enc_depth * (2 * neighbors * (e * 3 * inner + inner * e + 8 * e * e) + 4 * k * r * m * m * inner)
        fwd += enc_cross * (2 * neighbors * (e * inner + inner * e) + 2 * k * cs * d * 2 * inner
                            + 4 * neighbors * cs * inner)
        fwd += 2 * neighbors * e * d  # encoder output projection
    return 3.0 * fwd


# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, TFLOP/s: (bf16/fp16, tf32). The first name
# found in torch.cuda.get_device_name() wins, so more specific names come first. fp32 training on a GPU runs on TF32.
DATASHEET_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("B200", 2250.0, 1100.0),
    ("H200", 989.4, 494.7),
    ("H100 PCIe", 756.5, 378.0),
    ("H100 NVL", 835.0, 417.5),
    ("H100", 989.4, 494.7),  # SXM
    ("GH200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.1, 183.0),
    ("A10G", 70.0, 35.0),
    ("L4", 121.0, 60.0),
    ("A10", 125.0, 62.5),
    ("V100", 125.0, 15.7),  # fp16 tensor cores; no bf16, no TF32
    ("T4", 65.0, 8.1),
    ("MI300X", 1307.4, 653.7),
    ("MI250X", 383.0, 95.7),
)


def datasheet_tflops(device_name: str, precision: str) -> float | None:
    for name, half, tf32 in DATASHEET_TFLOPS:
        if name in device_name:
            return half if precision in ("bf16", "fp16") else tf32
    return None


@dataclass(frozen=True)
class PeakFlops:
    """The denominator of MFU: a GPU's datasheet peak where the GPU is known, else a measured matmul peak."""

    flops: float
    measured: float
    device_name: str
    precision: str
    source: str  # "datasheet" or "measured"

    def describe(self) -> str:
        measured = f"{self.measured / 1e12:.3f} TFLOP/s measured by a square matmul here"
        if self.source == "datasheet":
            return (f"the datasheet peak of {self.device_name} in {self.precision}, {self.flops / 1e12:.1f} TFLOP/s "
                    f"({measured})")
        return f"{measured} in {self.precision} ({self.device_name}: no datasheet figure known)"


def peak_flops(device: torch.device, precision: str) -> PeakFlops:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    measured = measure_peak_flops(device, dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        sheet = datasheet_tflops(name, precision)
        if sheet is not None:
            return PeakFlops(sheet * 1e12, measured, name, precision, "datasheet")
        return PeakFlops(measured, measured, name, precision, "measured")
    return PeakFlops(measured, measured, "this CPU", precision, "measured")


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of a square matmul on this device. On a GPU a 4096^2 matmul reaches 60-75% of the datasheet
    peak, which is why MFU there is reported against the datasheet (`peak_flops`)."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * size ** 3 / best


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


class Metrics:
    """Rank 0's TensorBoard writer (None elsewhere or when disabled), opened at the first scalar: SummaryWriter
    creates its event file at once, and a refused resume must write nothing into the run directory."""

    def __init__(self, run_dir: Path, *, enabled: bool):
        self.writer = None
        self.directory = Path(run_dir) / "tensorboard" if enabled else None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None and self.directory is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.directory))
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def console_line(step: int, steps: int, v: dict[str, float], eta_s: float) -> str:
    return (f"step {step}/{steps} | loss {v['train/loss']:.4f} | lr {v['train/lr']:.2e} | "
            f"grad {v['train/grad_norm']:.3f} | {v['perf/tokens_per_s']:,.0f} tok/s "
            f"{v['perf/samples_per_s']:.2f} samples/s | {v['perf/tflops']:.3f} TFLOP/s MFU {v['perf/mfu']:.1%} | "
            f"step {v['time/step_s']:.2f}s (data {v['time/data_s']:.2f} fwd+bwd {v['time/fwd_bwd_s']:.2f} "
            f"opt {v['time/optimizer_s']:.2f}) | mem {v['memory/peak_gb']:.2f} GB | "
            f"skipped {v['data/skipped_samples']:.0f} | ETA {_hms(eta_s)}")


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
