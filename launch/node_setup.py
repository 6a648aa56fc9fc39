"""What a GPU node needs before its ranks start, run once per node by the launchers (never by a rank):

  python -m retro_dist.launch.node_setup --check-gpus --build auto -- TRAIN_ARGS   # local.sh, hostfile.sh (no ssh)
  python -m retro_dist.launch.node_setup --check-gpus --ops -- TRAIN_ARGS          # prints the ops: cpu_adam,...
  python -m retro_dist.launch.node_setup --build cpu_adam                          # on every node (srun, mpirun)

--check-gpus: one line and exit 2 when the node has GPUs but this venv's torch sees none (a CPU build of torch, or a
driver it cannot load): the ranks would otherwise train on CPU with gloo, or fail with "invalid device ordinal".

--build: DeepSpeed compiles the optimizer a ZeRO-Offload run needs (DeepSpeedCPUAdam, or FusedAdam where only the
parameters are offloaded) the first time it is used, into TORCH_EXTENSIONS_DIR. Done by the ranks themselves, 8 ranks
per node wait on one build lock inside the process group's start-up, and a build killed half-way leaves a lock that
hangs the next job. Built here first, the ranks only load it. An op installed prebuilt (`DS_BUILD_CPU_ADAM=1 pip
install deepspeed`) loads at once.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

# op name -> DeepSpeed op builder class
BUILDERS = {"cpu_adam": "CPUAdamBuilder", "fused_adam": "FusedAdamBuilder"}


def needed_ops(train_args: list[str]) -> list[str]:
    """The JIT-built ops the run needs: none unless its ds_config offloads (the trainer uses torch's AdamW then)."""
    from retro_dist.config import load_run_config
    from retro_dist.train.ds_config import engine_settings

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--local_rank", "--local-rank")
    args, overrides = parser.parse_known_args(train_args)
    try:
        zero = engine_settings(load_run_config(args.config, overrides)).get("zero_optimization", {})
    except Exception:  # noqa: BLE001 - a bad run config is the ranks' to report, in their one line
        return []
    if zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme"):
        return ["cpu_adam"]
    if zero.get("offload_param", {}).get("device", "none") != "none":
        return ["fused_adam"]
    return []


def check_gpus() -> str | None:
    """The one line to print when torch sees no GPU on a node that has them, else None."""
    import os

    import torch

    if torch.cuda.device_count() > 0:
        return None
    held = ", ".join(f"{v}={os.environ[v]}" for v in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES") if v in os.environ)
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"node {socket.gethostname()} has GPUs{f' ({held})' if held else ''} but torch {torch.__version__} "
            f"({build}) in {sys.prefix} sees none: install a CUDA build of torch there, or run on CPU "
            f"(sbatch --gpus-per-node=0; CUDA_VISIBLE_DEVICES= for the other launchers)")


def build(ops: list[str]) -> None:
    import deepspeed.ops.op_builder as op_builder

    for op in ops:
        start = time.perf_counter()
        getattr(op_builder, BUILDERS[op])().load(verbose=False)
        print(f"node {socket.gethostname()}: DeepSpeed op {op} ready ({time.perf_counter() - start:.0f} s)",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="node_setup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-gpus", action="store_true", help="exit 2 with one line when torch sees no GPU")
    parser.add_argument("--ops", action="store_true", help="print the ops the run needs (comma-separated) and exit")
    parser.add_argument("--build", metavar="OPS", help=f"ops to build, comma-separated ({', '.join(BUILDERS)}), "
                                                       "or auto: those the run needs")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of retro-dist train")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.check_gpus:
        problem = check_gpus()
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            return 2
    if args.ops:
        print(",".join(needed_ops(train_args)))
        return 0
    if args.build:
        ops = needed_ops(train_args) if args.build == "auto" else [op for op in args.build.split(",") if op]
        unknown = [op for op in ops if op not in BUILDERS]
        if unknown:
            print(f"error: unknown op {', '.join(unknown)}: give {', '.join(BUILDERS)}", file=sys.stderr)
            return 2
        build(ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
