"""Forward+backward step time of RETRO-pytorch 0.3.9 and retro_dist on the same weights and inputs, side by side.

Prints one table: seconds per step, speed-up against RETRO-pytorch at the same precision and against its float32,
achieved TFLOP/s and MFU against this machine's measured matmul peak. Not a test: timings on shared machines are
noisy, so models alternate step by step and the median is reported.

    python bench/model_step.py                  # the reference config (~1 min per row on a 2-core CPU)
    python bench/model_step.py --preset small   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types

import torch
from torch.utils.flop_counter import FlopCounterMode

from retro_dist import RETRO
from retro_dist.convert import config_from_retro_pytorch, from_retro_pytorch

PRESETS = {
    # the reference config: batch 2 x 2048 tokens, 2 neighbors x 128 tokens
    "reference": dict(kwargs=dict(num_tokens=32000, max_seq_len=2048, enc_dim=256, enc_depth=2, dec_dim=512,
                                  dec_depth=6, dec_cross_attn_layers=(3, 6), heads=8, dim_head=64),
                      batch=2, seq_len=2048, neighbors=2),
    "small": dict(kwargs=dict(num_tokens=8000, max_seq_len=512, enc_dim=128, enc_depth=2, dec_dim=256,
                              dec_depth=4, dec_cross_attn_layers=(2, 4), heads=8, dim_head=32),
                  batch=2, seq_len=512, neighbors=2),
}


def import_retro_pytorch():
    # its retrieval module imports autofaiss (unused by the model, and broken with numpy 2)
    sys.modules.setdefault("autofaiss", types.SimpleNamespace(build_index=None))
    import retro_pytorch
    return retro_pytorch


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of one size x size x size matmul."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size ** 3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_fn(model, seq, retrieved, bf16: bool):
    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and precision")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    torch.manual_seed(0)

    rp = import_retro_pytorch()
    kwargs = preset["kwargs"]
    ref = rp.RETRO(**kwargs).train()
    config = config_from_retro_pytorch(kwargs)
    ours = RETRO(config).train()
    ours.load_state_dict(from_retro_pytorch(ref.state_dict(), config))
    b, n, r = preset["batch"], preset["seq_len"], preset["neighbors"]
    seq = torch.randint(1, config.num_tokens, (b, n + 1))
    retrieved = torch.randint(1, config.num_tokens, (b, n // config.chunk_size, r, 2 * config.chunk_size))

    with FlopCounterMode(display=False) as counter:
        step_fn(ours, seq, retrieved, bf16=False)()
    flops = counter.get_total_flops()
    peaks = {False: matmul_peak(torch.float32), True: matmul_peak(torch.bfloat16)}

    rows = {}
    for bf16 in (False, True):
        steps = {"RETRO-pytorch": step_fn(ref, seq, retrieved, bf16), "retro_dist": step_fn(ours, seq, retrieved, bf16)}
        for fn in steps.values():
            for _ in range(args.warmup):
                fn()
        times = {name: [] for name in steps}
        for _ in range(args.steps):
            for name, fn in steps.items():  # alternate, so load on the box hits both alike
                times[name].append(_timed(fn))
        for name, ts in times.items():
            rows[(name, bf16)] = statistics.median(ts)

    print(f"\nconfig {args.preset}: {kwargs}, batch {b} x {n} tokens, {r} neighbors x {2 * config.chunk_size} tokens, "
          f"{ours.num_parameters / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    print(f"model FLOPs per fwd+bwd step: {flops / 1e12:.3f} TFLOP (torch.utils.flop_counter, attention in full)")
    print(f"measured matmul peak (2048^3): float32 {peaks[False] / 1e12:.3f} TFLOP/s, "
          f"bfloat16 {peaks[True] / 1e12:.3f} TFLOP/s\n")
    header = (f"{'model':<14} {'precision':<10} {'s/step':>8} {'vs RP same prec':>16} {'vs RP fp32':>11} "
              f"{'TFLOP/s':>8} {'MFU (own peak)':>15} {'MFU (bf16 peak)':>16}")
    print(header)
    print("-" * len(header))
    for (name, bf16), seconds in rows.items():
        achieved = flops / seconds
        print(f"{name:<14} {'bf16 amp' if bf16 else 'float32':<10} {seconds:>8.2f} "
              f"{rows[('RETRO-pytorch', bf16)] / seconds:>15.2f}x {rows[('RETRO-pytorch', False)] / seconds:>10.2f}x "
              f"{achieved / 1e12:>8.3f} {achieved / peaks[bf16]:>14.1%} {achieved / peaks[True]:>15.1%}")


if __name__ == "__main__":
    main()
