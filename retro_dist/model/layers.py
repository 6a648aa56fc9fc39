"""Building blocks of RETRO: norms, rotary embeddings, attention, feed-forward, the residual wrapper.

Shapes use the RETRO axis names: b batch, k chunks, r neighbors, n / m / j lengths, d width, h heads.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .dropout import KeyedDropout, keys_active

ROTARY_DIM = 32  # partial rotary embeddings: min(dim_head, 32) dims of each head, dim_head >= 32 always


class RMSNorm(nn.Module):
    """x / max(||x|| / sqrt(d), eps) * weight, optionally gated by sigmoid(x * gate) (RETRO-pytorch's RMSNorm)."""

    def __init__(self, dim: int, *, eps: float = 1e-8, gated: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.gate = nn.Parameter(torch.ones(dim)) if gated else None

    def forward(self, x: Tensor) -> Tensor:
        # rms_norm's eps sits under the square root: eps**2 there equals clamping the rms at eps
        out = F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), eps=self.eps ** 2)
        if self.gate is None:
            return out
        return out * (x * self.gate).sigmoid()


def make_norm(dim: int, *, gated_rmsnorm: bool, use_deepnet: bool) -> nn.Module:
    """The norm RETRO-pytorch picks: gated RMSNorm wins over deepnet's LayerNorm, RMSNorm otherwise."""
    if gated_rmsnorm:
        return RMSNorm(dim, gated=True)
    if use_deepnet:
        return nn.LayerNorm(dim)
    return RMSNorm(dim)


class Rotary(nn.Module):
    """Rotary position tables for the first ROTARY_DIM dims of each head, always computed in float32.

    The frequencies are no buffer: a cast of the model (`.to(torch.bfloat16)`, `from_pretrained(dtype=...)`, an
    engine that casts buffers) would round them, and bf16 positions collide above 256.
    """

    def __init__(self, dim: int = ROTARY_DIM):
        super().__init__()
        self.dim = dim

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [n] -> (cos, sin), each [n, dim], in float32."""
        exponents = torch.arange(0, self.dim, 2, device=positions.device, dtype=torch.float32) / self.dim
        inv_freq = 1.0 / (10000 ** exponents)
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


RopeTable = tuple[Tensor, Tensor]


def apply_rotary(t: Tensor, rope: RopeTable) -> Tensor:
    """Rotate the first rotary dims of t [..., n, dim_head] by the (cos, sin) table [n, rot]."""
    cos, sin = rope
    rot = cos.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    t_rot = t_rot * cos.to(t.dtype) + rotated * sin.to(t.dtype)
    return torch.cat((t_rot, t_pass), dim=-1)


def mask_value(dtype: torch.dtype) -> float:
    """The additive bias of a masked key: half the dtype's lowest value, so that adding a score to it stays finite
    (in fp16, -65504 plus a score below -16 is -inf, and a row of -inf is NaN after softmax)."""
    return torch.finfo(dtype).min / 2


def key_padding_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean keep mask [B, j] -> additive bias [B, 1, 1, j]: 0 where kept, `mask_value(dtype)` where masked.

    A finite bias (not -inf) is what RETRO-pytorch's masked_fill does: a row whose keys are all masked attends
    uniformly instead of producing NaN.
    """
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    bias.masked_fill_(~keep, mask_value(dtype))
    return rearrange(bias, "b j -> b 1 1 j")


def attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None, causal: bool = False,
              dropout: KeyedDropout | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over [B, h, n, d] tensors, `dropout` (when training) on the probabilities.

    scaled_dot_product_attention everywhere, except bf16/fp16 on CPU with short keys and queries: there PyTorch's CPU
    flash kernel is 2-4x slower than two batched matmuls (bench/model_step.py), and the plain product is small; and
    except with dropout keyed per sample (in the trainer: retro_dist/model/dropout.py), which SDPA's fused kernels
    cannot take (they draw the masks of the whole batch from the global generator): the probabilities are then
    materialised, as SDPA's math path does.
    """
    if bias is not None and bias.dtype != q.dtype:
        # a float32 bias (built beside float32 weights under autocast) holds values that overflow fp16
        bias = bias.clamp(min=mask_value(q.dtype)).to(q.dtype)
    dropping = dropout is not None and dropout.training and dropout.p > 0
    small = (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
             and q.shape[-2] * k.shape[-2] <= 512 * 512)
    if (dropping and keys_active()) or small:
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if bias is not None:
            scores = scores + bias
        if causal:
            i, j = scores.shape[-2:]
            future = torch.ones(i, j, dtype=torch.bool, device=q.device).triu(j - i + 1)
            scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1)
        return torch.matmul(dropout(probs) if dropping else probs, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal,
                                          dropout_p=dropout.p if dropping else 0.0)


class KVCache:
    """Rotated keys and values of the positions decoded so far, for one self-attention layer. Storage grows by
    doubling, so appending a position copies nothing in the common case."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n = k.shape[-2]
        if self.k is None or self.length + n > self.k.shape[-2]:
            capacity = max(64, 2 * (self.length + n))
            grown_k = k.new_empty(*k.shape[:-2], capacity, k.shape[-1])
            grown_v = v.new_empty(*v.shape[:-2], capacity, v.shape[-1])
            if self.k is not None:
                grown_k[..., : self.length, :] = self.k[..., : self.length, :]
                grown_v[..., : self.length, :] = self.v[..., : self.length, :]
            self.k, self.v = grown_k, grown_v
        self.k[..., self.length: self.length + n, :] = k
        self.v[..., self.length: self.length + n, :] = v
        self.length += n
        return self.k[..., : self.length, :], self.v[..., : self.length, :]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, *, heads: int, dim_head: int, causal: bool, dropout: float):
        super().__init__()
        self.heads, self.dim_head, self.causal = heads, dim_head, causal
        self.attn_dropout = KeyedDropout(dropout)
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, rope: RopeTable, *, bias: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """With `cache`, x is the one newest position: it attends to every cached position and itself."""
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        causal = self.causal
        if cache is not None:
            if x.shape[1] != 1:
                raise ValueError("a KV cache decodes one position at a time")
            k, v = cache.extend(k, v)
            causal = False  # the one query is the last position: everything cached is in its past
        out = attention(q, k, v, bias=bias, causal=causal, dropout=self.attn_dropout)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Queries from x, keys/values from a context of another width; optional learned null key/value."""

    def __init__(self, dim: int, *, context_dim: int, heads: int, dim_head: int, dropout: float, null_kv: bool):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.attn_dropout = KeyedDropout(dropout)
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        # lets a query attend to nothing, and keeps attention finite when every retrieved token is padding
        self.null_kv = nn.Parameter(torch.randn(2, inner)) if null_kv else None

    def forward(self, x: Tensor, context: Tensor, *, q_rope: RopeTable, k_rope: RopeTable,
                bias: Tensor | None = None) -> Tensor:
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        q, k = apply_rotary(q, q_rope), apply_rotary(k, k_rope)
        if self.null_kv is not None:
            null_k, null_v = rearrange(self.null_kv.to(k.dtype), "two (h d) -> two 1 h 1 d", h=self.heads)
            k = torch.cat((null_k.expand(k.shape[0], -1, -1, -1), k), dim=-2)
            v = torch.cat((null_v.expand(v.shape[0], -1, -1, -1), v), dim=-2)
        out = attention(q, k, v, bias=bias, dropout=self.attn_dropout)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class ChunkedCrossAttention(nn.Module):
    """Each chunk's last token and the next chunk's first chunk_size - 1 tokens attend to that chunk's neighbors.

    The shift keeps causality: a position never reads neighbors retrieved with tokens it has not seen.
    """

    def __init__(self, dim: int, *, chunk_size: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.chunk_size = chunk_size
        self.attn = CrossAttention(dim, context_dim=dim, heads=heads, dim_head=dim_head, dropout=dropout,
                                   null_kv=True)

    def forward(self, x: Tensor, context: Tensor | None, *, q_rope: RopeTable, k_rope: RopeTable,
                bias: Tensor | None, row: int | None = None) -> Tensor:
        """x [b, n, d], context [b, k, r, m, d] (encoded neighbors), bias [(b k), 1, 1, 1 + r m] -> [b, n, d].

        Decoding (`row` given): x [b, 1, d] is the query in row `row` of its chunk window, context [b, r, m, d] the
        neighbors of that chunk, or None before the first chunk completes.
        """
        if row is not None:
            if context is None:
                return torch.zeros_like(x)
            q_rope = (q_rope[0][row:row + 1], q_rope[1][row:row + 1])
            return self.attn(x, rearrange(context, "b r m d -> b (r m) d"), q_rope=q_rope, k_rope=k_rope, bias=bias)
        b, n, _ = x.shape
        num_chunks, cs = context.shape[1], self.chunk_size
        if num_chunks == 0:
            return torch.zeros_like(x)
        shift = cs - 1
        # queries of chunk i: positions i*cs + cs-1 ... (i+1)*cs + cs-2, zero-padded past the sequence end
        queries = F.pad(x[:, shift:], (0, 0, 0, shift))[:, : num_chunks * cs]
        queries = rearrange(queries, "b (k n) d -> (b k) n d", k=num_chunks)
        context = rearrange(context, "b k r m d -> (b k) (r m) d")
        out = self.attn(queries, context, q_rope=q_rope, k_rope=k_rope, bias=bias)
        out = rearrange(out, "(b k) n d -> b (k n) d", b=b)
        # back to sequence positions: the first cs-1 positions and the tail past the last chunk get zeros
        out = F.pad(out, (0, 0, shift, 0))[:, :n]
        return F.pad(out, (0, 0, 0, n - out.shape[1]))


class FeedForward(nn.Module):
    def __init__(self, dim: int, *, mult: int = 4, dropout: float):
        super().__init__()
        inner = int(mult * dim)
        self.ff = nn.Sequential(nn.Linear(dim, inner), nn.GELU(), KeyedDropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class Residual(nn.Module):
    """Pre-norm (fn(norm(x)) + x) or deepnet post-norm (norm(fn(x) + scale * x)) around a sublayer."""

    def __init__(self, fn: nn.Module, norm: nn.Module, *, post_norm: bool, scale_residual: float):
        super().__init__()
        self.fn, self.norm = fn, norm
        self.post_norm, self.scale_residual = post_norm, scale_residual

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.post_norm:
            return self.norm(self.fn(x, *args, **kwargs) + x * self.scale_residual)
        return self.fn(self.norm(x), *args, **kwargs) + x


NormFactory = Callable[[int], nn.Module]


class LogitsHead(nn.Linear):
    """The output projection. Given labels it returns the mean cross-entropy without materialising the full
    [tokens, vocab] float32 logits: rows are processed in blocks, and the gradients are computed on the way (the
    block's softmax is at hand then), so backward only scales them. Same function as F.cross_entropy on the logits.

    The gradients are kept as sums of (softmax - onehot) over tokens, and the 1 / tokens of the mean is applied in
    backward together with the incoming gradient (fp16's loss scale), in float32: divided by thousands of tokens,
    most of a token's gradient lies below fp16's smallest subnormal (6e-8).
    """

    block_elements = 1 << 24  # ~64 MB of float32 logits per block
    fp16_block_rows = 4096  # a block's fp16 weight gradient sums this many rows of x: under 65504 while |x| < 15

    def forward(self, x: Tensor, labels: Tensor | None = None, *, ignore_index: int = -100) -> Tensor:
        if labels is None:
            return super().forward(x)
        rows = max(1, self.block_elements // self.out_features)
        if _matmul_dtype(x) == torch.float16:
            rows = min(rows, self.fp16_block_rows)
        return _LinearCrossEntropy.apply(x.flatten(0, -2), self.weight, self.bias, labels.flatten(), ignore_index, rows)


def _matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul with x runs in: autocast's where it is on, x's otherwise."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                rows: int) -> Tensor:
        needs_grad = any(ctx.needs_input_grad[:3])
        valid = labels != ignore_index
        count = valid.sum().clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        dtype = _matmul_dtype(x)
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if needs_grad else None
        grad_b = (torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
                  if needs_grad and bias is not None else None)
        for start in range(0, x.shape[0], rows):
            xb, lb, vb = x[start:start + rows], labels[start:start + rows], valid[start:start + rows]
            logits = F.linear(xb, weight, bias).float()
            lse = logits.logsumexp(dim=-1)
            target = logits.gather(1, lb[:, None]).squeeze(1)
            total += ((lse - target) * vb).sum()
            if needs_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                probs[torch.arange(len(lb), device=x.device), lb] -= 1.0
                probs.mul_(vb[:, None])  # in [-1, 1]: fits fp16 without the 1 / count
                g = probs.to(dtype)
                grad_x[start:start + rows] = torch.matmul(g, weight.to(dtype))
                grad_w += torch.matmul(g.t(), xb.to(dtype))
                if grad_b is not None:
                    grad_b += probs.sum(dim=0)
        if needs_grad:
            ctx.param_dtypes = weight.dtype, bias.dtype if bias is not None else None
            ctx.save_for_backward(grad_x, grad_w, grad_b, count)  # sums over tokens; float32 but for grad_x
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w, grad_b, count = ctx.saved_tensors
        factor = grad_out.to(torch.float32) / count  # fp16's loss scale overflows fp16 itself (2^16 > 65504)
        w_dtype, b_dtype = ctx.param_dtypes
        grad_x = (grad_x.to(torch.float32) * factor).to(grad_x.dtype)
        grad_w = (grad_w * factor).to(w_dtype)
        grad_b = (grad_b * factor).to(b_dtype) if grad_b is not None else None
        return grad_x, grad_w, grad_b, None, None, None
