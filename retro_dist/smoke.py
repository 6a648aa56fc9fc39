"""Model smoke run (`make demo` until the end-to-end demo lands): train a tiny RETRO for a minute on CPU on a task
only retrieval can solve, then check save/load and the RETRO-pytorch conversion round trip.

The task: random token sequences whose text is also in the "database": each chunk's neighbor is the chunk itself
followed by its continuation (the next chunk), as retrieval finds when the corpus holds the same document. A model
that reads its neighbors through chunked cross-attention learns to copy the continuation; without retrieval the
tokens are unpredictable (the loss stays at ln(vocab)).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

from retro_dist import RETRO, RetroConfig
from retro_dist.convert import from_retro_pytorch, to_retro_pytorch

CONFIG = RetroConfig(num_tokens=64, max_seq_len=128, enc_dim=64, enc_depth=2, dec_dim=128, dec_depth=2,
                     dec_cross_attn_layers=(1,), heads=8, dim_head=32, chunk_size=16)


def make_batch(batch: int, generator: torch.Generator, config: RetroConfig = CONFIG):
    n, cs = config.max_seq_len, config.chunk_size
    k = n // cs
    stream = torch.randint(1, config.num_tokens, (batch, n + 3 * cs), generator=generator)
    seq = stream[:, : n + 1]
    neighbors = torch.stack([stream[:, c * cs: (c + 2) * cs] for c in range(k)], dim=1)
    return seq, neighbors[:, :, None]  # [b, k, r=1, 2 * cs]


def evaluate(model: RETRO, generator: torch.Generator) -> tuple[float, float]:
    model.eval()
    seq, retrieved = make_batch(16, generator)
    with torch.no_grad():
        with_retrieval = model(seq, retrieved, return_loss=True).item()
        without = model(seq, return_loss=True).item()
    model.train()
    return with_retrieval, without


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = RETRO(CONFIG)
    print(f"tiny RETRO: {model.num_parameters:,} parameters; chance loss ln({CONFIG.num_tokens}) = "
          f"{math.log(CONFIG.num_tokens):.3f}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    train_gen, eval_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        seq, retrieved = make_batch(args.batch, train_gen)
        loss = model(seq, retrieved, return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps:
            on, off = evaluate(model, eval_gen)
            print(f"step {step:4d}  train loss {loss.item():.3f}  val loss with retrieval {on:.3f}  "
                  f"without {off:.3f}  ({time.perf_counter() - start:.0f}s)")

    on, off = evaluate(model, torch.Generator().manual_seed(3))
    print(f"retrieval lowers the loss from {off:.3f} to {on:.3f} (perplexity {math.exp(off):.1f} -> {math.exp(on):.1f})")
    model.eval()
    seq, retrieved = make_batch(2, torch.Generator().manual_seed(4))
    seq = seq[:, :-1]
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        same = torch.equal(RETRO.from_pretrained(tmp).eval()(seq, retrieved), model(seq, retrieved))
        print(f"save_pretrained -> from_pretrained gives identical logits: {same}")
        back = RETRO(CONFIG).eval()
        back.load_state_dict(from_retro_pytorch(to_retro_pytorch(model.state_dict(), CONFIG), CONFIG))
        exact = torch.equal(back(seq, retrieved), model(seq, retrieved))
        print(f"RETRO-pytorch state dict round trip gives identical logits: {exact}")
    with torch.no_grad():
        bf16 = model.to(torch.bfloat16)(seq, retrieved).float()
    print(f"bf16 weights run too (max |logit diff| vs fp32: "
          f"{(bf16 - model.float()(seq, retrieved)).abs().max().item():.3f})")
    ok = same and exact and on < 0.5 * off
    print("smoke run OK" if ok else "smoke run FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
