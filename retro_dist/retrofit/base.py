"""Small random-init bases for tests, the demo of retrofitting and bench/retrofit.py: a transformers checkpoint
written with `save_pretrained`, and a Llama-3-style byte-level BPE tokenizer (no pad token) built with `tokenizers`."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

# Llama 3's special tokens: the pretraining corpus never holds them as text, and it has no pad token
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
RESERVED = "<|reserved_special_token_0|>"


def llama_style_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE with Llama 3's BOS, EOS and a reserved special token, and its BOS-adding template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, RESERVED],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = list(texts)
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[
        (BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


FAMILIES = ("llama", "qwen2", "mistral")


def save_random_base(directory: str | Path, *, family: str = "llama", vocab_size: int, hidden_size: int = 64,
                     layers: int = 4, heads: int = 2, kv_heads: int = 1, intermediate_size: int = 128,
                     max_positions: int = 512, seed: int = 0, tokenizer=None,
                     tie_word_embeddings: bool = False) -> Path:
    """A random-init `family` causal LM saved with save_pretrained (+ tokenizer.json when given)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    kind = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    config = kind(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate_size,
                  max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
                  head_dim=hidden_size // heads)
    if tokenizer is not None:
        config.bos_token_id, config.eos_token_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    directory = Path(directory)
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))
    return directory
