"""The in-process checks of bench/gpu_check.sh, one per subcommand; each prints one `RESULT <check> ok|FAIL ...` line.

    python bench/gpu_check.py env | nccl | profile | mfu | embed
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def result(check: str, ok: bool, detail: str) -> None:
    print(f"RESULT {check} {'ok' if ok else 'FAIL'} {detail}", flush=True)


def check_env() -> None:
    from retro_dist.precision import auto_precision, gpu_has_native_bf16
    try:
        import deepspeed
        ds = deepspeed.__version__
    except ImportError:
        ds = "not installed"
    name = torch.cuda.get_device_name(0)
    result("env", True, f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, DeepSpeed {ds}, native bf16 "
                        f"{gpu_has_native_bf16()}, auto precision {auto_precision('cuda').name}, "
                        f"{torch.cuda.device_count()} GPU(s)")


def check_nccl() -> None:
    """A 1-rank NCCL group: an all-reduce of a device tensor and broadcast_object_list, as training uses them."""
    import torch.distributed as dist
    from retro_dist.dist import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    t = torch.ones(4, device="cuda")
    dist.all_reduce(t)
    objects = [{"step": 3}]
    dist.broadcast_object_list(objects, src=0)
    dist.barrier()
    dist.destroy_process_group()
    result("nccl", t.sum().item() == 4 and objects[0] == {"step": 3}, "all_reduce and broadcast_object_list on 1 rank")


def reference_model(preset: str, seq_len: int, vocab: int = 32000):
    from retro_dist import RETRO
    from retro_dist.model.presets import preset_config
    config = preset_config(preset, num_tokens=vocab, max_seq_len=seq_len, chunk_size=64, pad_id=0)
    return RETRO(config).cuda(), config


def inputs(config, batch: int, seq_len: int, neighbors: int = 2):
    seq = torch.randint(1, config.num_tokens, (batch, seq_len + 1), device="cuda")
    retrieved = torch.randint(1, config.num_tokens,
                              (batch, seq_len // config.chunk_size, neighbors, 2 * config.chunk_size), device="cuda")
    return seq, retrieved


def check_profile() -> None:
    """Attention kernels at the reference preset, seq 2048, bf16: fused (flash / memory-efficient / cuDNN) against
    the unfused softmax path."""
    from torch.profiler import ProfilerActivity, profile
    model, config = reference_model("reference", 2048)
    seq, retrieved = inputs(config, 2, 2048)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(seq, retrieved, return_loss=True).backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(seq, retrieved, return_loss=True).backward()
            torch.cuda.synchronize()
    names = [e.key.lower() for e in prof.key_averages()]
    fused = sum(1 for n in names if any(k in n for k in ("flash", "fmha", "efficient_attention", "cudnn_sdpa",
                                                         "scaled_dot_product")))
    softmax = sum(1 for n in names if "softmax" in n)
    result("profile", fused > 0, f"fused attention kernel kinds {fused}, softmax kernel kinds {softmax} "
                                 f"(reference preset, seq 2048, bf16)")


def check_mfu() -> None:
    """Model FLOPs utilisation of a forward + backward + AdamW step against the datasheet peak, bf16 autocast."""
    from retro_dist.train.metrics import model_flops_per_sample, peak_flops
    peak = peak_flops(torch.device("cuda", 0), "bf16")
    rows = []
    for preset, batch in (("reference", 8), ("150m", 8)):
        model, config = reference_model(preset, 2048)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        seq, retrieved = inputs(config, batch, 2048)
        times = []
        for i in range(8):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(seq, retrieved, return_loss=True)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
        step = statistics.median(times)
        flops = batch * model_flops_per_sample(config, 2048, 2) / step
        rows.append(f"{preset} {step * 1e3:.1f} ms/step {flops / 1e12:.1f} TFLOP/s MFU {flops / peak.flops:.1%}")
        del model, optimizer
        torch.cuda.empty_cache()
    result("mfu", True, f"{'; '.join(rows)} (batch 8 x 2048, bf16; against {peak.describe()})")


def check_embed() -> None:
    """MiniLM chunks/s on the GPU against the CPU, on 10k chunks of real text (the CPU on a sample of 500)."""
    from data_prep.corpora import stdlib_docstrings
    from retro_dist.retrieval.embedders import MiniLMEmbedder
    words = " ".join(stdlib_docstrings(3000)).split()
    texts = [" ".join(words[i:i + 48]) for i in range(0, 48 * 10000, 48)][:10000]
    rates = {}
    for device, sample in (("cuda", texts), ("cpu", texts[:500])):
        embedder = MiniLMEmbedder(device=device)
        embedder(sample[:64])
        start = time.perf_counter()
        embedder(sample)
        if device == "cuda":
            torch.cuda.synchronize()
        rates[device] = len(sample) / (time.perf_counter() - start)
    result("embed", True, f"MiniLM {rates['cuda']:,.0f} chunks/s on the GPU, {rates['cpu']:,.0f} on the CPU "
                          f"({rates['cuda'] / rates['cpu']:.0f}x) ({len(texts)} chunks)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("check", choices=["env", "nccl", "profile", "mfu", "embed"])
    check = parser.parse_args().check
    try:
        {"env": check_env, "nccl": check_nccl, "profile": check_profile, "mfu": check_mfu, "embed": check_embed}[check]()
    except Exception as e:  # noqa: BLE001 - the script goes on to the next check; the log has the traceback
        import traceback
        traceback.print_exc()
        result(check, False, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")


if __name__ == "__main__":
    main()
