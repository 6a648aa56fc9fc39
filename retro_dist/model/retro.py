"""RETRO (Borgeaud et al. 2022), computing the same function as RETRO-pytorch 0.3.9 with fused, SDPA-based layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import RetroConfig
from .dropout import number_sites
from .layers import (ChunkedCrossAttention, CrossAttention, FeedForward, KVCache, LogitsHead, Residual, RopeTable,
                     Rotary, SelfAttention, key_padding_bias, make_norm)


@dataclass
class RetrievalInputs:
    """Per-forward constants of the retrieval path: rotary tables and attention biases (no grad)."""

    enc_rope: RopeTable  # encoder self-attention over a neighbor: positions 0..m-1
    enc_cross_q_rope: RopeTable  # encoder cross-attention queries: r neighbors folded into one row, 0..m-1 each
    enc_cross_k_rope: RopeTable  # the sequence chunk it reads: 0..cs-1
    enc_bias: Tensor  # [(b k r), 1, 1, m]: masks pad tokens of each neighbor
    cca_q_rope: RopeTable
    cca_k_rope: RopeTable
    cca_bias: Tensor  # [(b k), 1, 1, 1 + r m]: null key always kept, pad tokens masked
    num_neighbors: int


@dataclass
class DecodeCache:
    """What incremental decoding keeps: self-attention keys/values per decoder block, the hidden states the encoder
    reads (at the first cross-attention block), and each completed chunk's encoded neighbors."""

    kv: list[KVCache]
    length: int = 0
    hidden: list[Tensor] = field(default_factory=list)
    chunks: list[tuple[Tensor, RetrievalInputs]] = field(default_factory=list)


class EncoderBlock(nn.Module):
    def __init__(self, config: RetroConfig, *, has_cross_attn: bool):
        super().__init__()
        c, dim = config, config.enc_dim
        wrap = dict(post_norm=c.use_deepnet, scale_residual=c.resolved_enc_scale_residual)
        norm = lambda: make_norm(dim, gated_rmsnorm=c.gated_rmsnorm, use_deepnet=c.use_deepnet)  # noqa: E731
        self.self_attn = Residual(SelfAttention(dim, heads=c.heads, dim_head=c.dim_head, causal=False,
                                                dropout=c.enc_attn_dropout), norm(), **wrap)
        self.cross_attn = Residual(CrossAttention(dim, context_dim=c.dec_dim, heads=c.heads, dim_head=c.dim_head,
                                                  dropout=c.enc_attn_dropout, null_kv=False), norm(),
                                   **wrap) if has_cross_attn else None
        self.ff = Residual(FeedForward(dim, dropout=c.enc_ff_dropout), norm(), **wrap)

    def forward(self, x: Tensor, chunks: Tensor, *, inputs: RetrievalInputs) -> Tensor:
        """x [(b k r), m, e] neighbors, chunks [(b k), cs, d] the decoder's hidden states of their chunks."""
        x = self.self_attn(x, inputs.enc_rope, bias=inputs.enc_bias)
        if self.cross_attn is not None:
            # no mask here, so the r neighbors of a chunk can share one attention call as one longer query row
            x = rearrange(x, "(bk r) m e -> bk (r m) e", r=inputs.num_neighbors)
            x = self.cross_attn(x, chunks, q_rope=inputs.enc_cross_q_rope, k_rope=inputs.enc_cross_k_rope)
            x = rearrange(x, "bk (r m) e -> (bk r) m e", r=inputs.num_neighbors)
        return self.ff(x)


class Encoder(nn.Module):
    """Encodes each retrieved neighbor, attending to the decoder's hidden states of the chunk it was retrieved for."""

    def __init__(self, config: RetroConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            EncoderBlock(config, has_cross_attn=config.has_cross_attn(i, encoder=True))
            for i in range(1, config.enc_depth + 1))
        self.norm_out = (make_norm(config.enc_dim, gated_rmsnorm=config.gated_rmsnorm, use_deepnet=False)
                         if not config.use_deepnet else nn.Identity())
        self.project_out = nn.Linear(config.enc_dim, config.dec_dim)

    def forward(self, x: Tensor, chunks: Tensor, *, inputs: RetrievalInputs) -> Tensor:
        for block in self.blocks:
            x = block(x, chunks, inputs=inputs)
        return self.project_out(self.norm_out(x))


class DecoderBlock(nn.Module):
    def __init__(self, config: RetroConfig, *, has_cross_attn: bool):
        super().__init__()
        c, dim = config, config.dec_dim
        self.chunk_size = c.chunk_size
        wrap = dict(post_norm=c.use_deepnet, scale_residual=c.resolved_dec_scale_residual)
        norm = lambda: make_norm(dim, gated_rmsnorm=c.gated_rmsnorm, use_deepnet=c.use_deepnet)  # noqa: E731
        self.self_attn = Residual(SelfAttention(dim, heads=c.heads, dim_head=c.dim_head, causal=True,
                                                dropout=c.dec_attn_dropout), norm(), **wrap)
        self.cross_attn = Residual(ChunkedCrossAttention(dim, chunk_size=c.chunk_size, heads=c.heads,
                                                         dim_head=c.dim_head, dropout=c.dec_attn_dropout),
                                   norm(), **wrap) if has_cross_attn else None
        self.ff = Residual(FeedForward(dim, dropout=c.dec_ff_dropout), norm(), **wrap)

    def forward(self, x: Tensor, neighbors: Tensor | None, *, rope: RopeTable,
                inputs: RetrievalInputs | None = None, encoder: Encoder | None = None) -> tuple[Tensor, Tensor | None]:
        """x [b, n, d]; neighbors: encoded [b, k, r, m, d], or embedded [(b k r), m, e] when `encoder` is given,
        in which case this block encodes them from its own hidden states. Returns (x, encoded neighbors)."""
        x = self.self_attn(x, rope)
        if self.cross_attn is not None and neighbors is not None:
            assert inputs is not None
            if encoder is not None:
                b, r = x.shape[0], inputs.num_neighbors
                num_chunks = neighbors.shape[0] // (b * r)
                if num_chunks > 0:
                    chunks = rearrange(x[:, : num_chunks * self.chunk_size], "b (k n) d -> (b k) n d", k=num_chunks)
                    neighbors = encoder(neighbors, chunks, inputs=inputs)
                neighbors = rearrange(neighbors, "(b k r) m d -> b k r m d", b=b, r=r)
            x = self.cross_attn(x, neighbors, q_rope=inputs.cca_q_rope, k_rope=inputs.cca_k_rope,
                                bias=inputs.cca_bias)
        return self.ff(x), neighbors


class Decoder(nn.Module):
    def __init__(self, config: RetroConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            DecoderBlock(config, has_cross_attn=config.has_cross_attn(i, encoder=False))
            for i in range(1, config.dec_depth + 1))
        self.norm_out = (make_norm(config.dec_dim, gated_rmsnorm=config.gated_rmsnorm, use_deepnet=False)
                         if not config.use_deepnet else nn.Identity())

    def forward(self, x: Tensor, neighbors: Tensor | None, *, rope: RopeTable, inputs: RetrievalInputs | None,
                encoder: Encoder) -> Tensor:
        encoded = False
        for block in self.blocks:
            # the retrieval encoder runs once, at the first block with chunked cross-attention
            needs_encoding = neighbors is not None and block.cross_attn is not None and not encoded
            x, neighbors = block(x, neighbors, rope=rope, inputs=inputs, encoder=encoder if needs_encoding else None)
            encoded = encoded or needs_encoding
        return self.norm_out(x)


class RETRO(nn.Module):
    """`model(seq, retrieved=None, return_loss=False)` with RETRO-pytorch's shapes and semantics.

    seq: int64 [b, n] (n = L + 1 with return_loss: labels are seq[:, 1:]); retrieved: int64 [b, k, r, m] or
    [b, k, m] (one neighbor) with k = L // chunk_size and m >= chunk_size. Returns logits [b, L, num_tokens]
    or the mean token loss, pad_id ignored. Token ids are range-checked on CPU tensors only (a check elsewhere would
    wait for the device): on an accelerator, run `check_inputs(seq, retrieved)` on the CPU batch before the copy.
    """

    def __init__(self, config: RetroConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.enc_dim)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.enc_dim)
        self.to_decoder_model_dim = (nn.Linear(config.enc_dim, config.dec_dim)
                                     if config.enc_dim != config.dec_dim else nn.Identity())
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.to_logits = LogitsHead(config.dec_dim, config.num_tokens)
        self.rotary = Rotary()
        number_sites(self)
        if config.use_deepnet:
            c = config
            deepnorm_init(self.encoder, 0.87 * ((c.enc_depth ** 4) * c.dec_depth) ** -0.0625)
            deepnorm_init(self.decoder, (12 * c.dec_depth) ** -0.25)

    # forward -------------------------------------------------------------------------------------------------

    def forward(self, seq: Tensor, retrieved: Tensor | None = None, return_loss: bool = False) -> Tensor:
        c = self.config
        seq, labels = self._inputs_and_labels(seq, return_loss)
        b, n = seq.shape
        if n > c.max_seq_len:
            raise ValueError(f"sequence length {n} exceeds max_seq_len={c.max_seq_len}"
                             f"{' (seq holds one extra label token with return_loss)' if return_loss else ''}")
        device = seq.device

        x = self.token_emb(seq) + self.pos_emb(torch.arange(n, device=device))
        x = self.to_decoder_model_dim(x)
        rope = self.rotary(torch.arange(n, device=device))

        neighbors, inputs = None, None
        if retrieved is not None:
            retrieved = self._check_retrieved(retrieved, b, n)
            inputs = self._retrieval_inputs(retrieved, dtype=x.dtype)
            neighbors = rearrange(self.token_emb(retrieved), "b k r m e -> (b k r) m e")

        x = self.decoder(x, neighbors, rope=rope, inputs=inputs, encoder=self.encoder)
        if labels is None:
            return self.to_logits(x)
        return self.to_logits(x, labels, ignore_index=c.pad_id)

    # incremental decoding ------------------------------------------------------------------------------------------

    def new_cache(self) -> DecodeCache:
        return DecodeCache(kv=[KVCache() for _ in self.decoder.blocks])

    @torch.inference_mode()
    def decode_step(self, tokens: Tensor, cache: DecodeCache, neighbors: Tensor | None = None) -> Tensor:
        """Logits [b, num_tokens] of the next token after `tokens` [b] at position cache.length, the same as the
        last row of a full forward with retrieval. `neighbors` [b, r, m] must be given exactly when this token
        completes a chunk: they are that chunk's neighbors, encoded once here and read by every later position."""
        c, p = self.config, cache.length
        cs = c.chunk_size
        if p >= c.max_seq_len:
            raise ValueError(f"position {p} is past max_seq_len={c.max_seq_len}")
        completes = (p + 1) % cs == 0
        if completes != (neighbors is not None):
            raise ValueError(f"position {p} {'completes' if completes else 'does not complete'} a chunk of {cs}: "
                             f"pass neighbors exactly when it does")
        self._check_tokens("tokens", tokens)
        device = tokens.device
        x = self.to_decoder_model_dim(self.token_emb(tokens[:, None]) + self.pos_emb(torch.tensor([p], device=device)))
        rope = self.rotary(torch.tensor([p], device=device))
        if neighbors is not None:
            retrieved = self._check_retrieved(neighbors[:, None], tokens.shape[0], cs)
            inputs = self._retrieval_inputs(retrieved, dtype=x.dtype)
            embedded = rearrange(self.token_emb(retrieved), "b k r m e -> (b k r) m e")
        window = p - (cs - 1)  # position p reads the neighbors of chunk window // cs, from its last token on
        first = next(i for i, block in enumerate(self.decoder.blocks) if block.cross_attn is not None)
        for i, (block, kv) in enumerate(zip(self.decoder.blocks, cache.kv)):
            x = block.self_attn(x, rope, cache=kv)
            if block.cross_attn is None:
                x = block.ff(x)
                continue
            if i == first:  # the encoder reads this block's hidden states of the chunk, as in the full forward
                cache.hidden.append(x)
                if neighbors is not None:
                    chunk = torch.cat(cache.hidden[p + 1 - cs: p + 1], dim=1)
                    encoded = self.encoder(embedded, chunk, inputs=inputs)
                    cache.chunks.append((rearrange(encoded, "(b r) m d -> b r m d", r=inputs.num_neighbors), inputs))
            context, chunk_inputs = (cache.chunks[window // cs] if window >= 0 and window // cs < len(cache.chunks)
                                     else (None, None))
            x = block.cross_attn(x, context, row=window % cs,
                                 q_rope=chunk_inputs.cca_q_rope if chunk_inputs else rope,
                                 k_rope=chunk_inputs.cca_k_rope if chunk_inputs else rope,
                                 bias=chunk_inputs.cca_bias if chunk_inputs else None)
            x = block.ff(x)
        cache.length = p + 1
        return self.to_logits(self.decoder.norm_out(x))[:, 0]

    def _retrieval_inputs(self, retrieved: Tensor, *, dtype: torch.dtype) -> RetrievalInputs:
        b, k, r, m = retrieved.shape
        cs, device = self.config.chunk_size, retrieved.device
        keep = retrieved != self.config.pad_id
        arange = lambda length: torch.arange(length, device=device)  # noqa: E731
        if self.config.cca_positions == "aligned":
            # window row t is the sequence position that predicts the (t+1)-th token after the chunk's last one:
            # at cs - 1 + t it sits where the neighbor holds that token's counterpart (chunk 0..cs-1, continuation)
            cca_q_pos = torch.arange(cs - 1, 2 * cs - 1, device=device)
        else:
            # RETRO-pytorch shifts its query rotary table with F.pad, which leaves the first query of a chunk at
            # position 2*cs - 2 and the others at 0; kept so that its checkpoints give the same logits
            cca_q_pos = torch.zeros(cs, device=device)
            cca_q_pos[0] = 2 * cs - 2
        cca_keep = F.pad(rearrange(keep, "b k r m -> (b k) (r m)"), (1, 0), value=True)
        return RetrievalInputs(
            enc_rope=self.rotary(arange(m)),
            enc_cross_q_rope=self.rotary(arange(m).repeat(r)),
            enc_cross_k_rope=self.rotary(arange(cs)),
            enc_bias=key_padding_bias(rearrange(keep, "b k r m -> (b k r) m"), dtype),
            cca_q_rope=self.rotary(cca_q_pos),
            cca_k_rope=self.rotary(arange(m).repeat(r)),
            cca_bias=key_padding_bias(cca_keep, dtype),
            num_neighbors=r,
        )

    # input checks: one clear line each, instead of a shape error deep inside --------------------------------

    def check_inputs(self, seq: Tensor, retrieved: Tensor | None = None) -> None:
        """Raise one clear TypeError/ValueError if `seq` or `retrieved` hold anything but token ids in
        [0, num_tokens). It reads the ids back to the host: call it on the CPU batch before the copy to an
        accelerator. `forward` and `decode_step` run it themselves on CPU tensors only, so that a step on an
        accelerator never waits for the device."""
        for name, t in (("seq", seq), ("retrieved", retrieved)):
            if t is not None:
                _check_dtype(name, t)
                _check_range(name, t, self.config.num_tokens)

    def _inputs_and_labels(self, seq: Tensor, return_loss: bool) -> tuple[Tensor, Tensor | None]:
        """`seq` checked; with return_loss, inputs seq[:, :-1] and labels seq[:, 1:], else (seq, None)."""
        self._check_tokens("seq", seq)
        if seq.ndim != 2:
            raise ValueError(f"seq must be [batch, length], got shape {tuple(seq.shape)}")
        if not return_loss:
            return seq, None
        if seq.shape[1] < 2:
            raise ValueError("return_loss needs seq of length >= 2 (inputs seq[:, :-1], labels seq[:, 1:])")
        return seq[:, :-1], seq[:, 1:]

    def _check_tokens(self, name: str, t: Tensor) -> None:
        _check_dtype(name, t)
        if t.device.type == "cpu":  # elsewhere the range check would wait for the device: check_inputs does it
            _check_range(name, t, self.config.num_tokens)

    def _check_retrieved(self, retrieved: Tensor, b: int, n: int) -> Tensor:
        cs = self.config.chunk_size
        if retrieved.ndim == 3:
            retrieved = rearrange(retrieved, "b k m -> b k 1 m")  # one neighbor per chunk
        if retrieved.ndim != 4:
            raise ValueError(f"retrieved must be [batch, chunks, neighbors, tokens] (or [batch, chunks, tokens] for "
                             f"one neighbor), got {retrieved.ndim} dims with shape {tuple(retrieved.shape)}")
        self._check_tokens("retrieved", retrieved)
        rb, k, r, m = retrieved.shape
        if rb != b:
            raise ValueError(f"retrieved has batch size {rb} but seq has {b}")
        if k != n // cs:
            raise ValueError(f"a sequence of {n} tokens has {n // cs} full chunks of {cs}, so retrieved needs "
                             f"{n // cs} chunks, got {k}")
        if r < 1:
            raise ValueError("retrieved has 0 neighbors per chunk: pass retrieved=None to run without retrieval")
        if m < cs:
            raise ValueError(f"retrieved neighbors hold {m} tokens, fewer than chunk_size={cs} (usually 2 * "
                             f"chunk_size: the neighbor chunk and its continuation)")
        return retrieved.long()

    # weights -------------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, *, max_shard_size: int | None = None) -> None:
        """Write config.json and the weights into `directory`, each atomically: model.safetensors, or shards +
        model.safetensors.index.json above `max_shard_size` bytes (default 2 GB)."""
        from retro_dist.pretrained import DEFAULT_MAX_SHARD_SIZE, save_pretrained
        save_pretrained(self.config.to_dict(), self.state_dict(), directory,
                        max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "RETRO":
        from retro_dist.pretrained import load_pretrained
        config_dict, state = load_pretrained(directory, device=device)  # either form: one file or sharded
        model = cls(RetroConfig.from_dict(config_dict)).to(device)
        model.load_state_dict(state, strict=True)
        if dtype is not None:
            model = model.to(dtype)
        return model

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")


def _check_range(name: str, t: Tensor, num_tokens: int) -> None:
    if t.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one device-to-host copy per check
    if lo < 0 or hi >= num_tokens:
        raise ValueError(f"{name} holds token ids in [{lo}, {hi}], outside [0, num_tokens={num_tokens}): check the "
                         f"tokenizer's vocab size and that -1 neighbor ids were replaced by pad_id")


def deepnorm_init(module: nn.Module, beta: float) -> None:
    """DeepNet init as RETRO-pytorch: xavier-normal Linear weights, gain beta for value, output and feed-forward
    projections (each slice of a fused projection on its own fan), 1 elsewhere; zero biases.

    Runs through `Module.apply` on purpose: a builder that partitions parameters as they are created (DeepSpeed's
    ZeRO-3 `zero.Init`) hands `apply`'s function each module with its own parameters whole, one module at a time,
    and keeps rank 0's result. The Linear layers are leaves, so `apply` (children first) visits them in the same
    order as `named_modules` and draws the same random numbers as a plain build: the weights do not depend on how,
    or over how many ranks, the model was built."""
    gains: dict[int, tuple[float, ...]] = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear):
            continue
        if name.endswith("to_qkv"):
            gains[id(sub)] = (1.0, 1.0, beta)
        elif name.endswith("to_kv"):
            gains[id(sub)] = (1.0, beta)
        else:
            gains[id(sub)] = (beta if (".ff." in name or name.endswith("to_out")) else 1.0,)

    def init(sub: nn.Module) -> None:
        if id(sub) not in gains:
            return
        parts = sub.weight.data.chunk(len(gains[id(sub)]), dim=0)
        for part, gain in zip(parts, gains[id(sub)]):
            nn.init.xavier_normal_(part, gain=gain)
        if sub.bias is not None:
            nn.init.zeros_(sub.bias)

    module.apply(init)
