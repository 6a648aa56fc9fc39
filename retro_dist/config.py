"""RunConfig: one typed config for a training run, one section per concern.

Loaded from a preset, then a YAML or JSON file, then `--section.key=value` overrides; validated once; written
resolved into RUN/config.json. DeepSpeed's JSON (ds_configs/) holds engine settings only: batch sizes, optimizer,
precision and clipping are filled in from here by retro_dist.train.ds_config.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retro_dist.console import stderr_line
from retro_dist.model.presets import PRESETS, check_arch


@dataclass
class ModelSection:
    preset: str = "tiny"
    """Architecture preset (retro_dist/model/presets.py); vocabulary, length, chunk size and pad come from the data."""
    arch: dict[str, Any] = field(default_factory=dict)
    """RetroConfig fields overriding the preset, e.g. {"dec_depth": 4, "dec_attn_dropout": 0.1}."""
    retrofit: str = ""
    """A transformers checkpoint directory (Llama family, Qwen2, Mistral) to RETRO-fit instead of building the preset
    (docs/retrofit.md); its tokenizer.json must be the dataset's."""
    freeze_base: bool = True
    """With model.retrofit: train only the new CCA and encoder (true, the RETRO paper's recipe) or every weight."""
    retrofit_arch: dict[str, Any] = field(default_factory=dict)
    """With model.retrofit: RetrofitConfig fields, e.g. {"cca_layers": [6, 9], "enc_dim": 256, "enc_depth": 2}."""


@dataclass
class DataSection:
    dataset: str = ""
    """The dataset directory written by `retro-dist prepare`."""
    micro_batch: int = 2
    """Samples per rank per forward/backward."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    num_neighbors: int | None = None
    """Neighbors per chunk to use (default: all the dataset has)."""
    retrieval: bool = True
    """Train with retrieval; false trains the same model with retrieval off (a baseline)."""
    on_bad_sample: str = "error"
    """`error` or `skip` (skipped samples are counted in TensorBoard)."""
    shard_urls: list[str] | None = None
    """Train shard URLs replacing the local paths (e.g. `pipe:aws s3 cp s3://... -`), one per manifest shard."""


@dataclass
class OptimSection:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices and embeddings (not of biases, norm scales, gates or null key/values)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""


@dataclass
class TrainSection:
    steps: int = 100
    """Optimizer steps to train."""
    global_batch: int = 0
    """Samples per optimizer step over all ranks; 0 means micro_batch * world size (no accumulation)."""
    precision: str = "auto"
    """`auto` (what runs fast here: bf16 on GPUs with native bf16, else fp16; on CPUs bf16 with AMX or where a timed
    matmul says so, else fp32), `bf16`, `fp16` or `fp32`."""
    zero_stage: int = 2
    """ZeRO stage 0-3; picks ds_configs/zero{N}.json unless ds_config is given."""
    ds_config: str = ""
    """A DeepSpeed JSON with engine settings (default: ds_configs/zero{zero_stage}.json)."""
    activation_checkpointing: str = "none"
    """`none`, `every` (each encoder and decoder block) or `every:N` (the N-th, 2N-th, ... block of each)."""
    seed: int = 0
    """Seed of initialisation, data order and dropout (masks keyed by step and place in the global batch, not rank)."""
    dist_timeout_s: int = 300
    """Process-group timeout: a dead rank makes the others fail within this time instead of hanging."""


@dataclass
class CheckpointSection:
    every: int = 50
    """Save every N steps (and at the end)."""
    keep: int = 2
    """Whole checkpoints kept (older ones deleted)."""
    resume: str = "auto"
    """`auto` (newest whole checkpoint in RUN/checkpoints if any), `none`, or a step: `100` or its tag `step_00000100`."""


@dataclass
class LoggingSection:
    every: int = 10
    """Console line and TensorBoard scalars every N steps."""
    val_every: int = 50
    """Validation (true neighbors, random neighbors, retrieval off) every N steps and at the end; 0 disables."""
    val_samples: int = 256
    """Validation samples (the first ones of the split, whatever the world size); 0 means the whole split."""
    tensorboard: bool = True
    """Write RUN/tensorboard on rank 0."""


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    """Where config.json, ds_config.json, checkpoints/, tensorboard/ and export/ go."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def validate(self) -> None:
        if self.model.preset not in PRESETS:
            raise ValueError(f"model.preset={self.model.preset!r} is unknown; known: {', '.join(PRESETS)}")
        check_arch(self.model.arch)
        if self.model.retrofit:  # the base checkpoint and the CCA layers, before anything is written
            from retro_dist.retrofit.model import check_section
            check_section(self.model)
        if not self.data.dataset:
            raise ValueError("data.dataset is empty: pass --data.dataset=DIR (a directory from `retro-dist prepare`)")
        if self.train.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.train.zero_stage} must be 0, 1, 2 or 3")
        if self.train.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"train.precision={self.train.precision!r} must be auto, bf16, fp16 or fp32")
        ac = self.train.activation_checkpointing
        if not (ac in ("none", "every") or (ac.startswith("every:") and ac[6:].isdigit() and int(ac[6:]) > 0)):
            raise ValueError(f"train.activation_checkpointing={ac!r} must be none, every or every:N")
        if self.data.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample={self.data.on_bad_sample!r} must be error or skip")
        for name, value, low in (
                ("train.steps", self.train.steps, 1), ("data.micro_batch", self.data.micro_batch, 1),
                ("checkpoint.every", self.checkpoint.every, 1), ("checkpoint.keep", self.checkpoint.keep, 1),
                ("logging.every", self.logging.every, 1), ("data.num_workers", self.data.num_workers, 0),
                ("data.num_neighbors", 1 if self.data.num_neighbors is None else self.data.num_neighbors, 1),
                ("train.global_batch", self.train.global_batch, 0), ("train.seed", self.train.seed, 0),
                ("train.dist_timeout_s", self.train.dist_timeout_s, 1), ("optim.warmup_steps", self.optim.warmup_steps, 0),
                ("optim.weight_decay", self.optim.weight_decay, 0), ("optim.grad_clip", self.optim.grad_clip, 0),
                ("logging.val_every", self.logging.val_every, 0), ("logging.val_samples", self.logging.val_samples, 0)):
            if not value >= low:  # `not >=` also refuses nan
                raise ValueError(f"{name}={value} must be at least {low}")
        for name, value in (("optim.lr", self.optim.lr), ("optim.eps", self.optim.eps)):
            if not value > 0:
                raise ValueError(f"{name}={value} must be positive")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.optim.min_lr_ratio} must lie in [0, 1]")
        if not all(0 <= b < 1 for b in self.optim.betas):
            raise ValueError(f"optim.betas={list(self.optim.betas)} must each lie in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """A JSON/YAML value or a command-line string -> the field's declared type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{where}={value!r} is not a boolean")
        return bool(value)
    if annotation in (int, float):
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r} is not a{'n' if annotation is int else ''} {annotation.__name__}") from None
    if annotation is str:
        return str(value)
    if isinstance(value, str) and origin in (list, tuple, dict):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{where}={value!r} is not JSON for a {origin.__name__}") from None
    if origin is tuple:
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        return [_coerce(v, args[0], where) for v in value]
    return value


def _set(obj: Any, path: list[str], value: Any, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    name = path[0]
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ValueError(f"unknown config key {where!r}; keys here: {known}")
    if dataclasses.is_dataclass(getattr(obj, name)):
        if len(path) == 1:
            if not isinstance(value, dict):
                raise ValueError(f"{where} is a section: give {where}.KEY=VALUE")
            for key, sub in value.items():
                _set(getattr(obj, name), [key], sub, f"{where}.{key}")
            return
        _set(getattr(obj, name), path[1:], value, where)
    elif len(path) > 1 and typing.get_origin(hints[name]) is dict:
        getattr(obj, name)[".".join(path[1:])] = _json_or_str(value)
    else:
        setattr(obj, name, _coerce(value, hints[name], where))


def _json_or_str(value: Any) -> Any:
    """`4` -> 4, `[1, 3]` -> [1, 3], `true` -> True, `abc` -> "abc": free-form values of a dict field."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# Keys renamed since runs were first configured: old spelling -> (new key, how the old value maps to it). Old configs
# and scripts keep working, with one line on stderr naming the new key.
RENAMED: dict[str, tuple[str, str]] = {
    "logging.val_batches": ("logging.val_samples", "val_batches x data.micro_batch samples"),
}


def _renamed(key: str, value: Any, pending: list[tuple[str, Any]]) -> str | None:
    """The new key for a renamed one (after a deprecation line), or None for a key that was not renamed."""
    if key not in RENAMED:
        return None
    new, how = RENAMED[key]
    stderr_line(f"retro-dist train: {key} is deprecated: use {new} ({how})")
    pending.append((key, value))
    return new


def load_run_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML/JSON file, then `section.key=value` overrides (later wins)."""
    config, renamed = RunConfig(), []
    if path:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of sections")
        for key, value in data.items():
            if isinstance(value, dict):
                for sub, sub_value in value.items():
                    _set_key(config, f"{key}.{sub}", sub_value, renamed)
            else:
                _set(config, [key], value, key)
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        _set_key(config, key, value, renamed)
    for key, value in renamed:  # after every other key: the mapping reads data.micro_batch
        if key == "logging.val_batches":
            config.logging.val_samples = _coerce(value, int, key) * config.data.micro_batch
    config.validate()
    return config


def _set_key(config: RunConfig, key: str, value: Any, renamed: list[tuple[str, Any]]) -> None:
    if _renamed(key, value, renamed) is None:
        _set(config, key.split("."), value, key)
