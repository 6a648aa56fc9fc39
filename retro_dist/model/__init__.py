"""The RETRO model: pure torch + einops, knows nothing about distribution."""

from .config import RetroConfig
from .retro import RETRO

__all__ = ["RETRO", "RetroConfig"]
