"""Named model sizes. Vocabulary and sequence length come from the dataset (num_tokens, max_seq_len, chunk_size,
pad_id), so a preset fixes only the architecture."""

from __future__ import annotations

from typing import Any

import dataclasses

from .config import RetroConfig

# RetroConfig fields that every dataset fixes (vocab size, seq_len, chunk size, pad id): never set by a preset or
# model.arch, so a model always fits the data it trains on
DATASET_KEYS = {"num_tokens": "vocab_size", "max_seq_len": "seq_len", "chunk_size": "chunk_size", "pad_id": "pad_id"}

# No preset gives the retrieval encoder cross-attention to the decoder's chunk (RETRO-pytorch's default puts it in
# every encoder block): it hands the chunked cross-attention the decoder's own chunk back, a path that lowers the
# loss with any neighbors at all, random ones too, and that the model learns instead of reading its neighbors
# (measured: docs/benchmarks.md, Copy task). Set model.arch.enc_cross_attn_layers to have it.
NO_ENCODER_CROSS_ATTN: tuple[int, ...] = ()

PRESETS: dict[str, dict[str, Any]] = {
    # seconds per step on a 2-core CPU: tests, CI and the demo
    "tiny": dict(enc_dim=64, enc_depth=1, dec_dim=128, dec_depth=2, dec_cross_attn_layers=(2,), heads=4, dim_head=32,
                 enc_cross_attn_layers=NO_ENCODER_CROSS_ATTN),
    # the benchmark reference (~50M parameters with a 32k vocabulary)
    "reference": dict(enc_dim=256, enc_depth=2, dec_dim=512, dec_depth=6, dec_cross_attn_layers=(3, 6), heads=8,
                      dim_head=64, enc_cross_attn_layers=NO_ENCODER_CROSS_ATTN),
    # cluster sizes, RETRO paper-like layouts: cross-attention every 3rd block from the 6th on
    "150m": dict(enc_dim=512, enc_depth=2, dec_dim=768, dec_depth=12, dec_cross_attn_layers=(6, 9, 12), heads=12,
                 dim_head=64, enc_cross_attn_layers=NO_ENCODER_CROSS_ATTN),
    "1b": dict(enc_dim=768, enc_depth=2, dec_dim=2048, dec_depth=20, dec_cross_attn_layers=(6, 9, 12, 15, 18),
               heads=16, dim_head=128, enc_cross_attn_layers=NO_ENCODER_CROSS_ATTN),
}


def check_arch(arch: dict[str, Any]) -> None:
    """One line for a model.arch key that the dataset owns or that RetroConfig does not have."""
    owned = [k for k in arch if k in DATASET_KEYS]
    if owned:
        raise ValueError(f"model.arch.{owned[0]} cannot be set: it comes from the dataset's manifest "
                         f"({', '.join(f'{k} = {v}' for k, v in DATASET_KEYS.items())}); "
                         f"drop it; for another value prepare a dataset with `retro-dist prepare --vocab-size/--seq-len/"
                         f"--chunk-size`")
    valid = [f.name for f in dataclasses.fields(RetroConfig) if f.name not in DATASET_KEYS]
    unknown = [k for k in arch if k not in valid]
    if unknown:
        raise ValueError(f"model.arch.{unknown[0]} is not a model setting; valid keys: {', '.join(valid)}")


def preset_config(name: str, *, num_tokens: int, max_seq_len: int, chunk_size: int = 64, pad_id: int = 0,
                  **overrides: Any) -> RetroConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    check_arch(overrides)
    return RetroConfig(**{**PRESETS[name], "num_tokens": num_tokens, "max_seq_len": max_seq_len,
                          "chunk_size": chunk_size, "pad_id": pad_id, **overrides})
