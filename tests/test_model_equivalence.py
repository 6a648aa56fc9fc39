"""retro_dist.RETRO computes the same function as RETRO-pytorch 0.3.9 on converted weights (float32)."""

import pytest
import torch
import torch.nn.functional as F

from retro_dist import RETRO, RetroConfig
from retro_dist.convert import config_from_retro_pytorch, from_retro_pytorch, infer_config, to_retro_pytorch

BASE = dict(num_tokens=256, max_seq_len=256, enc_dim=64, enc_depth=2, dec_dim=96, dec_depth=4,
            dec_cross_attn_layers=(1, 3), heads=8, dim_head=32, chunk_size=16)

VARIANTS = {
    "base": {},
    "deepnet": dict(use_deepnet=True),
    "gated_rmsnorm": dict(gated_rmsnorm=True),
    "gated_deepnet": dict(gated_rmsnorm=True, use_deepnet=True),
    "enc_cross_attn_layers": dict(enc_cross_attn_layers=(2,), enc_depth=3),
    "no_enc_cross_attn": dict(enc_cross_attn_layers=()),
    "same_width_all_cca": dict(enc_dim=96, dec_cross_attn_layers=None, dim_head=48),
    "deepnet_custom_scale": dict(use_deepnet=True, enc_scale_residual=0.7, dec_scale_residual=1.3),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def make_pair(retro_pytorch, **overrides):
    kwargs = {**BASE, **overrides}
    ref = retro_pytorch.RETRO(**kwargs)
    config = config_from_retro_pytorch(kwargs)
    ours = RETRO(config)
    ours.load_state_dict(from_retro_pytorch(ref.state_dict(), config), strict=True)
    return ref, ours


def make_inputs(*, b=2, n=129, r=2, m=32, cs=16, vocab=256, pad_fraction=0.0):
    seq = torch.randint(1, vocab, (b, n))
    k = (n - 1) // cs
    retrieved = torch.randint(1, vocab, (b, k, r, m))
    if pad_fraction:
        retrieved[torch.rand(retrieved.shape) < pad_fraction] = 0
        retrieved[0, 1, 0] = 0  # one neighbor all padding
        retrieved[1, 2] = 0  # one chunk with every neighbor all padding: only the null key remains
        retrieved[0, 3, :, m // 2:] = 0  # continuations missing (end of the database)
    return seq, retrieved


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pad_fraction", [0.0, 0.3])
def test_logits_and_loss_match(retro_pytorch, variant, pad_fraction):
    ref, ours = make_pair(retro_pytorch, **VARIANTS[variant])
    seq, retrieved = make_inputs(pad_fraction=pad_fraction)
    ref.train(), ours.train()  # RETRO-pytorch only returns a loss in training mode; dropouts are 0
    with torch.no_grad():
        ref_logits = ref(seq[:, :-1], retrieved)
        ref_loss = ref(seq, retrieved, return_loss=True)
        logits = ours(seq[:, :-1], retrieved)
        loss = ours(seq, retrieved, return_loss=True)
    assert torch.isfinite(logits).all()
    assert rel_err(logits, ref_logits) <= 1e-5
    assert rel_err(loss, ref_loss) <= 1e-5


@pytest.mark.parametrize("variant", ["base", "deepnet", "gated_rmsnorm"])
def test_without_retrieval_matches(retro_pytorch, variant):
    ref, ours = make_pair(retro_pytorch, **VARIANTS[variant])
    seq = torch.randint(0, 256, (2, 100))
    with torch.no_grad():
        ref_logits = ref(seq[:, :-1])
        logits = ours(seq[:, :-1])
        # RETRO-pytorch returns logits instead of a loss without retrieval: the loss it documents is this one
        ref_loss = F.cross_entropy(ref_logits.transpose(1, 2), seq[:, 1:], ignore_index=0)
        loss = ours(seq, return_loss=True)
    assert rel_err(logits, ref_logits) <= 1e-5
    assert rel_err(loss, ref_loss) <= 1e-5


@pytest.mark.parametrize("n", [16, 40, 77, 127])
def test_length_not_multiple_of_chunk(retro_pytorch, n):
    """The tail past the last full chunk attends to no neighbors; shorter than one chunk means no retrieval."""
    ref, ours = make_pair(retro_pytorch)
    seq = torch.randint(1, 256, (2, n))
    retrieved = torch.randint(1, 256, (2, n // 16, 3, 32))
    with torch.no_grad():
        assert rel_err(ours(seq, retrieved), ref(seq, retrieved)) <= 1e-5


def test_neighbors_of_exactly_chunk_size(retro_pytorch):
    ref, ours = make_pair(retro_pytorch)
    seq, retrieved = torch.randint(1, 256, (1, 64)), torch.randint(1, 256, (1, 4, 2, 16))
    with torch.no_grad():
        assert rel_err(ours(seq, retrieved), ref(seq, retrieved)) <= 1e-5


def test_one_neighbor_as_3d_retrieved(retro_pytorch):
    """RETRO-pytorch documents [b, k, m] for one neighbor but fails on it (mask built before the reshape)."""
    ref, ours = make_pair(retro_pytorch)
    seq, retrieved = torch.randint(1, 256, (2, 64)), torch.randint(0, 256, (2, 4, 32))
    with torch.no_grad():
        with pytest.raises(AssertionError):
            ref(seq, retrieved)
        assert rel_err(ours(seq, retrieved), ref(seq, retrieved[:, :, None])) <= 1e-5


def test_gradients_match(retro_pytorch):
    ref, ours = make_pair(retro_pytorch, gated_rmsnorm=True)
    seq, retrieved = make_inputs(pad_fraction=0.2)
    ref(seq, retrieved, return_loss=True).backward()
    ours(seq, retrieved, return_loss=True).backward()
    config = ours.config
    ref_grads = from_retro_pytorch({k: p.grad for k, p in ref.named_parameters()}, config)
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, ref_grads[name]) <= 1e-4, name


def test_heads_is_honoured():
    """RETRO-pytorch always runs 8 heads whatever `heads` says; ours builds what the config asks for."""
    model = RETRO(RetroConfig(**{**BASE, "heads": 4, "cca_positions": "retro-pytorch"}))
    assert model.decoder.blocks[0].self_attn.fn.to_qkv.weight.shape[0] == 3 * 4 * 32
    with pytest.raises(ValueError, match="8 heads"):
        to_retro_pytorch(model.state_dict(), model.config)


def test_aligned_positions_do_not_convert_to_retro_pytorch():
    """RETRO-pytorch cannot run aligned positions: converting such a model would silently change its logits."""
    model = RETRO(RetroConfig(**{**BASE, "heads": 8}))
    assert model.config.cca_positions == "aligned"
    with pytest.raises(ValueError, match="cca_positions='aligned'"):
        to_retro_pytorch(model.state_dict(), model.config)


def test_from_retro_pytorch_refuses_aligned_positions(retro_pytorch):
    """RetroConfig(**kwargs) takes the aligned positions by default, where RETRO-pytorch's weights give other
    logits (1.4e-2 relative): the conversion refuses it and names the config that runs what they were trained with."""
    ref = retro_pytorch.RETRO(**BASE)
    seq, retrieved = make_inputs()
    with torch.no_grad():
        aligned = RETRO(RetroConfig(**BASE))
        aligned.load_state_dict(from_retro_pytorch(ref.state_dict(), RetroConfig(**BASE, cca_positions="retro-pytorch")))
        assert rel_err(aligned(seq[:, :-1], retrieved), ref(seq[:, :-1], retrieved)) > 1e-3  # what it would give
    with pytest.raises(ValueError, match=r"cca_positions='aligned'.*config_from_retro_pytorch"):
        from_retro_pytorch(ref.state_dict(), RetroConfig(**BASE))


def test_config_from_kwargs_keeps_what_ran(retro_pytorch):
    with pytest.warns(UserWarning, match="ignores heads=4"):
        config = config_from_retro_pytorch({**BASE, "heads": 4, "dec_cross_attn_layers": (1, 3, 9)})
    assert config.heads == 8 and config.dec_cross_attn_layers == (1, 3)
    ref = retro_pytorch.RETRO(**{**BASE, "heads": 4, "dec_cross_attn_layers": (1, 3, 9)})
    RETRO(config).load_state_dict(from_retro_pytorch(ref.state_dict(), config), strict=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_convert_round_trip_is_exact(retro_pytorch, variant):
    ref, ours = make_pair(retro_pytorch, **VARIANTS[variant])
    back = to_retro_pytorch(ours.state_dict(), ours.config)
    ref_state = ref.state_dict()
    assert back.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_infer_config_from_weights(retro_pytorch, variant):
    kwargs = {**BASE, **VARIANTS[variant]}
    ref = retro_pytorch.RETRO(**kwargs)
    overrides = {k: kwargs[k] for k in ("chunk_size", "enc_scale_residual", "dec_scale_residual") if k in kwargs}
    assert infer_config(ref.state_dict(), **overrides) == config_from_retro_pytorch(kwargs)
