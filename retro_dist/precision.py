"""Which floating-point format is fast on a device: the one decision behind `train.precision: auto` and the
embedders' autocast.

- GPU: bf16 where the GPU has it natively (Ampere and newer), fp16 elsewhere. `torch.cuda.is_bf16_supported()` also
  says yes where bf16 is only emulated (V100, T4), which runs far slower than fp16: emulation is not counted.
- CPU: bf16 where AMX tiles run it. On AVX512 without AMX, bf16 matmuls are sometimes faster than fp32 (AMD EPYC with
  avx512_bf16: about 2x) and sometimes slower (Intel Xeon without AMX: 0.075 against 0.102 TFLOP/s, a RETRO step 1.5x
  slower), so a one-off timed comparison of 1024^2 matmuls (~0.2 s) decides. Without AVX512: fp32.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

# bf16 must beat fp32 by this much on the CPU matmul to be chosen: autocast adds casts around every matmul
CPU_BF16_MARGIN = 1.2


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16", "fp16" or "fp32"
    reason: str  # why, for the start-up line

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]


def gpu_has_native_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and counts only native support
        return torch.cuda.is_bf16_supported()


def cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def matmul_tflops(dtype: torch.dtype, size: int = 1024, repeats: int = 3) -> float:
    """Best of `repeats` timed square matmuls on this process's CPU threads, after one warm-up."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


@functools.lru_cache(maxsize=None)
def cpu_choice() -> Precision:
    capability = torch.backends.cpu.get_cpu_capability()
    if cpu_has_amx():
        return Precision("bf16", "AMX tiles run bf16 matmuls")
    if "AVX512" not in capability:
        return Precision("fp32", f"no AVX512 ({capability}): bf16 has no fast path")
    bf16, fp32 = matmul_tflops(torch.bfloat16), matmul_tflops(torch.float32)
    measured = f"bf16 matmul {bf16:.3f} vs fp32 {fp32:.3f} TFLOP/s here"
    if bf16 >= CPU_BF16_MARGIN * fp32:
        return Precision("bf16", f"AVX512 without AMX, {measured}")
    return Precision("fp32", f"AVX512 without AMX, {measured}")


def auto_precision(device: torch.device | str) -> Precision:
    device = torch.device(device)
    if device.type == "cuda":
        if gpu_has_native_bf16():
            return Precision("bf16", f"{torch.cuda.get_device_name(device)} has native bf16")
        return Precision("fp16", f"{torch.cuda.get_device_name(device)} has no native bf16 (emulated bf16 is slow)")
    return cpu_choice()


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """`auto` chosen for the device; an explicit choice checked (bf16 on a GPU without it is one line)."""
    device = torch.device(device)
    if precision == "auto":
        return auto_precision(device)
    if precision == "bf16" and device.type == "cuda" and not gpu_has_native_bf16():
        raise ValueError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no native bf16 (only "
                         f"emulated, several times slower): use fp16 or auto")
    return Precision(precision, "as configured")


def enable_tf32(device: torch.device | str, precision: str) -> None:
    """fp32 training on a GPU runs its matmuls and convolutions on TF32 tensor cores (10-bit mantissa products,
    fp32 accumulation), as every large-model trainer does; a CPU run is unchanged."""
    if torch.device(device).type == "cuda" and precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
