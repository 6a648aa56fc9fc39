"""Activation checkpointing applied from outside: which blocks it wraps, and that gradients do not change."""

from __future__ import annotations

import functools

import pytest
import torch

from retro_dist import RETRO, RetroConfig
from retro_dist.train.parallelize import apply_activation_checkpointing

CONFIG = RetroConfig(num_tokens=50, max_seq_len=32, enc_dim=16, enc_depth=3, dec_dim=32, dec_depth=4,
                     dec_cross_attn_layers=(2, 4), heads=2, dim_head=32, chunk_size=8)


def _wrapped(blocks) -> list[int]:
    return [i for i, block in enumerate(blocks) if isinstance(block.__dict__.get("forward"), functools.partial)]


@pytest.mark.parametrize("mode, decoder, encoder", [("none", [], []), ("every", [0, 1, 2, 3], [0, 1, 2]),
                                                    ("every:2", [1, 3], [1]), ("every:3", [2], [2])])
def test_every_n_wraps_the_nth_blocks_counting_from_one(mode, decoder, encoder):
    model = RETRO(CONFIG)
    assert apply_activation_checkpointing(model, mode) == len(decoder) + len(encoder)
    assert _wrapped(model.decoder.blocks) == decoder and _wrapped(model.encoder.blocks) == encoder


def test_checkpointed_gradients_equal_plain_ones():
    torch.manual_seed(0)
    plain = RETRO(CONFIG)
    checkpointed = RETRO(CONFIG)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed, "every:2")
    seq = torch.randint(1, 50, (2, 33))
    retrieved = torch.randint(1, 50, (2, 4, 2, 16))
    for model in (plain, checkpointed):
        model(seq, retrieved, return_loss=True).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
