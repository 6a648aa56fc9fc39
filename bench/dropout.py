"""The cost of sample-keyed dropout: forward+backward step time with every dropout at 0.1, masks keyed per sample
(`sample_keyed`, what the trainer does) against plain dropout on torch's global generator, and against dropout
off, on the same weights and inputs. Not a test: the three alternate step by step and the median is reported.

    python bench/dropout.py                  # the reference config, batch 2 x 2048 tokens, 2 neighbors
    python bench/dropout.py --preset small
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from retro_dist import RETRO, RetroConfig
from retro_dist.model.dropout import sample_keyed

from model_step import PRESETS  # the same configs as the step-time bench (run as python bench/dropout.py)

DROPOUT = dict(enc_attn_dropout=0.1, enc_ff_dropout=0.1, dec_attn_dropout=0.1, dec_ff_dropout=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    torch.manual_seed(0)
    models = {"off": RETRO(RetroConfig(**p["kwargs"])), "plain": RETRO(RetroConfig(**p["kwargs"], **DROPOUT))}
    models["keyed"] = models["plain"]
    for m in models.values():
        m.load_state_dict(models["off"].state_dict())
        m.train()
    b, n, k = p["batch"], p["seq_len"], p["seq_len"] // 64
    seq = torch.randint(1, p["kwargs"]["num_tokens"], (b, n + 1))
    retrieved = torch.randint(1, p["kwargs"]["num_tokens"], (b, k, p["neighbors"], 128))

    print(f"preset {args.preset}: batch {b} x {n} tokens, {p['neighbors']} neighbors, every dropout 0.1 "
          f"(off: 0), {torch.get_num_threads()} threads, median of {args.steps} alternated steps\n")
    print(f"{'precision':<10}{'off s':>8}{'plain s':>9}{'keyed s':>9}{'keyed / plain':>15}{'keyed / off':>13}")
    for precision in ("fp32", "bf16"):
        times = {name: [] for name in models}
        for step in range(args.steps + 1):
            for name, model in models.items():
                keys = sample_keyed(0, step, range(b)) if name == "keyed" else contextlib.nullcontext()
                amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
                start = time.perf_counter()
                with keys:
                    with amp:
                        loss = model(seq, retrieved, return_loss=True)
                    loss.backward()
                if step:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"{precision:<10}{med['off']:>8.2f}{med['plain']:>9.2f}{med['keyed']:>9.2f}"
              f"{med['keyed'] / med['plain']:>14.2f}x{med['keyed'] / med['off']:>12.2f}x")


if __name__ == "__main__":
    main()
