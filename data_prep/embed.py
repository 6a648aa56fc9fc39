"""Stage 2, embed: every chunk of every split -> a unit vector, by a frozen encoder.

Chunks are detokenized with the LM tokenizer and re-tokenized by the embedder (as Megatron does with BERT).
Writes db/embeddings.npy (the database, = train queries) and val/embeddings.npy (val queries), float16.
"""

from __future__ import annotations

from typing import Any

from retro_dist.data.format import Layout, load_npy
from retro_dist.retrieval.embedders import get_embedder

from .blocks import compute_blocks
from .stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    from tokenizers import Tokenizer

    c, layout = ctx.config, Layout(ctx.root)
    tokenizer = Tokenizer.from_file(str(layout.tokenizer))
    embedder = get_embedder(c.embedder, batch_size=c.embed_batch)
    counts: dict[str, Any] = {}
    for split in ("train", "val"):
        chunks = load_npy(layout.chunks(split))
        if len(chunks) == 0:
            continue

        def compute(lo: int, hi: int, chunks=chunks):
            texts = tokenizer.decode_batch(chunks[lo:hi].tolist(), skip_special_tokens=True)
            return embedder.embed(texts)

        computed = compute_blocks(ctx, out=layout.embeddings(split), num_rows=len(chunks), width=embedder.dim,
                                  dtype="float16", compute=compute, desc=f"embed {split}")
        counts[f"{split}_chunks"] = len(chunks)
        counts[f"{split}_blocks_computed"] = computed
    ctx.facts["embedder"] = {"name": embedder.name, "dim": embedder.dim}
    return counts


if __name__ == "__main__":
    from data_prep.pipeline import main
    raise SystemExit(main(stage="embed"))
