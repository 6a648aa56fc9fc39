"""Training memory, measured on CPU ranks. Not a test.

`--part rss` (the default): per-rank peak RSS of real training processes (torchrun, the resolved ds_configs of
ds_configs/, `retro_dist.train.build.build_model`, `deepspeed.initialize`, one step at micro-batch 1 with activation
checkpointing on every block) for the `150m` and `reference` presets at 1, 2 and 4 ranks under ZeRO 1, 2 and 3, in
bf16 where the CPU has it (train.precision=auto). Each figure is the rank's high-water mark (`ru_maxrss`, read at the
end of the phase: construction, initialize, step) less its RSS before the model existed, the largest over the ranks,
printed beside its theory:

- model state (parameters + gradients + AdamW's fp32 master, m and v) in bytes per rank, with b bytes per 16/32-bit
  parameter: ZeRO-1 2bP + 12P/N, ZeRO-2 bP + (b + 12)P/N, ZeRO-3 (2b + 12)P/N (16P/N in bf16);
- the fixed overhead of the engine, from the ds_config (`ds_overhead`): its buffers are sized in elements, not as a
  share of the model, so they do not shrink with N;
- construction: a plain build holds the fp32 model (4P); under ZeRO-3 zero.Init holds bP/N plus the one module it is
  creating, whole (fp32 as created, then cast).

After the step it also prints the bytes of live tensors (params + grads + optimizer + engine buffers; activations are
freed by then), the figure the ZeRO-3 target is checked on: <= 16P/N x 1.1 + the fixed overhead.

`--part engine`: the earlier tables (live tensor bytes under ZeRO 0/1/2/3 at 2 ranks on a 12-layer model; activation
memory and time with and without activation checkpointing; ZeRO 1/2/3 step time against torch DDP).

    python bench/train_memory.py                                   # every configuration, one at a time (~40 min)
    python bench/train_memory.py --presets reference --ranks 2 4 --stages 3
    python bench/train_memory.py --part engine                     # ~3 minutes on a 2-core CPU
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
VOCAB, SEQ, NEIGHBORS = 32000, 2048, 2  # bench/model_step.py's reference shapes (--rss-seq changes SEQ)
GB = 1e9


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


def engine_worker(args: argparse.Namespace) -> None:
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


def run_engine(engine: str, ac: str, *, layers: int, dim: int, seq: int, micro: int, steps: int) -> dict:
    from retro_dist.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, "--worker", "engine", "--engine", engine, "--ac", ac, "--layers", str(layers), "--dim", str(dim),
           "--seq", str(seq), "--micro", str(micro), "--steps", str(steps)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{engine}/{ac} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[0][7:])


def engine_tables(args: argparse.Namespace) -> None:
    shape = dict(layers=args.layers, dim=args.dim, seq=args.seq, micro=args.micro, steps=args.steps)
    zero_shape = shape | {"seq": 256, "micro": 2}  # state memory does not depend on the batch: keep it quick
    zero = {e: run_engine(e, "none", **zero_shape) for e in ("zero0", "zero1", "zero2", "zero3")}
    ddp = run_engine("ddp", "none", **zero_shape)
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


# peak RSS per rank -------------------------------------------------------------------------------------------------


def rss(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Start a new high-water mark: writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each phase has its own."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from retro_dist.config import load_run_config
    from retro_dist.dist import init_distributed
    from retro_dist.model.presets import preset_config
    from retro_dist.train.build import build_model
    from retro_dist.train.ds_config import batch_plan, build_ds_config, engine_settings
    from retro_dist.train.parallelize import param_groups

    info = init_distributed()
    # the ds_config training resolves: ds_configs/zeroS.json's buckets, micro-batch 1, no accumulation
    run = load_run_config(None, ["--data.dataset=unused", f"--train.zero_stage={args.stage}"])
    ds_config = build_ds_config(run, engine_settings(run), batch_plan(0, 1, info.world_size), args.precision)
    config = preset_config(args.preset, num_tokens=VOCAB, max_seq_len=SEQ)
    g = torch.Generator().manual_seed(0)
    n = args.rss_seq  # the model is built for SEQ; a shorter step changes only the activations, not the state
    seq = torch.randint(1, VOCAB, (1, n + 1), generator=g)
    retrieved = torch.randint(1, VOCAB, (1, n // config.chunk_size, NEIGHBORS, 2 * config.chunk_size), generator=g)
    gc.collect()
    figures = {"base": rss("VmRSS")}  # imports, process group, inputs: everything below is above this
    reset_peak()
    model, count = build_model(config, ds_config, seed=0, activation_checkpointing="every")
    figures["build"] = rss("VmHWM")
    reset_peak()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, run.optim.weight_decay),
                                           config=ds_config)
    figures["init"] = rss("VmHWM")
    reset_peak()
    engine.backward(engine(seq, retrieved, return_loss=True))
    engine.step()  # torch's AdamW creates m and v here
    engine.backward(engine(seq, retrieved, return_loss=True))
    # the whole model state exists between the second backward and its step: params, grads (partitioned or not, as
    # the stage has them), fp32 master, m and v, the engine's buffers; the activations are freed by then
    figures["live"] = live_tensor_bytes()
    engine.step()
    figures["step"] = rss("VmHWM")  # the peak over both steps
    gc.collect()
    figures["after"] = rss("VmRSS")
    values = torch.tensor(list(figures.values()), dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)  # the largest rank is the one that runs out first
    if info.rank == 0:
        print("RESULT " + json.dumps(dict(zip(figures, values.tolist())) | {"params": count}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def model_shape(preset: str, persistence_threshold: int) -> dict:
    """Counts from a build on the meta device (no memory): parameters, the largest module's own parameters (what
    zero.Init holds whole while it creates that module), the largest decoder block, and the parameters small enough
    that ZeRO-3 keeps them whole on every rank (below stage3_param_persistence_threshold)."""
    import torch

    from retro_dist import RETRO
    from retro_dist.model.presets import preset_config
    with torch.device("meta"):
        model = RETRO(preset_config(preset, num_tokens=VOCAB, max_seq_len=SEQ))
    own = {name or "(root)": sum(p.numel() for p in m.parameters(recurse=False)) for name, m in model.named_modules()}
    largest = max(own, key=own.get)
    return {"params": model.num_parameters, "largest_module": largest, "largest_numel": own[largest],
            "layer_numel": max(sum(p.numel() for p in b.parameters()) for b in model.decoder.blocks),
            "persistent_numel": sum(p.numel() for p in model.parameters() if p.numel() < persistence_threshold)}


def ds_overhead(stage: int, pb: int, zero: dict, persistent_numel: int) -> tuple[float, str]:
    """Bytes per rank the engine allocates by element counts of the ds_config rather than by share of the model,
    and what they are. These do not shrink with N: at a small model they are a large part of the state."""
    reduce = int(zero.get("reduce_bucket_size", 5e8))
    if stage in (1, 2):
        # gradients are copied into a reduce bucket (two with overlap_comm, so one reduces while the next fills)
        buffers = 2 if zero.get("overlap_comm", False) else 1
        return buffers * reduce * pb, f"{buffers} x reduce_bucket_size {reduce:.0e} x {pb} B"
    # stage 3: one reduce bucket; parameters below the persistence threshold stay whole on every rank (their
    # bytes beyond the 1/N share); the prefetch bucket and the live-parameter cap are transient (inside fwd/bwd)
    return (reduce * pb + persistent_numel * pb,
            f"reduce_bucket_size {reduce:.0e} x {pb} B + {persistent_numel / 1e6:.2f}M persistent params x {pb} B")


def theory(stage: int, n: int, p: int, pb: int) -> float:
    """Model state per rank: b-byte params and grads (whole or 1/N) + fp32 master, m, v (12 bytes, 1/N)."""
    return pb * p * (1 if stage < 3 else 1 / n) + pb * p * (1 if stage < 2 else 1 / n) + 12 * p / n


def mem_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0.0


def run_rss(preset: str, nproc: int, stage: int, precision: str, timeout: int, mmap_threshold: int,
            seq: int) -> dict:
    from retro_dist.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", "rss", "--preset", preset,
           "--stage", str(stage), "--precision", precision, "--rss-seq", str(seq)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[0][7:]) | {"wall_s": time.perf_counter() - start}


def rss_tables(args: argparse.Namespace) -> None:
    from retro_dist.precision import resolve_precision
    precision = resolve_precision("auto", "cpu").name
    pb = 2 if precision in ("bf16", "fp16") else 4
    settings = {s: json.loads((ROOT / "ds_configs" / f"zero{s}.json").read_text())["zero_optimization"]
                for s in args.stages}
    malloc = (f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else
              "glibc's default (dynamic) mmap threshold")
    print(f"\npeak RSS per rank (VmHWM of each rank's process, reset at each phase; the largest rank), less the "
          f"rank's RSS before the model; {precision} ({pb} B/param), vocab {VOCAB}, max_seq_len {SEQ}, steps of "
          f"{args.rss_seq} tokens, micro-batch 1, "
          f"{NEIGHBORS} neighbors, activation checkpointing every block, ds_configs/zeroS.json, 2 steps, {malloc}; "
          f"GB = 1e9 bytes\n"
          f"columns: build / init / step = peak of that phase, theory beside build; after = RSS after the steps; "
          f"live = bytes of live tensors between the second backward and its step (the whole model state), beside "
          f"its theory (state th.) and the fixed overhead (+ovh)\n")
    for preset in args.presets:
        shape = model_shape(preset, int(settings.get(3, {}).get("stage3_param_persistence_threshold", 1e5)))
        p = shape["params"]
        print(f"{preset}: P = {p / 1e6:.1f}M; largest module {shape['largest_module']} {shape['largest_numel'] / 1e6:.1f}M "
              f"params (one decoder layer {shape['layer_numel'] / 1e6:.1f}M)")
        for stage in args.stages:
            overhead, why = ds_overhead(stage, pb, settings[stage], shape["persistent_numel"])
            print(f"  ZeRO-{stage} fixed overhead {overhead / GB:.2f} GB = {why}")
        header = (f"{'preset':<10}{'N':>2}{'ZeRO':>5} | {'build':>6}{'theory':>7} | {'init':>6} | {'step':>6} | "
                  f"{'after':>6}{'live':>6}{'state th.':>10}{'+ovh':>6}{'live/th':>8} | {'base':>5}{'s':>5}")
        print(header + "\n" + "-" * len(header))
        for nproc in args.ranks:
            for stage in args.stages:
                build_theory = 4 * p if stage < 3 else pb * p / nproc + (4 + pb) * shape["largest_numel"]
                state = theory(stage, nproc, p, pb)
                overhead, _ = ds_overhead(stage, pb, settings[stage], shape["persistent_numel"])
                need = nproc * (0.35 * GB + max(build_theory, state + overhead + args.activation_gb * GB))
                if need > min(args.max_gb * GB, mem_available() - 2 * GB):
                    print(f"{preset:<10}{nproc:>2}{stage:>5} | not measured: needs ~{need / GB:.1f} GB, limit "
                          f"{args.max_gb} GB, {mem_available() / GB:.1f} GB available")
                    continue
                r = run_rss(preset, nproc, stage, precision, args.timeout, args.malloc_mmap_threshold, args.rss_seq)
                if "error" in r:
                    print(f"{preset:<10}{nproc:>2}{stage:>5} | failed: {r['error']}")
                    continue
                base = r["base"]
                ratio = r["live"] / state
                print(f"{preset:<10}{nproc:>2}{stage:>5} | {(r['build'] - base) / GB:>6.2f}{build_theory / GB:>7.2f} | "
                      f"{(r['init'] - base) / GB:>6.2f} | {(r['step'] - base) / GB:>6.2f} | "
                      f"{(r['after'] - base) / GB:>6.2f}{r['live'] / GB:>6.2f}{state / GB:>10.2f}{overhead / GB:>6.2f}"
                      f"{ratio:>7.2f}x | {base / GB:>5.2f}{r['wall_s']:>5.0f}", flush=True)
                if stage == 3:
                    ok_state = r["live"] <= state * 1.1 + overhead
                    ok_build = r["build"] - base <= build_theory
                    print(f"{'':<17}   ZeRO-3 targets: live state {r['live'] / GB:.2f} <= {state / GB:.2f} x 1.1 + "
                          f"{overhead / GB:.2f} GB: {ok_state}; construction {(r['build'] - base) / GB:.2f} <= "
                          f"{build_theory / GB:.2f} GB: {ok_build}", flush=True)
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("rss", "engine"), default="rss")
    parser.add_argument("--worker", choices=("rss", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("--presets", nargs="+", default=["reference", "150m"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--max-gb", type=float, default=10.7, help="skip a configuration whose estimate is above this "
                                                                     "(all its ranks together)")
    parser.add_argument("--activation-gb", type=float, default=1.2, help="per-rank activation estimate for that check")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=65536,
                        help="MALLOC_MMAP_THRESHOLD_ for the ranks (0: glibc's default). A fixed threshold returns "
                             "freed activations to the OS; the default one raises itself as large blocks are freed "
                             "and keeps them in the heap, which RSS then counts")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    parser.add_argument("--rss-seq", type=int, default=SEQ, help="tokens per step (activations only; the state "
                                                                    "does not depend on it)")
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="zero2")
    parser.add_argument("--ac", default="none")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if args.worker == "rss":
        return rss_worker(args)
    if args.worker == "engine":
        return engine_worker(args)
    return rss_tables(args) if args.part == "rss" else engine_tables(args)


if __name__ == "__main__":
    main()
