"""retro_dist: distributed training of RETRO, the Retrieval-Enhanced Transformer."""

from retro_dist.model import RETRO, RetroConfig

__all__ = ["RETRO", "RetroConfig"]
__version__ = "0.1.0"
