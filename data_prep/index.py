"""Stage 3, index: a faiss index over the database embeddings (db/index.faiss)."""

from __future__ import annotations

from typing import Any

from retro_dist.data.format import Layout, load_npy
from retro_dist.retrieval.index import build_index, default_factory, save_index

from .stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    if not ctx.world.is_main:
        return {}
    layout = Layout(ctx.root)
    embeddings = load_npy(layout.embeddings("train"))
    factory = ctx.config.index_factory
    if factory == "auto":
        factory = default_factory(len(embeddings), embeddings.shape[1])
    ctx.log(f"[index] {factory} over {len(embeddings)} vectors of {embeddings.shape[1]} dims")
    index = build_index(embeddings, factory, progress=True)
    save_index(index, layout.index)
    ctx.facts["index"] = {"factory": factory, "file": "db/index.faiss", "vectors": int(index.ntotal)}
    return {"factory": factory, "vectors": int(index.ntotal)}


if __name__ == "__main__":
    from data_prep.pipeline import main
    raise SystemExit(main(stage="index"))
