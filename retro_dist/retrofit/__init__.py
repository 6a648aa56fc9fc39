"""RETRO-fitting pretrained Hugging Face decoders (Llama family, Qwen2, Mistral): see docs/retrofit.md."""

from .model import RetrofitConfig, RetrofitError, RetrofitRETRO, is_retrofit_dir, retrofit

__all__ = ["RetrofitConfig", "RetrofitError", "RetrofitRETRO", "is_retrofit_dir", "retrofit"]
