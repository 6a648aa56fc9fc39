"""`retro-dist export` of a retrofit run: OUT/base is the base as a transformers checkpoint, OUT/model.safetensors the
retrieval weights (encoder, CCA), OUT/config.json (written last) names both, OUT/tokenizer.json the dataset's.

A frozen base never changes (it is in no optimizer group, and tests/test_retrofit_train.py checks it bit for bit), so
its files are copied unchanged and `AutoModelForCausalLM.from_pretrained(OUT/base)` serves the base as before. A
trained base is consolidated from the checkpoint's fp32 partitions with the same streaming reader as RETRO's export
and written under the base's own tensor names beside its config.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from retro_dist.atomic import fsync_path, write_text_atomic
from retro_dist.data.format import Layout
from retro_dist.model import RetroConfig
from retro_dist.pretrained import CONFIG_NAME, TensorSpec, write_weights

from .model import BASE_DIR, RETROFIT_KEY, RetrofitConfig, read_base_config

# what a transformers checkpoint directory holds besides its weights (copied with a frozen or trained base)
BASE_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def _expected_shapes(settings: RetrofitConfig, config: RetroConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of the retrofit, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    from .model import RetrofitRETRO
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(read_base_config(settings.base))
        model = RetrofitRETRO(base, settings, config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _renamed(stream: Iterator[tuple[str, torch.Tensor]], prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in stream:
        yield name.removeprefix(prefix), t


def export_retrofit(checkpoint: Path, out: Path, run_config: dict[str, Any], *, dtype: str,
                    max_shard_size: int) -> Path:
    from retro_dist.train.export import DTYPES, _publish, _stream, open_checkpoint

    section = run_config["model"]
    settings = RetrofitConfig.from_dict({**section.get("retrofit_arch", {}), "base": section["retrofit"],
                                         "freeze_base": section["freeze_base"]})
    config = RetroConfig.from_dict(run_config["resolved"]["model"])
    source = open_checkpoint(checkpoint, config)
    expected = _expected_shapes(settings, config)
    trained = {n for n in source.shapes if n in expected}
    wrong = [n for n in trained if source.shapes[n] != expected[n]]
    new = [n for n in expected if not n.startswith("base.")]
    if wrong or any(n not in trained for n in new):
        raise ValueError(f"checkpoint {checkpoint} does not match the run's retrofit (shapes {wrong[:3]}, missing "
                         f"{[n for n in new if n not in trained][:3]})")
    base_dir = Path(settings.base)
    spec = lambda n, prefix="": TensorSpec(n.removeprefix(prefix), source.shapes[n], DTYPES[dtype])  # noqa: E731
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / BASE_DIR).mkdir(parents=True)
    try:
        specs = [spec(n) for n in new]
        write_weights(staging, specs, _stream(source, specs), max_shard_size=max_shard_size)
        if settings.freeze_base:  # unchanged by training: the base's own files
            for path in base_dir.iterdir():
                if path.is_file() and (path.suffix == ".safetensors" or path.name == "model.safetensors.index.json"
                                       or path.name in BASE_SIDE_FILES):
                    shutil.copyfile(path, staging / BASE_DIR / path.name)
        else:
            names = [n for n in source.shapes if n.startswith("base.")]
            wanted = [TensorSpec(n, source.shapes[n], DTYPES[dtype]) for n in names]
            write_weights(staging / BASE_DIR, [spec(n, "base.") for n in names],
                          _renamed(_stream(source, wanted), "base."), max_shard_size=max_shard_size)
            for name in BASE_SIDE_FILES:
                if (base_dir / name).is_file():
                    shutil.copyfile(base_dir / name, staging / BASE_DIR / name)
        tokenizer = Layout(run_config["data"]["dataset"]).tokenizer
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, staging / "tokenizer.json")
        exported = {RETROFIT_KEY: {**settings.to_dict(), "base": BASE_DIR}, "retro": config.to_dict()}
        write_text_atomic(staging / CONFIG_NAME, json.dumps(exported, indent=2, sort_keys=True) + "\n")
        fsync_path(staging)
        if out.exists():  # config.json out first: `out` is never a model directory with half its files
            with contextlib.suppress(FileNotFoundError):
                (out / CONFIG_NAME).unlink()
            shutil.rmtree(out / BASE_DIR, ignore_errors=True)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
