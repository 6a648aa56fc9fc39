"""Export memory, measured on CPU. Not a test.

For each ZeRO stage, a real checkpoint of the `150m` preset (vocabulary 32000, fp32 master weights, AdamW after one
tiny step, so the optimizer files hold the Adam moments too) is written by 2 ranks under torchrun through a real
DeepSpeed engine and the project's Checkpointer. Then each export path runs in a child process of its own:

- `new`: `retro-dist export` as shipped (retro_dist.train.export.export): batches of parameters consolidated from
  memory-mapped partitions, written as they come;
- `old`: the path it replaced: DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` (the whole fp32 model, and
  every rank's flat groups while it runs), then a second model built and loaded from it, then saved.

The figure is the child's high-water RSS (`ru_maxrss`, which counts touched pages of memory-mapped files too) less
its RSS after its imports, against the exported model's size (the fp32 weights file). Target for `new`: <= 1.3x.
What the streaming figure is made of (measured at 150m, ZeRO-2): ~80 MB fixed, the first model built on the meta
device (the name/shape check) loading torch's meta kernels; then one read batch, here the largest parameter alone (the
32000 x 768 output projection, 98 MB), plus at most READ_BATCH_BYTES (64 MiB) of mapped checkpoint pages. It does not
grow with the model beyond its largest parameter.

    python bench/export_memory.py                    # ZeRO 2 and 3 (~4 minutes on a 2-core CPU, ~5 GB at peak)
    python bench/export_memory.py --stages 3 --preset reference
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ_LEN, MB = 32000, 2048, 1e6


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def model_config(preset: str):
    from retro_dist.model.presets import preset_config
    return preset_config(preset, num_tokens=VOCAB, max_seq_len=SEQ_LEN)


def save_worker(args: argparse.Namespace) -> None:
    """One rank: a real engine, one step at a short sequence, one checkpoint through the project's Checkpointer."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from retro_dist import RETRO
    from retro_dist.atomic import write_text_atomic
    from retro_dist.dist import init_distributed
    from retro_dist.train.checkpoint import Checkpointer
    from retro_dist.train.parallelize import param_groups

    init_distributed()
    config = model_config(args.preset)
    torch.manual_seed(0)
    model = RETRO(config)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "train_batch_size": dist.get_world_size(),
          "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 2_000_000,
                                "allgather_bucket_size": 2_000_000, "stage3_prefetch_bucket_size": 2_000_000,
                                "stage3_param_persistence_threshold": 10_000, "stage3_max_live_parameters": 4_000_000},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds)
    seq = torch.randint(1, VOCAB, (1, 2 * config.chunk_size + 1))
    retrieved = torch.randint(1, VOCAB, (1, 2, 2, 2 * config.chunk_size))
    engine.backward(engine(seq, retrieved, return_loss=True))
    engine.step()
    run_dir = Path(args.run_dir)
    if dist.get_rank() == 0:  # the run directory's config as `retro-dist train` writes it (the fields export reads)
        write_text_atomic(run_dir / "config.json", json.dumps({"resolved": {"model": config.to_dict()},
                                                               "data": {"dataset": str(run_dir / "no-dataset")}}))
    Checkpointer(engine, run_dir, keep=1).save(1, {})
    dist.destroy_process_group()


def old_export(run_dir: Path, out: Path) -> None:
    """The export this project shipped before streaming (consolidated dict, then a second model)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from retro_dist.model import RETRO, RetroConfig
    from retro_dist.train.safe_load import safe_torch_load

    config = RetroConfig.from_dict(json.loads((run_dir / "config.json").read_text())["resolved"]["model"])
    with safe_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000001")
    model = RETRO(config)
    model.load_state_dict(state, strict=True)
    model.to(torch.float32).save_pretrained(out)


def measure_worker(args: argparse.Namespace) -> None:
    """A child process: imports, baseline RSS, one export, high-water RSS."""
    import deepspeed.utils.zero_to_fp32  # noqa: F401 - both paths' imports before the baseline
    import torch  # noqa: F401

    from retro_dist.train.export import export
    base = rss_bytes()
    if args.measure == "new":
        export(args.run_dir, args.out)
    else:
        old_export(Path(args.run_dir), Path(args.out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"base": base, "peak": peak}), flush=True)


def env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_measure(path: str, run_dir: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--measure", path, "--run-dir", str(run_dir), "--out", str(out)],
                            env=env(), capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise SystemExit(f"{path} export failed: {result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="150m")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--save-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["new", "old"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_worker:
        return save_worker(args)
    if args.measure:
        return measure_worker(args)

    from retro_dist.dist import free_port
    rows = []
    for stage in args.stages:
        with tempfile.TemporaryDirectory(prefix="export_memory_") as tmp:
            run_dir = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--save-worker",
                   "--stage", str(stage), "--preset", args.preset, "--run-dir", str(run_dir)]
            saved = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=ROOT)
            if saved.returncode:
                raise SystemExit(f"saving the ZeRO-{stage} checkpoint failed: {saved.stderr[-3000:]}")
            ckpt = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*.pt"))
            new = run_measure("new", run_dir, Path(tmp) / "new")
            model = (Path(tmp) / "new" / "model.safetensors").stat().st_size
            old = run_measure("old", run_dir, Path(tmp) / "old")
            rows.append((stage, model, ckpt, new["peak"] - new["base"], old["peak"] - old["base"], new["base"]))
            print(f"ZeRO-{stage}: done", file=sys.stderr, flush=True)

    print(f"\nexport peak RSS above the process's baseline after imports, preset {args.preset} "
          f"(vocab {VOCAB}), checkpoint saved by {args.ranks} ranks, fp32 export\n")
    print("| stage | model MB | checkpoint files MB | streaming export MB | ratio | old path MB | old ratio |")
    print("|---|---|---|---|---|---|---|")
    for stage, model, ckpt, new, old, _ in rows:
        print(f"| ZeRO-{stage} | {model / MB:.0f} | {ckpt / MB:.0f} | {new / MB:.0f} | {new / model:.2f} | "
              f"{old / MB:.0f} | {old / model:.2f} |")
    print(f"\nbaseline after imports: {rows[0][5] / MB:.0f} MB. Target: streaming ratio <= 1.3.")


if __name__ == "__main__":
    main()
