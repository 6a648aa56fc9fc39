"""A measured RETRO-fit, end to end on CPU: no pretrained weights can be fetched here, so a small Llama base is
pretrained first (transformers' LlamaForCausalLM, through our trainer, retrieval off, every weight trained), saved as
an ordinary transformers checkpoint, and then

  (a) retrofitted with its weights frozen (the RETRO paper's recipe: only CCA + encoder train),
  (b) retrofitted with every weight trained (InstructRetro's),
  (c) compared with our RETRO trained from scratch for the pretraining + retrofit steps together,

all on one real corpus (the demo's: three packages of Python's standard library source, hash-256 neighbors). Prints
the validation loss with true neighbors, random neighbors and retrieval off for each, the steps each took, and the
retrieval-off loss of (a) against the base (equal by construction: the frozen base's logits never change).

    python bench/retrofit.py --out /tmp/retrofit-bench [--pretrain-steps 200] [--retrofit-steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PACKAGES = ("encodings", "email", "asyncio")  # the demo's corpus


def run(cmd: list[str], log: Path) -> None:
    import torch
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": str(ROOT)}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # on a GPU machine the runs take the GPU
    with open(log, "w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        sys.exit(f"{' '.join(cmd[:8])} ... failed with exit code {code}: see {log}")


def train(run_dir: Path, args: list[str], log: Path) -> float:
    from retro_dist.dist import free_port
    start = time.perf_counter()
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "retro_dist.cli", "train", f"--run_dir={run_dir}", *args], log)
    run([sys.executable, "-m", "retro_dist.cli", "export", str(run_dir)], log.with_suffix(".export.log"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/retrofit-bench"))
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--retrofit-steps", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-samples", type=int, default=128)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    from data_prep.corpora import stdlib_sources, write_corpus
    from data_prep.pipeline import main as prepare
    from retro_dist.evaluate import evaluate_model
    from retro_dist.retrofit.base import llama_style_tokenizer, save_random_base

    t0 = time.perf_counter()
    docs = stdlib_sources(PACKAGES)
    from tokenizers import Tokenizer
    if not (out / "tokenizer.json").is_file():
        llama_style_tokenizer(docs, args.vocab).save(str(out / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    base0 = out / f"base-init-h{args.hidden}-l{args.layers}"
    if not (base0 / "config.json").is_file():
        save_random_base(base0, family="llama", vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden,
                         layers=args.layers, heads=args.hidden // 32, kv_heads=max(1, args.hidden // 64),
                         intermediate_size=int(args.hidden * 8 / 3) // 16 * 16, max_positions=args.seq_len,
                         tokenizer=tokenizer, seed=0)
    dataset = out / "ds"
    if not (dataset / "manifest.json").is_file():
        corpus = write_corpus(out / "corpus", docs)
        assert prepare(["--input", str(corpus), "--out", str(dataset), "--tokenizer", str(out / "tokenizer.json"),
                        "--chunk-size", str(args.chunk_size), "--seq-len", str(args.seq_len), "--embedder",
                        "hash-256", "--num-neighbors", "2", "--val-fraction", "0.05"]) == 0
    prep_s = time.perf_counter() - t0
    common = [f"--data.dataset={dataset}", f"--data.micro_batch={args.micro_batch}", "--data.num_workers=0",
              "--train.precision=fp32", "--train.zero_stage=2", f"--optim.lr={args.lr}", "--optim.warmup_steps=20",
              "--logging.every=25", "--logging.val_every=0", "--checkpoint.every=100000", "--logging.tensorboard=false"]
    runs: dict[str, dict] = {}

    # the base: transformers' Llama, every weight trained, retrieval off (its CCA is never run and stays zero)
    pre = out / "pretrain"
    seconds = train(pre, [*common, f"--model.retrofit={base0}", "--model.freeze_base=false", "--data.retrieval=false",
                          f"--train.steps={args.pretrain_steps}"], out / "pretrain.log")
    base = pre / "export" / "base"  # an ordinary transformers checkpoint
    runs["base (pretrained, retrieval off)"] = {"dir": pre / "export", "steps": args.pretrain_steps, "s": seconds}

    for name, frozen in (("(a) retrofit, base frozen", True), ("(b) retrofit, all weights", False)):
        run_dir = out / ("frozen" if frozen else "unfrozen")
        seconds = train(run_dir, [*common, f"--model.retrofit={base}", f"--model.freeze_base={str(frozen).lower()}",
                                  f"--train.steps={args.retrofit_steps}"], out / f"{run_dir.name}.log")
        runs[name] = {"dir": run_dir / "export", "steps": f"{args.pretrain_steps} + {args.retrofit_steps}",
                      "s": seconds}

    total = args.pretrain_steps + args.retrofit_steps
    arch = {"enc_dim": args.hidden, "enc_depth": 2, "dec_dim": args.hidden, "dec_depth": args.layers,
            "dec_cross_attn_layers": [max(args.layers // 2, 1), args.layers], "heads": args.hidden // 32,
            "dim_head": 32}
    scratch = out / "scratch"
    seconds = train(scratch, [*common, "--model.preset=tiny", *(f"--model.arch.{k}={json.dumps(v)}"
                                                               for k, v in arch.items()),
                              f"--train.steps={total}"], out / "scratch.log")
    runs["(c) RETRO from scratch"] = {"dir": scratch / "export", "steps": total, "s": seconds}

    rows = []
    for name, r in runs.items():
        report = evaluate_model(str(r["dir"]), str(dataset), max_samples=args.val_samples, batch_size=8)
        rows.append((name, r["steps"], report["loss"], r["s"]))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\nretrofit bench: {cpu}, {os.cpu_count()} cores; corpus {', '.join(PACKAGES)}; data prep {prep_s:.0f} s")
    print(f"base: Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; seq {args.seq_len}, chunk "
          f"{args.chunk_size}, micro-batch {args.micro_batch}, lr {args.lr}; val {args.val_samples} samples\n")
    print(f"| {'model':34s} | {'steps':>10s} | {'val true':>8s} | {'random':>8s} | {'off':>8s} | {'wall s':>7s} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 9}|")
    for name, steps, loss, s in rows:
        print(f"| {name:34s} | {str(steps):>10s} | {loss['true']:8.4f} | {loss['random']:8.4f} | {loss['off']:8.4f} "
              f"| {s:7.0f} |")
    base_off, frozen_off = rows[0][2]["off"], rows[1][2]["off"]
    print(f"\nretrieval-off loss of (a) {frozen_off:.6f} vs the base {base_off:.6f}: "
          f"{'equal' if frozen_off == base_off else f'differs by {frozen_off - base_off:+.2e}'}")


if __name__ == "__main__":
    main()
