"""RetroConfig: the model's hyperparameters, named and defaulted exactly as RETRO-pytorch's ``RETRO(...)`` kwargs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CCA_POSITIONS = ("aligned", "retro-pytorch")
MIN_DIM_HEAD = 32  # rotary dim is min(dim_head, 32); RETRO-pytorch refuses smaller heads
BERT_VOCAB_SIZE = 28996  # RETRO-pytorch's default num_tokens (bert-base-cased)


@dataclass
class RetroConfig:
    num_tokens: int = BERT_VOCAB_SIZE
    """Vocabulary size (token ids must lie in [0, num_tokens))."""
    max_seq_len: int = 2048
    """Longest input sequence: the size of the learned absolute position table."""
    enc_dim: int = 896
    """Width of the retrieval encoder (and of the token and position embeddings)."""
    enc_depth: int = 2
    """Number of retrieval encoder blocks."""
    enc_cross_attn_layers: tuple[int, ...] | None = None
    """1-based encoder blocks that cross-attend to the sequence chunk; None means every block."""
    dec_depth: int = 12
    """Number of decoder blocks."""
    dec_cross_attn_layers: tuple[int, ...] | None = (1, 3, 6, 9)
    """1-based decoder blocks with chunked cross-attention; None means every block."""
    heads: int = 8
    """Attention heads in encoder and decoder (RETRO-pytorch ignores this and always uses 8)."""
    dec_dim: int = 768
    """Width of the decoder."""
    dim_head: int = 64
    """Width of one attention head (at least 32)."""
    enc_attn_dropout: float = 0.0
    """Dropout on the encoder's attention probabilities."""
    enc_ff_dropout: float = 0.0
    """Dropout inside the encoder's feed-forward blocks."""
    dec_attn_dropout: float = 0.0
    """Dropout on the decoder's attention probabilities."""
    dec_ff_dropout: float = 0.0
    """Dropout inside the decoder's feed-forward blocks."""
    chunk_size: int = 64
    """Tokens per retrieval chunk."""
    pad_id: int = 0
    """Padding token: masked in retrieved neighbors and ignored by the loss."""
    enc_scale_residual: float | None = None
    """Residual scale of the encoder's post-norm blocks (deepnet); None derives it from the depths."""
    dec_scale_residual: float | None = None
    """Residual scale of the decoder's post-norm blocks (deepnet); None derives it from the depth."""
    gated_rmsnorm: bool = False
    """Use gated RMSNorm (norm output times sigmoid(x * w)); takes precedence over deepnet's LayerNorm."""
    use_deepnet: bool = False
    """DeepNet: post-norm blocks with LayerNorm, residual scaling and the DeepNet init."""
    cca_positions: str = "aligned"
    """Rotary positions of chunked cross-attention queries. `aligned` (new models): query row t of a chunk's window
    sits at cs - 1 + t, in the neighbor's coordinates (keys 0 .. m - 1), so the token a query predicts lines up with
    the neighbor's continuation. `retro-pytorch`: its shifted table (the first query at 2cs - 2, the others at 0),
    kept so converted RETRO-pytorch weights give the same logits; with it a model cannot learn to copy by position
    (docs/reading-neighbors.md)."""

    def __post_init__(self) -> None:
        for name in ("enc_cross_attn_layers", "dec_cross_attn_layers"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(int(v) for v in value))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with one clear line for any inconsistent setting."""
        def positive(name: str) -> None:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RetroConfig.{name} must be a positive integer, got {getattr(self, name)!r}")

        for name in ("num_tokens", "max_seq_len", "enc_dim", "enc_depth", "dec_depth", "heads", "dec_dim",
                     "dim_head", "chunk_size"):
            positive(name)
        if self.dim_head < MIN_DIM_HEAD:
            raise ValueError(f"RetroConfig.dim_head must be at least {MIN_DIM_HEAD} (rotary embeddings use "
                             f"{MIN_DIM_HEAD} dims of each head), got {self.dim_head}")
        for name, depth_name in (("enc_cross_attn_layers", "enc_depth"), ("dec_cross_attn_layers", "dec_depth")):
            layers, depth = getattr(self, name), getattr(self, depth_name)
            if layers is None:
                continue
            bad = [v for v in layers if not 1 <= v <= depth]
            if bad:
                raise ValueError(f"RetroConfig.{name} has layers {bad} outside 1..{depth_name}={depth}; "
                                 f"layers are 1-based block numbers")
        if self.cca_positions not in CCA_POSITIONS:
            raise ValueError(f"RetroConfig.cca_positions={self.cca_positions!r} must be one of {CCA_POSITIONS}")
        if not 0 <= self.pad_id < self.num_tokens:
            raise ValueError(f"RetroConfig.pad_id={self.pad_id} must lie in [0, num_tokens={self.num_tokens})")
        for name in ("enc_attn_dropout", "enc_ff_dropout", "dec_attn_dropout", "dec_ff_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"RetroConfig.{name} must lie in [0, 1), got {getattr(self, name)}")

    # derived values -------------------------------------------------------------------------------------------

    def has_cross_attn(self, layer: int, *, encoder: bool) -> bool:
        """Whether 1-based block `layer` of the encoder or decoder has cross-attention."""
        layers = self.enc_cross_attn_layers if encoder else self.dec_cross_attn_layers
        return layers is None or layer in layers

    @property
    def resolved_enc_scale_residual(self) -> float:
        if self.enc_scale_residual is not None:
            return self.enc_scale_residual
        # DeepNet, Figure 2 of https://arxiv.org/abs/2203.00555 (encoder-decoder alpha), as RETRO-pytorch
        return 0.81 * ((self.enc_depth ** 4) * self.dec_depth) ** 0.0625 if self.use_deepnet else 1.0

    @property
    def resolved_dec_scale_residual(self) -> float:
        if self.dec_scale_residual is not None:
            return self.dec_scale_residual
        return (3 * self.dec_depth) ** 0.25 if self.use_deepnet else 1.0

    # serialisation --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("enc_cross_attn_layers", "dec_cross_attn_layers"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetroConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RetroConfig fields {unknown}; known fields: {sorted(known)}")
        # a config written before cca_positions existed was trained with RETRO-pytorch's positions
        return cls(**{"cca_positions": "retro-pytorch", **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RetroConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RetroConfig":
        return cls.from_json(Path(path).read_text())
