"""Stage 2, embed: every chunk of every split -> a unit vector, by a frozen encoder.

Chunks are detokenized with the LM tokenizer and re-tokenized by the embedder (as Megatron does with BERT).
Writes db/embeddings.npy (the database, = train queries) and val/embeddings.npy (val queries), float16.
MiniLM runs on this rank's GPU where there is one (ranks on a node take the GPUs in turn), else on the CPU.
"""

from __future__ import annotations

from typing import Any

from retro_dist.data.format import Layout, load_npy
from retro_dist.retrieval.embedders import embedder_record, get_embedder

from .blocks import compute_blocks
from .stage import StageContext

def device() -> str:
    """'cuda:N' for this rank's share of the node's GPUs, or 'cpu' where torch sees none."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    from retro_dist.launch_env import local_rank
    return f"cuda:{local_rank() % torch.cuda.device_count()}"


def run(ctx: StageContext) -> dict[str, Any]:
    from tokenizers import Tokenizer

    c, layout = ctx.config, Layout(ctx.root)
    tokenizer = Tokenizer.from_file(str(layout.tokenizer))
    embedder = get_embedder(c.embedder, device=device(), batch_size=c.embed_batch)
    counts: dict[str, Any] = {}
    for split in ("train", "val"):
        chunks = load_npy(layout.chunks(split))
        if len(chunks) == 0:
            continue

        def compute(lo: int, hi: int, chunks=chunks):
            texts = tokenizer.decode_batch(chunks[lo:hi].tolist(), skip_special_tokens=True)
            return embedder.embed(texts)

        stats = compute_blocks(ctx, out=layout.embeddings(split), num_rows=len(chunks), width=embedder.dim,
                               dtype="float16", compute=compute, desc=f"embed {split}")
        counts[f"{split}_chunks"] = len(chunks)
        counts[f"{split}_blocks_computed"] = stats.blocks_computed
        counts[f"{split}_rows_per_s"] = stats.rows_per_s
    ctx.facts["embedder"] = embedder_record(embedder)
    return counts
