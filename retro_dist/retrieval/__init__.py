"""Retrieval for RETRO: text embedders and a faiss index over chunk embeddings."""

from retro_dist.retrieval.embedders import Embedder, HashEmbedder, MiniLMEmbedder, embedder_record, get_embedder
from retro_dist.retrieval.index import build_index, default_factory, load_index, recall_at_k, save_index, search

__all__ = ["Embedder", "HashEmbedder", "MiniLMEmbedder", "build_index", "default_factory", "embedder_record",
           "get_embedder", "load_index", "recall_at_k", "save_index", "search"]
