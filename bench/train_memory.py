"""ZeRO memory, activation checkpointing and engine overhead, measured on 2 CPU ranks. Not a test.

Prints three tables:
1. per-rank bytes of live tensors after a step (parameters + gradients + optimizer states + the engine's buffers;
   activations are freed by then) under ZeRO 0/1/2/3 at 2 ranks, and stage 3 against stage 0 / N (target <= 1/N
   + 5%);
2. activation memory (bytes autograd keeps for backward) and fwd+bwd time with and without activation
   checkpointing at 12 decoder layers (targets: <= 1/3 of the memory, <= 1.4x the time);
3. step time of ZeRO 1/2/3 against plain torch DDP on the same model (the engine's overhead).

    python bench/train_memory.py            # ~3 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process."""
    import torch
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen and storage.nbytes():
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001 - a few objects fail isinstance probes or are meta tensors
            continue
    return total


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from retro_dist import RETRO, RetroConfig
    from retro_dist.train.parallelize import apply_activation_checkpointing, param_groups

    config = RetroConfig(num_tokens=8000, max_seq_len=args.seq, enc_dim=256, enc_depth=2, dec_dim=args.dim,
                         dec_depth=args.layers, dec_cross_attn_layers=(args.layers // 2, args.layers), heads=8,
                         dim_head=32, chunk_size=64)
    torch.manual_seed(0)
    model = RETRO(config)
    apply_activation_checkpointing(model, args.ac)
    b = args.micro
    seq = torch.randint(1, 8000, (b, args.seq + 1))
    retrieved = torch.randint(1, 8000, (b, args.seq // 64, 2, 128))
    if args.engine == "ddp":
        from retro_dist.dist import init_distributed
        init_distributed()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)

        def step():
            ddp(seq, retrieved, return_loss=True).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        import deepspeed

        from retro_dist.dist import init_distributed
        init_distributed()
        ds = {"train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": 1, "train_batch_size": 2 * b,
              # buckets well below the model size: what is measured is the sharding, not fixed-size buffers
              "zero_optimization": {"stage": int(args.engine[-1]), "reduce_bucket_size": 2_000_000,
                                    "allgather_bucket_size": 2_000_000, "stage3_prefetch_bucket_size": 2_000_000,
                                    "stage3_param_persistence_threshold": 10_000,
                                    "stage3_max_live_parameters": 4_000_000},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
              "steps_per_print": 10 ** 9}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds)

        def step():
            loss = engine(seq, retrieved, return_loss=True)
            engine.backward(loss)
            engine.step()
    step()
    gc.collect()
    state_bytes = live_tensor_bytes()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"state_bytes": state_bytes, 
                                      "step_s": sorted(times)[len(times) // 2],
                                      "params": sum(p.numel() for p in model.parameters())}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def activation_bytes(mode: str, *, layers: int, dim: int, seq: int, micro: int, steps: int) -> dict:
    """Bytes autograd keeps for backward after a forward (the activation memory), and the fwd+bwd time, in this
    process. With checkpointing, only each checkpointed block's inputs are kept; its insides are recomputed."""
    import torch

    from retro_dist import RETRO, RetroConfig
    from retro_dist.train.parallelize import apply_activation_checkpointing

    config = RetroConfig(num_tokens=8000, max_seq_len=seq, enc_dim=256, enc_depth=2, dec_dim=dim, dec_depth=layers,
                         dec_cross_attn_layers=(layers // 2, layers), heads=8, dim_head=32, chunk_size=64)
    torch.manual_seed(0)
    model = RETRO(config)
    apply_activation_checkpointing(model, mode)
    seq_t = torch.randint(1, 8000, (micro, seq + 1))
    retrieved = torch.randint(1, 8000, (micro, seq // 64, 2, 128))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(seq_t, retrieved, return_loss=True)
    saved = sum(seen.values())
    loss.backward()
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(seq_t, retrieved, return_loss=True).backward()
        times.append(time.perf_counter() - start)
    return {"saved_bytes": saved, "step_s": sorted(times)[len(times) // 2]}


def run(engine: str, ac: str, *, layers: int, dim: int, seq: int, micro: int, steps: int) -> dict:
    from retro_dist.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "--worker", "--engine", engine, "--ac", ac, "--layers", str(layers), "--dim", str(dim),
           "--seq", str(seq), "--micro", str(micro), "--steps", str(steps)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{engine}/{ac} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[0][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="zero2")
    parser.add_argument("--ac", default="none")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    shape = dict(layers=args.layers, dim=args.dim, seq=args.seq, micro=args.micro, steps=args.steps)
    zero_shape = shape | {"seq": 256, "micro": 2}  # state memory does not depend on the batch: keep it quick
    zero = {e: run(e, "none", **zero_shape) for e in ("zero0", "zero1", "zero2", "zero3")}
    ddp = run("ddp", "none", **zero_shape)
    ac = {mode: activation_bytes(mode, **shape) for mode in ("none", "every")}

    print(f"\nmodel: {zero['zero0']['params'] / 1e6:.1f}M parameters, {args.layers} decoder layers of {args.dim}, "
          f"seq {args.seq}, micro-batch {args.micro}, 2 ranks x 1 thread, fp32\n")
    print(f"{'engine':<8}{'state MB/rank':>15}{'vs ZeRO-0':>11}")
    for name, r in zero.items():
        print(f"{name:<8}{r['state_bytes'] / 1e6:>15.1f}{r['state_bytes'] / zero['zero0']['state_bytes']:>10.2f}x")
    target = zero["zero0"]["state_bytes"] / 2 * 1.05
    print(f"ZeRO-3 <= ZeRO-0 / 2 + 5%: {zero['zero3']['state_bytes'] <= target} "
          f"({zero['zero3']['state_bytes'] / 1e6:.1f} MB vs {target / 1e6:.1f} MB)\n")
    none, every = ac["none"], ac["every"]
    print(f"activation checkpointing, one process, seq {args.seq}, micro-batch {args.micro}:")
    print(f"{'mode':<16}{'activations MB':>16}{'fwd+bwd s':>11}")
    for mode, r in ac.items():
        print(f"{mode:<16}{r['saved_bytes'] / 1e6:>16.1f}{r['step_s']:>11.2f}")
    print(f"memory ratio {every['saved_bytes'] / max(none['saved_bytes'], 1):.2f} (target <= 0.33), "
          f"time ratio {every['step_s'] / none['step_s']:.2f} (target <= 1.4)\n")
    print("engine overhead, 2 ranks, seq 256, micro-batch 2:")
    print(f"{'engine':<8}{'step s':>8}{'vs DDP':>8}")
    print(f"{'ddp':<8}{ddp['step_s']:>8.2f}{1.0:>7.2f}x")
    for name in ("zero1", "zero2", "zero3"):
        print(f"{name:<8}{zero[name]['step_s']:>8.2f}{zero[name]['step_s'] / ddp['step_s']:>7.2f}x")


if __name__ == "__main__":
    main()
