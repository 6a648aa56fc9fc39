"""Sample-keyed dropout: a sample's masks depend on (seed, step, its place in the global batch, site), not on which
rank or micro-batch computes it, and activation checkpointing's recompute draws them again."""

from __future__ import annotations

import pytest
import torch

from retro_dist import RETRO, RetroConfig
from retro_dist.model.dropout import KeyedDropout, sample_keyed
from retro_dist.train.parallelize import apply_activation_checkpointing

DROPOUT = dict(enc_attn_dropout=0.2, enc_ff_dropout=0.2, dec_attn_dropout=0.2, dec_ff_dropout=0.2)
CONFIG = RetroConfig(num_tokens=50, max_seq_len=32, enc_dim=16, enc_depth=2, dec_dim=32, dec_depth=4,
                     dec_cross_attn_layers=(2, 4), heads=2, dim_head=32, chunk_size=8, **DROPOUT)


def inputs(batch: int = 4, length: int = 32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 50, (batch, length), generator=g), torch.randint(1, 50, (batch, 4, 2, 16), generator=g)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return RETRO(CONFIG).train()


def test_every_site_has_its_own_number(model):
    sites = [m.site for m in model.modules() if isinstance(m, KeyedDropout)]
    # per decoder block self-attention and FF, two cross-attention blocks, per encoder block self-attn and FF, one
    # encoder cross-attention (RETRO-pytorch's default places it in the last encoder block)
    assert sites == list(range(len(sites))) and len(sites) >= 4 * 2 + 2 + 2 * 2


def test_a_sample_gets_the_same_masks_in_any_micro_batch(model):
    """Samples at global positions 4..7 computed together, or split in two micro-batches (as on two ranks, or
    with accumulation 2), give the same outputs with dropout on."""
    seq, retrieved = inputs()
    with sample_keyed(seed=3, step=5, positions=[4, 5, 6, 7]):
        together = model(seq, retrieved)
    with sample_keyed(seed=3, step=5, positions=[4, 5]):
        first = model(seq[:2], retrieved[:2])
    with sample_keyed(seed=3, step=5, positions=[6, 7]):
        second = model(seq[2:], retrieved[2:])
    torch.testing.assert_close(torch.cat([first, second]), together, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [dict(seed=4), dict(step=6), dict(positions=[5, 4, 6, 7])])
def test_masks_change_with_seed_step_and_position(model, change):
    seq, retrieved = inputs()
    keys = dict(seed=3, step=5, positions=[4, 5, 6, 7])
    with sample_keyed(**keys):
        reference = model(seq, retrieved)
    with sample_keyed(**(keys | change)):
        other = model(seq, retrieved)
    assert not torch.allclose(other[:2], reference[:2], atol=1e-3)


def test_masks_are_independent_across_sites_and_keep_the_rate():
    x = torch.ones(4, 64, 64)
    a, b = KeyedDropout(0.25), KeyedDropout(0.25)
    b.site = 1
    with sample_keyed(seed=0, step=0, positions=[0, 1, 2, 3]):
        ya, yb = a(x), b(x)
    assert (ya == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert ((ya == 0) & (yb == 0)).float().mean().item() == pytest.approx(0.25 ** 2, abs=0.01)
    assert ya.max().item() == pytest.approx(1 / 0.75)  # kept units are scaled up as nn.Dropout does


def test_checkpointed_gradients_equal_plain_ones_with_dropout(model):
    """The recompute in backward draws the same masks (they are keyed, not taken from a generator's position)."""
    checkpointed = RETRO(CONFIG).train()
    checkpointed.load_state_dict(model.state_dict())
    apply_activation_checkpointing(checkpointed, "every")
    seq, retrieved = inputs(length=33)  # one more token: the labels
    for m in (model, checkpointed):
        torch.manual_seed(1)  # the global generator differs by call order between the two: it must not matter
        with sample_keyed(seed=0, step=2, positions=[0, 1, 2, 3]):
            m(seq, retrieved, return_loss=True).backward()
            torch.rand(1000)
    for (name, a), (_, b) in zip(model.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_without_keys_it_is_plain_dropout(model):
    seq, retrieved = inputs()
    assert not torch.allclose(model(seq, retrieved), model(seq, retrieved))
    model.eval()
    torch.testing.assert_close(model(seq, retrieved), model(seq, retrieved))


def test_a_first_dimension_that_is_not_samples_is_refused():
    with sample_keyed(seed=0, step=0, positions=[0, 1, 2]), pytest.raises(ValueError, match="not a multiple of the 3"):
        KeyedDropout(0.1)(torch.ones(4, 2))
