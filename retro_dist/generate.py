"""Retrieval-augmented generation from an exported model: neighbors are retrieved from the dataset's faiss index,
with the embedder the dataset was built with, each time a chunk of generated (or prompt) text completes.

With the cache (default), each new token costs one position through the decoder (self-attention keys/values are
kept) and each chunk's neighbors are encoded once; without it, every token re-runs the whole forward, as
RETRO-pytorch does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retro_dist.data.format import Layout, load_manifest, load_npy, neighbor_tokens
from retro_dist.model import RETRO
from retro_dist.pretrained import load_model


class Retriever:
    """Chunk tokens -> neighbor tokens [r, 2 * chunk_size] from a dataset's database; counts its calls."""

    def __init__(self, dataset: str | Path, *, num_neighbors: int | None = None):
        from tokenizers import Tokenizer

        from retro_dist.retrieval.embedders import get_embedder
        from retro_dist.retrieval.index import load_index

        layout = Layout(dataset)
        self.manifest = m = load_manifest(dataset)
        if not m.get("stages", {}).get("index", {}).get("done"):
            raise ValueError(f"{dataset} has no finished index: run `retro-dist prepare` to the end")
        self.tokenizer = Tokenizer.from_file(str(layout.tokenizer))
        self.embedder = get_embedder(**m["embedder"])  # a static table must be the one the dataset used
        self.index = load_index(layout.index, mmap=True)
        self.vectors = load_npy(layout.embeddings("train"))  # exact re-scoring of a compressed index's candidates
        self.rerank = m.get("index", {}).get("rerank")  # the depth the index stage tuned
        self.db = load_npy(layout.chunks("train"))
        self.k = num_neighbors or m["num_neighbors"]
        self.calls = 0

    def __call__(self, chunk: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(neighbor tokens [k, 2 * chunk_size] int64, neighbor ids [k])."""
        from retro_dist.retrieval.index import search

        self.calls += 1
        vector = self.embedder.embed([self.tokenizer.decode(list(chunk), skip_special_tokens=True)])
        _, ids = search(self.index, vector.astype(np.float32), self.k, vectors=self.vectors, rerank=self.rerank)
        return neighbor_tokens(self.db, ids[0], pad_id=self.manifest["pad_id"]).astype(np.int64), ids[0]


@dataclass
class Generation:
    tokens: list[int]  # prompt + continuation
    prompt_length: int
    neighbor_ids: list[np.ndarray] = field(default_factory=list)  # per completed chunk


def load_for_generation(model_dir: str | Path, dataset: str | Path, *, num_neighbors: int | None = None,
                        device: torch.device | str = "cpu") -> tuple[RETRO, Retriever]:
    """An exported model (fp32, eval mode, on `device`) and a retriever over the dataset it was trained on, checked
    to match."""
    from retro_dist.compat import check_model_fits_dataset

    model = load_model(model_dir).float().eval()  # RETRO or a retrofit
    check_model_fits_dataset(model_dir, model.config, dataset, load_manifest(dataset))
    return model.to(device), Retriever(dataset, num_neighbors=num_neighbors)


def check_sampling(*, temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    """One line for a sampling setting outside its range (checked before anything is loaded)."""
    if not temperature >= 0:  # `not >=` also refuses nan
        raise ValueError(f"temperature={temperature} must be 0 (greedy) or positive (e.g. 0.7)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be 0 (no top-k filter) or a positive number of tokens")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1] (1 means no nucleus filter)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be 0 or more")


def _sample(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        cutoff = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def generate(model: RETRO, retriever: Retriever, prompt: list[int], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             use_cache: bool = True) -> Generation:
    c = model.config
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token of text")
    if len(prompt) > c.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than max_seq_len={c.max_seq_len}")
    total = min(c.max_seq_len, len(prompt) + max_new_tokens)
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out = Generation(tokens=list(prompt), prompt_length=len(prompt))
    neighbors: list[np.ndarray] = []
    cache = model.new_cache() if use_cache else None
    position = 0
    while True:
        token = out.tokens[position]
        chunk_done = (position + 1) % c.chunk_size == 0
        if chunk_done:  # the chunk ending here is known: retrieve for it before this position is decoded
            tokens, ids = retriever(out.tokens[position + 1 - c.chunk_size: position + 1])
            neighbors.append(tokens)
            out.neighbor_ids.append(ids)
        if cache is not None:
            logits = model.decode_step(torch.tensor([token], device=device), cache,
                                       torch.from_numpy(neighbors[-1])[None].to(device) if chunk_done else None)[0]
        else:
            seq = torch.tensor([out.tokens[: position + 1]], device=device)
            retrieved = (torch.from_numpy(np.stack(neighbors))[None].to(device) if neighbors else
                         torch.zeros((1, 0, retriever.k, 2 * c.chunk_size), dtype=torch.long, device=device))
            logits = model(seq, retrieved)[0, -1]
        position += 1
        if position < len(out.tokens):
            continue  # still reading the prompt
        if len(out.tokens) >= total:
            break
        out.tokens.append(_sample(logits.cpu(), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator))
    return out


def describe(out: Generation, retriever: Retriever, *, prompt_text: str | None = None, width: int = 90) -> str:
    """The prompt, the continuation, and the neighbors retrieved for each completed chunk, for people to read."""
    tokenizer, cs = retriever.tokenizer, retriever.manifest["chunk_size"]

    def text(ids) -> str:
        return " ".join(tokenizer.decode(list(ids), skip_special_tokens=True).split())

    prompt = prompt_text if prompt_text is not None else text(out.tokens[:out.prompt_length])
    lines = [f"prompt: {prompt}", f"continuation: {text(out.tokens[out.prompt_length:])}", ""]
    for c, ids in enumerate(out.neighbor_ids):
        lines.append(f"chunk {c} {text(out.tokens[c * cs:(c + 1) * cs])[:width - 20]!r} retrieved:")
        lines += [f"    #{j}: {text(retriever.db[j].tolist())[:width]!r}" for j in ids if j >= 0]
    lines.append(f"\n{len(out.neighbor_ids)} retrievals, one per completed chunk of {cs} tokens")
    return "\n".join(lines)
