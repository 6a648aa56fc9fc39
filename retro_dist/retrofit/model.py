"""RETRO-fitting (Borgeaud et al. 2022, 4.2): a pretrained Hugging Face decoder with chunked cross-attention added
after chosen layers and a new neighbor encoder, called like RETRO: `model(seq, retrieved=None, return_loss=False)`.

The base runs as transformers' own modules (wrapped, not re-implemented): chunked cross-attention is a forward hook
on each chosen decoder layer, `x + cca(norm(x), neighbors)`, with the attention's output projection initialised to
zero, so at step 0 the logits are the base's bit for bit whatever the neighbors. The encoder embeds neighbors with
the base's token embedding (the same parameter: frozen with the base or trained with it).

Imports torch, einops and transformers only: no deepspeed, no torch.distributed (retro_dist/retrofit/build.py builds
it partitioned under ZeRO-3 from outside).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from retro_dist.model.config import MIN_DIM_HEAD, RetroConfig
from retro_dist.model.dropout import number_sites
from retro_dist.model.layers import ChunkedCrossAttention, Residual, Rotary, make_norm
from retro_dist.model.retro import RETRO, Encoder, RetrievalInputs

# decoder families whose layers take and return hidden states [b, n, d] and whose model holds `model.layers`
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
BASE_DIR = "base"  # inside an exported retrofit directory: the base as a transformers checkpoint
RETROFIT_KEY = "retrofit"  # config.json of an exported retrofit holds {"retrofit": {...}, "retro": {...}}


class RetrofitError(ValueError):
    """Bad input to a retrofit: one line saying what is wrong and how to fix it."""


@dataclass
class RetrofitConfig:
    base: str
    """The transformers checkpoint directory (config.json + safetensors) that is retrofitted."""
    cca_layers: tuple[int, ...] | None = None
    """1-based decoder layers followed by chunked cross-attention; None: every 3rd from the 6th (the paper's),
    clipped to the depth, or the last layer of a base shallower than 6."""
    enc_dim: int | None = None
    """Width of the neighbor encoder; None: the base's hidden size."""
    enc_depth: int = 2
    """Neighbor encoder blocks."""
    heads: int | None = None
    """Heads of chunked cross-attention and the encoder; None: the base's attention heads."""
    dim_head: int | None = None
    """Width of a head; None: the base's head_dim (at least 32)."""
    freeze_base: bool = True
    """Train only CCA and the encoder (the paper's recipe); false trains every weight (InstructRetro's)."""
    dropout: float = 0.0
    """Dropout of the new attention and feed-forward layers."""
    neighbor_norm: bool = True
    """RMS-normalise the neighbors' token embeddings before the encoder (a new RMSNorm, trained with CCA). A
    decoder's embeddings are small (Llama initialises them at std 0.02, against 1 for RETRO's own), and at that scale
    the encoder's residual stream is its blocks' output, a mix of the whole neighbor that drowns which token sits
    where: the retrofit then barely learns to copy a neighbor by position."""

    def __post_init__(self) -> None:
        if self.cca_layers is not None:
            self.cca_layers = tuple(int(v) for v in self.cca_layers)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["cca_layers"] = list(self.cca_layers) if self.cca_layers is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetrofitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RetrofitError(f"unknown retrofit settings {unknown}; known: {sorted(known)}")
        return cls(**data)


def default_cca_layers(depth: int) -> tuple[int, ...]:
    """Every 3rd layer from the 6th (RETRO paper, B.2), clipped to the depth; the last layer below depth 6."""
    return tuple(range(6, depth + 1, 3)) or (depth,)


def read_base_config(base: str | Path):
    """The base's transformers config, checked to be a supported decoder checkpoint (one line otherwise)."""
    from transformers import AutoConfig

    path = Path(base)
    if not (path / "config.json").is_file():
        raise RetrofitError(f"{path} is not a transformers checkpoint directory (no config.json): give the "
                            f"directory written by save_pretrained, holding config.json and *.safetensors")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise RetrofitError(f"{path}/config.json is not a transformers config ({' '.join(str(e).split())[:200]})") \
            from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RetrofitError(f"{path} holds a {model_type!r} model; retrofitting supports the decoder families "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3, SmolLM, TinyLlama, Qwen2, Mistral)")
    if not any(path.glob("*.safetensors")):
        raise RetrofitError(f"{path} has no *.safetensors weights: save the base with save_pretrained "
                            f"(safe_serialization) first")
    return config


def retro_config(settings: RetrofitConfig, base_config, *, max_seq_len: int, chunk_size: int,
                 pad_id: int) -> RetroConfig:
    """The RetroConfig of the retrieval part: the decoder fields describe the base, the rest the new layers."""
    depth, hidden = base_config.num_hidden_layers, base_config.hidden_size
    layers = settings.cca_layers if settings.cca_layers is not None else default_cca_layers(depth)
    bad = [v for v in layers if not 1 <= v <= depth]
    if bad or not layers:
        raise RetrofitError(f"cca_layers {list(layers)} must be 1-based layers of the base, within 1..{depth} "
                            f"(the base {settings.base} has {depth} layers)")
    heads = settings.heads or base_config.num_attention_heads
    dim_head = settings.dim_head or getattr(base_config, "head_dim", None) or hidden // heads
    if dim_head < MIN_DIM_HEAD:
        raise RetrofitError(f"the retrofit's heads would be {dim_head} wide, below {MIN_DIM_HEAD} (rotary dims): "
                            f"set model.retrofit_arch.dim_head")
    return RetroConfig(num_tokens=base_config.vocab_size, max_seq_len=max_seq_len,
                       enc_dim=settings.enc_dim or hidden, enc_depth=settings.enc_depth, enc_cross_attn_layers=(),
                       dec_depth=depth, dec_cross_attn_layers=tuple(layers), heads=heads, dec_dim=hidden,
                       dim_head=dim_head, enc_attn_dropout=settings.dropout, enc_ff_dropout=settings.dropout,
                       dec_attn_dropout=settings.dropout, dec_ff_dropout=settings.dropout, chunk_size=chunk_size,
                       pad_id=pad_id, cca_positions="aligned")


def settings_from_section(section: Any) -> RetrofitConfig:
    """The RetrofitConfig of a run's model section (model.retrofit, model.freeze_base, model.retrofit_arch)."""
    owned = [k for k in ("base", "freeze_base") if k in section.retrofit_arch]
    if owned:
        raise RetrofitError(f"model.retrofit_arch.{owned[0]} cannot be set there: use model.retrofit / "
                            f"model.freeze_base")
    return RetrofitConfig.from_dict({**section.retrofit_arch, "base": section.retrofit,
                                     "freeze_base": section.freeze_base})


def check_section(section: Any) -> None:
    """One line for a run's retrofit settings that cannot build: not a supported checkpoint, CCA layers beyond its
    depth, model.arch given (it shapes RETRO from scratch only)."""
    if section.arch:
        raise RetrofitError(f"model.arch {sorted(section.arch)} shapes RETRO from scratch; a retrofit takes "
                            f"model.retrofit_arch (cca_layers, enc_dim, enc_depth, heads, dim_head, dropout)")
    settings = settings_from_section(section)
    retro_config(settings, read_base_config(settings.base), max_seq_len=1, chunk_size=1, pad_id=0)


def zero_linear(module: nn.Module) -> None:
    """Zero a Linear's weight and bias. Run through `Module.apply` on the Linear itself: DeepSpeed's zero.Init
    gathers the parameters of the module `apply` visits, its own only, not its children's."""
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@dataclass
class _Pass:
    """What one forward (or decode step) hands the hooks on the base's layers."""
    embedded: Tensor | None  # neighbors embedded [(b k r), m, e], encoded at the first CCA layer
    inputs: RetrievalInputs | None
    encoded: Tensor | None = None  # [b, k, r, m, d]
    cache: "RetrofitCache | None" = None
    window: int = -1  # decoding: position - (chunk_size - 1)
    completes: bool = False


@dataclass
class RetrofitCache:
    """Incremental decoding: the base's own KV cache, the hidden states the encoder reads, the encoded chunks."""
    base: Any
    length: int = 0
    hidden: list[Tensor] = field(default_factory=list)
    chunks: list[tuple[Tensor, RetrievalInputs]] = field(default_factory=list)


class RetrofitRETRO(nn.Module):
    """A transformers causal LM with RETRO's chunked cross-attention and neighbor encoder added.

    `model(seq, retrieved=None, return_loss=False)` with RETRO's shapes; `model.config` is the RetroConfig of the
    retrieval part (vocabulary, chunk size, pad id, sequence length, CCA layers), `model.retrofit` the settings.
    """

    def __init__(self, base: nn.Module, settings: RetrofitConfig, config: RetroConfig):
        super().__init__()
        model_type = getattr(base.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise RetrofitError(f"retrofitting supports {', '.join(SUPPORTED_MODEL_TYPES)}, not {model_type!r}")
        self.base, self.retrofit, self.config = base, settings, config
        hidden = base.config.hidden_size
        self.neighbor_norm = (make_norm(hidden, gated_rmsnorm=False, use_deepnet=False) if settings.neighbor_norm
                              else nn.Identity())
        self.to_encoder_dim = nn.Linear(hidden, config.enc_dim) if config.enc_dim != hidden else nn.Identity()
        self.encoder = Encoder(config)
        norm = lambda: make_norm(hidden, gated_rmsnorm=False, use_deepnet=False)  # noqa: E731
        self.cca = nn.ModuleDict({
            str(layer): Residual(ChunkedCrossAttention(hidden, chunk_size=config.chunk_size, heads=config.heads,
                                                       dim_head=config.dim_head, dropout=config.dec_attn_dropout),
                                 norm(), post_norm=False, scale_residual=1.0)
            for layer in config.dec_cross_attn_layers})
        for block in self.cca.values():  # CCA's residual branch adds exactly 0 at step 0
            block.fn.attn.to_out.apply(zero_linear)
        self.rotary = Rotary()
        number_sites(self)
        self._pass: _Pass | None = None
        self.first_cca = min(config.dec_cross_attn_layers)
        for layer in config.dec_cross_attn_layers:
            self.decoder_layers[layer - 1].register_forward_hook(self._hook(layer))
        self.set_base_trainable(not settings.freeze_base)

    # RETRO's input checks and retrieval tables read only `config` and `rotary`, which this model has too
    check_inputs = RETRO.check_inputs
    _check_tokens = RETRO._check_tokens
    _inputs_and_labels = RETRO._inputs_and_labels
    _check_retrieved = RETRO._check_retrieved
    _retrieval_inputs = RETRO._retrieval_inputs

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.base.model.layers

    def set_base_trainable(self, trainable: bool) -> None:
        for p in self.base.parameters():
            p.requires_grad_(trainable)

    # the hook on each CCA layer -----------------------------------------------------------------------------------

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple | None:
            state = self._pass
            if state is None or state.inputs is None and state.cache is None:
                return None  # retrieval off: the base's output unchanged
            x = output[0] if isinstance(output, tuple) else output
            x = self._cca_decode(layer, x, state) if state.cache is not None else self._cca_full(layer, x, state)
            return (x, *output[1:]) if isinstance(output, tuple) else x
        return hook

    def _cca_full(self, layer: int, x: Tensor, state: _Pass) -> Tensor:
        c, inputs = self.config, state.inputs
        b, r = x.shape[0], inputs.num_neighbors
        k = state.embedded.shape[0] // (b * r)
        if k == 0:
            return x  # no chunk complete: CCA adds zeros
        if state.encoded is None:  # the encoder runs once, at the first CCA layer, on that layer's hidden states
            chunks = rearrange(x[:, : k * c.chunk_size], "b (k n) d -> (b k) n d", k=k)
            encoded = self.encoder(state.embedded, chunks, inputs=inputs)
            state.encoded = rearrange(encoded, "(b k r) m d -> b k r m d", b=b, r=r)
        return self.cca[str(layer)](x, state.encoded, q_rope=inputs.cca_q_rope, k_rope=inputs.cca_k_rope,
                                    bias=inputs.cca_bias)

    def _cca_decode(self, layer: int, x: Tensor, state: _Pass) -> Tensor:
        cache, cs = state.cache, self.config.chunk_size
        if layer == self.first_cca:
            cache.hidden.append(x)
            if state.completes:
                chunk = torch.cat(cache.hidden[-cs:], dim=1)
                encoded = self.encoder(state.embedded, chunk, inputs=state.inputs)
                cache.chunks.append((rearrange(encoded, "(b r) m d -> b r m d", r=state.inputs.num_neighbors),
                                     state.inputs))
        window = state.window
        context, inputs = (cache.chunks[window // cs] if window >= 0 and window // cs < len(cache.chunks)
                           else (None, None))
        block = self.cca[str(layer)]
        if context is None:
            return x  # no chunk complete yet: CCA adds zeros, as the full forward does there
        return block.fn(block.norm(x), context, row=window % cs, q_rope=inputs.cca_q_rope, k_rope=inputs.cca_k_rope,
                        bias=inputs.cca_bias) + x

    # forward -------------------------------------------------------------------------------------------------------

    def forward(self, seq: Tensor, retrieved: Tensor | None = None, return_loss: bool = False) -> Tensor:
        c = self.config
        seq, labels = self._inputs_and_labels(seq, return_loss)
        b, n = seq.shape
        state = _Pass(None, None)
        if retrieved is not None:
            retrieved = self._check_retrieved(retrieved, b, n)
            state.inputs = self._retrieval_inputs(retrieved, dtype=self._dtype())
            state.embedded = self._embed_neighbors(retrieved)
        self._pass = state
        try:
            hidden = self.base.model(input_ids=seq, use_cache=False).last_hidden_state
        finally:
            self._pass = None
        logits = self.base.lm_head(hidden)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=c.pad_id)

    def _dtype(self) -> torch.dtype:
        return self.base.get_input_embeddings().weight.dtype

    def _embed_neighbors(self, retrieved: Tensor) -> Tensor:
        """[b, k, r, m] -> [(b k r), m, enc_dim]: the base's token embedding, normalised, then the encoder's input
        projection."""
        embedded = self.neighbor_norm(self.base.get_input_embeddings()(retrieved))
        return self.to_encoder_dim(rearrange(embedded, "b k r m e -> (b k r) m e"))

    # incremental decoding ------------------------------------------------------------------------------------------

    def new_cache(self) -> RetrofitCache:
        from transformers import DynamicCache
        return RetrofitCache(base=DynamicCache(config=self.base.config))

    @torch.inference_mode()
    def decode_step(self, tokens: Tensor, cache: RetrofitCache, neighbors: Tensor | None = None) -> Tensor:
        """Logits [b, num_tokens] of the next token after `tokens` [b] at position cache.length, with the base's KV
        cache; `neighbors` [b, r, m] exactly when this token completes a chunk (as RETRO.decode_step)."""
        c, p = self.config, cache.length
        cs = c.chunk_size
        completes = (p + 1) % cs == 0
        if completes != (neighbors is not None):
            raise ValueError(f"position {p} {'completes' if completes else 'does not complete'} a chunk of {cs}: "
                             f"pass neighbors exactly when it does")
        self._check_tokens("tokens", tokens)
        state = _Pass(None, None, cache=cache, window=p - (cs - 1), completes=completes)
        if neighbors is not None:
            retrieved = self._check_retrieved(neighbors[:, None], tokens.shape[0], cs)
            state.inputs = self._retrieval_inputs(retrieved, dtype=self._dtype())
            state.embedded = self._embed_neighbors(retrieved)
        self._pass = state
        try:
            out = self.base.model(input_ids=tokens[:, None], cache=cache.base, use_cache=True)
        finally:
            self._pass = None
        cache.length = p + 1
        return self.base.lm_head(out.last_hidden_state)[:, 0]

    # weights -------------------------------------------------------------------------------------------------------

    def retrieval_state_dict(self) -> dict[str, Tensor]:
        """The new weights only (encoder, CCA, input projection): what a frozen base's export adds to the base."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def export_config(self) -> dict[str, Any]:
        return {RETROFIT_KEY: self.retrofit.to_dict(), "retro": self.config.to_dict()}

    def save_pretrained(self, directory: str | Path) -> None:
        """DIR/base: the base as a transformers checkpoint (loadable by AutoModelForCausalLM alone);
        DIR/model.safetensors: the retrieval weights; DIR/config.json (written last) names both."""
        from retro_dist.pretrained import save_pretrained
        directory = Path(directory)
        self.base.save_pretrained(str(directory / BASE_DIR))
        save_pretrained(self.export_config(), self.retrieval_state_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "RetrofitRETRO":
        """An exported retrofit: the base from DIR/base, the retrieval weights from DIR."""
        from retro_dist.pretrained import load_pretrained
        directory = Path(directory)
        config_dict, state = load_pretrained(directory, device=device)
        # an export whose settings do not name neighbor_norm was trained without the norm
        settings = RetrofitConfig.from_dict({"neighbor_norm": False, **config_dict[RETROFIT_KEY],
                                             "base": str(directory / BASE_DIR)})
        model = cls(load_base(directory / BASE_DIR), settings, RetroConfig.from_dict(config_dict["retro"])).to(device)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("base.")]
        if missing or unexpected:
            raise ValueError(f"{directory}: retrieval weights do not fit its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}): export it again")
        return model.to(dtype) if dtype is not None else model

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_base(path: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base causal LM from its own safetensors, in `dtype`, with the eager attention whose output is the
    reference the retrofit's step-0 logits are compared with."""
    from transformers import AutoModelForCausalLM

    read_base_config(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)


def is_retrofit_dir(directory: str | Path) -> bool:
    """Whether `directory` is an exported retrofit (config.json with a `retrofit` section)."""
    path = Path(directory) / "config.json"
    try:
        return RETROFIT_KEY in json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def retrofit(base: str | Path, *, max_seq_len: int, chunk_size: int, pad_id: int,
             **settings: Any) -> RetrofitRETRO:
    """Load the base from `base` and add retrieval: the one call for a retrofit outside the trainer."""
    config = RetrofitConfig(base=str(base), **settings)
    base_config = read_base_config(base)
    rc = retro_config(config, base_config, max_seq_len=max_seq_len, chunk_size=chunk_size, pad_id=pad_id)
    return RetrofitRETRO(load_base(base), config, rc)
