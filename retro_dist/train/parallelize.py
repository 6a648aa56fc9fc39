"""Applied to the model from outside: activation checkpointing per encoder/decoder block, weight-decay groups."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from retro_dist.model import RETRO


def apply_activation_checkpointing(model: RETRO, mode: str) -> int:
    """`none`, `every` or `every:N`: recompute the activations of every block, or of the N-th, 2N-th, ... block
    of the encoder and of the decoder (torchtitan's ac_freq), in backward. Returns the number of blocks wrapped.
    Non-reentrant checkpointing: works with keyword arguments, nested blocks (the encoder runs inside a decoder
    block) and every ZeRO stage; dropout masks are replayed, so losses are unchanged."""
    if mode == "none":
        return 0
    every = 1 if mode == "every" else int(mode.split(":", 1)[1])
    wrapped = 0
    for blocks in (model.decoder.blocks, model.encoder.blocks):
        for i, block in enumerate(blocks):
            if (i + 1) % every == 0:
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
                wrapped += 1
    return wrapped


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings; not biases, norm scales and gates, or null key/values.
    A parameter that ZeRO-3 partitioned as it was created is an empty 1-d placeholder: its shape is `ds_shape`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or name.endswith("null_kv") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
